"""`make outage`: Kafka down for OUTAGE_MINUTES (10) under 1,000 messages a second, then the drain.

One RabbitMQ node and one Kafka broker of their own (free ports, a temporary directory), one
bridge, and a publisher running 500 TLS devices that each send a message every 0.5 s. After a
minute of streaming Kafka is stopped; the devices keep publishing, and the backlog waits in their
RabbitMQ queues (classic queues, version 2: messages go to disk and only a small window of each
queue stays in memory, so no policy is needed to keep a backlog off memory). Every 5 s (every
second while the backlog drains) the run records the backlog, RabbitMQ's memory and alarms, and
what the bridge produced and spent. Then
Kafka starts again and the run measures how fast the bridge drains the backlog while the devices
go on publishing; at the end every device stops, and Kafka is audited (per device: missing,
duplicated, out of order).

Writes bench/results/kafka-outage-<date>.json and .md; exits 1 when anything is missing or out
of order, when the memory alarm fired, or when the backlog shrank slower than 5x the arrival
rate (net of what kept arriving).
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import tempfile
import time
from pathlib import Path

import psutil
import requests

from bench.common import report_run, sigterm_as_interrupt
from bench.pipeline_run import PipelineRun
from common import config
from common.config import Settings
from rabbitmq import endpoints, topology
from stack.local import start_fresh_brokers

LOGGER = logging.getLogger("outage")
DEVICES = 500
INTERVAL = 0.5       # s between two messages of a device: 1,000 msg/s over 500 devices
RATE = DEVICES / INTERVAL
WARM_SECONDS = 60.0  # streaming before Kafka stops
# The devices go on this long after Kafka is back (the drain happens inside): 40 % of the outage
# (shrinking at 5x the arrival rate, the backlog is gone in a fifth of it), a minute at least.
AFTER_SHARE, AFTER_MIN_SECONDS = 0.4, 60.0
SAMPLE_SECONDS = 5.0
DRAIN_SAMPLE_SECONDS = 1.0  # while the backlog drains
DRAIN_AIM = 5.0      # the backlog shrinks at >= 5x the arrival rate (net of what still arrives)
DRAINED_SECONDS = 2.0  # drained: at most this many seconds of arrivals still on their way


class Sampler:
    """Every call of sample(): the backlog, RabbitMQ's memory and alarms, the bridge's records
    produced and its CPU, the devices' acknowledged messages; kept as a series."""

    def __init__(self, settings: Settings, run: PipelineRun, node_name: str):
        self.settings, self.run, self.node_name = settings, run, node_name
        self.http = endpoints.management_api(settings)
        self.series: list[dict] = []
        self.bridge_cpu_then: tuple[float, float] | None = None

    def sample(self, phase: str) -> dict:
        """One row of the series; a figure nobody answered for is None (and left out of the
        results), so that a slow management API or bridge does not end a long run."""
        try:
            overview = self.http.get(f"{self.settings.management_url}/api/overview",
                                     timeout=10).json()
            node = self.http.get(f"{self.settings.management_url}/api/nodes/{self.node_name}",
                                 timeout=10).json()
        except (requests.RequestException, ValueError) as error:
            LOGGER.warning("the management API did not answer (%r): this sample has no "
                           "RabbitMQ figures", error)
            overview, node = {}, {}
        # The devices' PUBACKs as the harness last read them (GET /devices, every 0.1 s) and the
        # records Kafka confirmed to the bridge: their difference is the backlog, from counters
        # (the management API's queue totals lag by up to 5 s). It can dip below 0 by the
        # harness's staleness; kept as is.
        acked = sum(row["acked"] for row in self.run.rows.values())
        produced = self.run.bridge_metric("webos_bridge_produced_total")
        row = {"t_s": round(time.monotonic() - self.run.started_at, 2), "phase": phase,
               "backlog": None if produced is None else acked - int(produced),
               "queued_per_management_api": overview.get("queue_totals", {}).get("messages"),
               "acked_by_rabbitmq": acked,
               "produced": None if produced is None else int(produced),
               "rabbitmq_mem_mb": (round(node["mem_used"] / 2**20, 1) if "mem_used" in node
                                   else None),
               "rabbitmq_mem_limit_mb": (round(node["mem_limit"] / 2**20, 1)
                                         if "mem_limit" in node else None),
               "mem_alarm": node.get("mem_alarm"), "disk_alarm": node.get("disk_free_alarm"),
               "bridge_cpu_pct": self._bridge_cpu()}
        self.series.append(row)
        LOGGER.info("%s: backlog %s, acked %d, produced %s, RabbitMQ %s MB%s, bridge %s%% CPU",
                    phase, row["backlog"], acked, row["produced"], row["rabbitmq_mem_mb"],
                    " MEMORY ALARM" if row["mem_alarm"] else "", row["bridge_cpu_pct"])
        return row

    def _bridge_cpu(self) -> float | None:
        """% of one core the bridge used since the last sample."""
        try:
            times = psutil.Process(self.run.bridge.pid).cpu_times()
        except psutil.Error:
            return None
        now, cpu = time.monotonic(), times.user + times.system
        then, self.bridge_cpu_then = self.bridge_cpu_then, (now, cpu)
        return None if then is None else round(100 * (cpu - then[1]) / (now - then[0]), 1)

    def close(self) -> None:
        self.http.close()


def known(series: list[dict], key: str) -> list:
    """The values of `key` over the series that were answered."""
    return [row[key] for row in series if row[key] is not None]


def rate_between(key: str, start: dict, end: dict) -> float:
    """Per second increase of `key` from sample `start` to sample `end`."""
    return (end[key] - start[key]) / max(end["t_s"] - start["t_s"], 1e-9)


def outage(minutes: float, work: Path) -> dict:
    """Start the brokers, stream, stop Kafka for `minutes`, start it, drain, audit."""
    settings, rabbitmq, kafka = start_fresh_brokers(work, "webos-outage")
    try:
        topology.apply(settings, devices=[])
        after = max(AFTER_MIN_SECONDS, AFTER_SHARE * minutes * 60)
        messages = int(RATE * (WARM_SECONDS + minutes * 60 + after))
        with PipelineRun(settings, work / "run", devices=DEVICES, messages=messages,
                         interval=(INTERVAL, INTERVAL)) as run:
            run.start()
            streaming_at = time.monotonic()
            sampler = Sampler(settings, run, rabbitmq.node_name)
            while time.monotonic() - streaming_at < WARM_SECONDS:
                sampler.sample("before")
                time.sleep(SAMPLE_SECONDS)  # the sampling period
            kafka.stop()
            run.note("Kafka stopped")
            stopped_at = time.monotonic()
            while time.monotonic() - stopped_at < minutes * 60:
                sampler.sample("outage")
                time.sleep(SAMPLE_SECONDS)
            kafka.start()
            kafka.wait_ready(timeout=180)
            restart = sampler.sample("drain")  # the drain's clock starts when Kafka answers
            while restart["backlog"] is None:  # the bridge's /metrics did not answer
                restart = sampler.sample("drain")
            run.note(f"Kafka started again after {time.monotonic() - stopped_at:.0f} s, "
                     f"backlog {restart['backlog']}")
            drained = None
            while run.streaming:
                row = sampler.sample("drain" if drained is None else "after")
                if (drained is None and row["backlog"] is not None
                        and row["backlog"] <= RATE * DRAINED_SECONDS):
                    drained = row
                    run.note(f"backlog drained: {row['backlog']} left")
                time.sleep(DRAIN_SAMPLE_SECONDS if drained is None else SAMPLE_SECONDS)
            try:
                report = run.finish(timeout=900, stream_timeout=900)
            finally:
                sampler.close()
        series = sampler.series
        before = [r for r in series if r["phase"] == "before"]
        during = [r for r in series if r["phase"] == "outage"]
        arrival = rate_between("acked_by_rabbitmq", before[0], restart)
        drain = None
        if drained is not None:
            seconds = max(drained["t_s"] - restart["t_s"], 1e-9)
            drain = {"seconds": round(seconds, 1), "backlog_at_start": restart["backlog"],
                     "forwarded_per_s": round(rate_between("produced", restart, drained)),
                     "arrival_per_s": round(rate_between("acked_by_rabbitmq", restart,
                                                         drained)),
                     "backlog_fell_per_s": round((restart["backlog"] - drained["backlog"]) / seconds)}
            drain["ratio"] = round(drain["backlog_fell_per_s"] / max(drain["arrival_per_s"], 1), 2)
        bridge_cpu = [r["bridge_cpu_pct"] for r in during if r["bridge_cpu_pct"] is not None]
        return {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "outage_minutes": minutes, "devices": DEVICES, "offered_per_s": RATE,
            "arrival_per_s": round(arrival),
            "backlog_peak": max(known(series, "backlog"), default=None),
            "queued_peak_per_management_api": max(known(series, "queued_per_management_api"),
                                                  default=None),
            "rabbitmq_mem_peak_mb": max(known(series, "rabbitmq_mem_mb"), default=None),
            "rabbitmq_mem_limit_mb": max(known(series, "rabbitmq_mem_limit_mb"), default=None),
            "mem_alarm": any(known(series, "mem_alarm")),
            "disk_alarm": any(known(series, "disk_alarm")),
            "bridge_cpu_pct_during_outage": (round(sum(bridge_cpu) / len(bridge_cpu), 1)
                                             if bridge_cpu else None),
            "drain": drain, "series": series, "timeline": run.timeline, "audit": report.to_json()}
    finally:
        for broker in (rabbitmq, kafka):  # throwaway data
            if broker.pid() is not None:
                broker.kill()


def verdict(result: dict) -> list[str]:
    """What failed, in words (nothing: the run passed)."""
    audit, drain = result["audit"], result["drain"]
    failures = []
    if audit["missing"] or audit["out_of_order"]:
        failures.append(f"{audit['missing']} missing, {audit['out_of_order']} out of order")
    if result["mem_alarm"]:
        failures.append("RabbitMQ's memory alarm fired")
    if drain is None:
        failures.append("the backlog never drained")
    elif drain["ratio"] < DRAIN_AIM:
        failures.append(f"drained at {drain['ratio']}x the arrival rate (aim {DRAIN_AIM:g}x)")
    return failures


def shown(value, spec: str = "") -> str:
    """`value` formatted, or "unknown" (nobody answered for it)."""
    return "unknown" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    audit, drain = result["audit"], result["drain"]
    lines = [f"Kafka outage, {result['date']}: Kafka stopped {result['outage_minutes']:g} min under "
             f"{result['devices']} TLS devices offering {result['offered_per_s']:.0f} msg/s.", "",
             "| figure | value |", "| --- | --- |",
             f"| arrival (acked by RabbitMQ), msg/s | {result['arrival_per_s']} |",
             f"| backlog at its peak, messages | {shown(result['backlog_peak'], ',')} |",
             f"| RabbitMQ memory at its peak / limit, MB | {shown(result['rabbitmq_mem_peak_mb'], '.0f')} / "
             f"{shown(result['rabbitmq_mem_limit_mb'], '.0f')} |",
             f"| memory alarm / disk alarm | {result['mem_alarm']} / {result['disk_alarm']} |",
             f"| bridge CPU while Kafka was down, % of a core | {result['bridge_cpu_pct_during_outage']} |"]
    if drain:
        lines += [f"| drain of {drain['backlog_at_start']:,}: seconds; forwarded, arriving, backlog "
                  f"fell msg/s; fell / arriving | {drain['seconds']}; {drain['forwarded_per_s']}, "
                  f"{drain['arrival_per_s']}, {drain['backlog_fell_per_s']}; {drain['ratio']} |"]
    lines += [f"| audit: published / arrived / missing / out of order / duplicated | "
              f"{audit['published']} / {audit['arrived']} / {audit['missing']} / "
              f"{audit['out_of_order']} / {audit['duplicated']} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kafka_outage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long Kafka is down (10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    # The management API closes idle keep-alive connections: requests retries, urllib3 warns.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    sigterm_as_interrupt()
    work = Path(tempfile.mkdtemp(prefix="webos-outage-"))
    try:
        result = outage(args.minutes, work)
    except BaseException:
        LOGGER.error("stopped early: the brokers' data and logs are kept in %s", work)
        raise
    return report_run("kafka-outage", result, markdown(result), verdict(result), work)


if __name__ == "__main__":
    config.run(main)
