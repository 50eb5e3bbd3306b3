"""`make bench`: every benchmark in one run on one machine, against fresh local brokers.

Each benchmark is a module in this package with `run(settings, out_dir) -> dict` that prints its
own progress and returns JSON-serialisable figures; this runner starts the brokers, calls them in
order and, after each, writes bench/results/<date>.json (the headline figures under `summary`,
bench/summary.py) and bench/results/latest.md, so that a run stopped part-way keeps what it
measured. A run of some benchmarks only writes bench/results/<date>-<their names>.json and leaves
the full run's files alone. SIGINT or SIGTERM stops the benchmark under way and the brokers this
run started.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path


from bench.publisher_scale import broker_files_needed, device_counts, raise_file_limit
from bench.common import machine, sigterm_as_interrupt
from bench.summary import summary, summary_rows
from rabbitmq import topology
from common import config
from common.config import Settings
from stack.kafka_server import ensure_pipeline_topics
from stack.local import start_fresh_brokers

RESULTS = Path(__file__).resolve().parent / "results"
BENCHMARKS = ["bridge_throughput", "e2e_latency", "command_latency", "publisher_scale", "memory",
              "discovery", "kafka_refusal", "audit"]
# The module of a benchmark whose name is not its module's: the audit runs the audited pipeline
# (bench/audit.py is the pure audit it reports with).
MODULES = {"audit": "pipeline_run"}
LOGGER = logging.getLogger("bench")


def start_brokers(base: Path) -> tuple[Settings, list]:
    """Fresh RabbitMQ and Kafka on free ports, topology and topic applied."""
    # Plain listeners too: publisher_scale and e2e_latency measure TLS against plain MQTT.
    settings, rabbitmq, kafka = start_fresh_brokers(base, node_name=f"webos-bench-{os.getpid()}",
                                                    plain_listeners=True)
    topology.apply(settings)
    ensure_pipeline_topics(settings)
    return settings, [rabbitmq, kafka]


def summary_table(results: dict) -> list[str]:
    """The headline figures as Markdown table rows (what the README's Performance section shows)."""
    rows = ["| benchmark | figure | value |", "| --- | --- | --- |"]

    def add(name, figure, value):
        if value is not None:
            rows.append(f"| {name} | {figure} | {value} |")

    bridge = results.get("bridge_throughput") or {}
    if bridge:
        add("bridge throughput", "A: bare pika consumer, msg/s (best)", bridge.get("baseline_a_msgs_per_s"))
        add("bridge throughput", "B: bare Kafka producer, msg/s (best)", bridge.get("baseline_b_msgs_per_s"))
        add("bridge throughput", "bridge, msg/s (best)", bridge.get("bridge_msgs_per_s"))
        add("bridge throughput", "ratio bridge / min(A, B): best, of medians",
            f"{bridge.get('ratio')}, {bridge.get('ratio_of_medians')}")
        add("bridge throughput", "bridge peak RSS, MB", bridge.get("bridge_peak_rss_mb"))
    refusal = results.get("kafka_refusal") or {}
    if refusal.get("bridge_cpu_percent_refused") is not None:
        add("Kafka refusing a topic", f"bridge CPU, % of a core: flowing / refused for "
            f"{refusal['seconds_per_window']:g} s (ratio)",
            f"{refusal['bridge_cpu_percent_baseline']} / {refusal['bridge_cpu_percent_refused']} "
            f"({refusal['refused_over_baseline']})")
        add("Kafka refusing a topic", "bridge log lines a minute while refused; missing after",
            f"{refusal['log_lines_per_minute_refused']}; {refusal['missing']}")
    for run in (results.get("e2e_latency") or {}).get("runs", []):
        add("end to end", f"MQTT -> Kafka, {run['rate_target']} msg/s offered "
            f"({run['rate_achieved']} achieved): p50 / p99 / max ms",
            f"{run['p50_ms']} / {run['p99_ms']} / {run['max_ms']}")
        rounds = run.get("runs", [])
        for number, round_ in enumerate(rounds, 1):
            cause = f"; p99 over 20 ms: {round_['cause']}" if round_.get("cause") else ""
            add("end to end", f"{run['rate_target']} msg/s, round {number}/{len(rounds)}: "
                "p50 / p99 / max ms", f"{round_['p50_ms']} / {round_['p99_ms']} / "
                f"{round_['max_ms']}{cause}")
    for run in (results.get("e2e_latency") or {}).get("plain_runs", []):
        add("end to end", f"the same over plain MQTT (no TLS), {run['rate_target']} msg/s: "
            "p50 / p99 / max ms", f"{run['p50_ms']} / {run['p99_ms']} / {run['max_ms']}")
    for run in ((results.get("publisher_scale") or {}).get("results", [])
                + (results.get("publisher_scale") or {}).get("plain_results", [])):
        plain = run.get("transport") == "plain"
        devices = f"{run['devices']}" + (" plain (no TLS)" if plain else "")
        add("publisher scale", f"{devices} devices: on time (within 100 ms), CPU % of a core, "
            "RSS added MiB", f"{run['on_time_share']:.1%}, {run.get('cpu_percent_of_one_core')}, "
            f"{run.get('rss_mib_added')}")
        add("publisher scale", f"{devices} devices: connected (s to connect), msg/s acked of "
            "expected", f"{run.get('connected')} ({run.get('connect_seconds')} s), "
            f"{run.get('acked_per_s')} of {run.get('expected_per_s')}")
        add("publisher scale", f"{devices} devices: CPU µs per message, RabbitMQ per ack / "
            "publisher per message", f"{run.get('rabbitmq_cpu_us_per_ack')} / "
            f"{run.get('publisher_cpu_us_per_message')}")
        add("publisher scale", f"{devices} devices: RabbitMQ memory per MQTT connection, KiB "
            "(RSS; connection processes)", f"{run.get('rabbitmq_memory_per_connection_kib')}; "
            f"{run.get('rabbitmq_connection_processes_per_connection_kib')}")
    commands = results.get("command_latency") or {}
    if commands.get("commands"):
        add("commands", f"Kafka command -> device reply in Kafka, {commands['rate_target']:g}/s over "
            f"{commands['devices']} devices: p50 / p99 / max ms, missing",
            f"{commands['p50_ms']} / {commands['p99_ms']} / {commands['max_ms']}, "
            f"{commands['missing']}")
        add("commands", f"broadcast to {commands['devices']} devices: answers, ms until the last",
            f"{commands['broadcast_devices_answered']}, {commands['broadcast_last_answer_ms']}")
        add("commands", "relay CPU, % of a core at that rate",
            commands.get("relay_cpu_percent_of_one_core"))
    memory = results.get("memory") or {}
    for name, figures in (memory.get("processes") or {}).items():
        add("memory", f"{name} with {memory.get('devices')} devices: peak RSS MB, mean CPU %",
            f"{figures.get('peak_rss_mb')}, {figures.get('cpu_mean_pct')}")
    for run in (results.get("discovery") or {}).get("runs", []):
        add("discovery", f"{run['queues']} device queues: s until the bridge consumes all / s to "
            "pick up a new one", f"{run['bridge_consume_all_seconds']} / "
            f"{run['new_queue_pick_up_seconds']}")
        add("discovery", f"{run['queues']} device queues: RabbitMQ KiB per queue, bridge idle CPU "
            "% of a core, one full listing KiB / ms", f"{run['rabbitmq_kib_per_queue']}, "
            f"{run['bridge_idle_cpu_pct']}, {run['full_listing_kib']} / {run['full_listing_ms']}")
    audit = results.get("audit") or {}
    if audit:
        add("audit", "whole pipeline, published / arrived / missing / out of order / duplicated",
            f"{audit.get('published')} / {audit.get('arrived')} / {audit.get('missing')} / "
            f"{audit.get('out_of_order')} / {audit.get('duplicated')}")
    return rows


def write_report(report: dict, out: Path, latest: bool = True) -> list[str]:
    """The results so far into `out` (with their `summary` first) and, with `latest`, into
    latest.md; the table."""
    headline = summary(report["results"])
    out.write_text(json.dumps({"summary": headline, **report}, indent=2) + "\n")
    table = summary_rows(headline) + [""] + summary_table(report["results"])
    machine_line = (f"{report['machine']['cores']} cores, {report['machine']['memory_gib']} GiB, "
                    f"Python {report['machine']['python']}, load average now "
                    f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if latest:
        (RESULTS / "latest.md").write_text(f"Measured {report['date']} on {machine_line}.\n\n"
                                           + "\n".join(table) + "\n")
    return table


def main(argv=None) -> int:
    """Run the benchmarks named on the command line (default: all)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="*", metavar="BENCHMARK",
                        help=f"which to run: {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.benchmarks) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.benchmarks = args.benchmarks or BENCHMARKS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    RESULTS.mkdir(exist_ok=True)
    if "publisher_scale" in args.benchmarks:
        # The brokers inherit this process's open-files limit, and RabbitMQ needs about two files
        # per simulated device (its connection and its queue): raise it before they start.
        raise_file_limit(broker_files_needed(max(device_counts())))
    base = Path(tempfile.mkdtemp(prefix="webos-bench-"))
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "results": {}}
    # A partial run must not overwrite the day's full run (the README links its latest.md).
    full = args.benchmarks == BENCHMARKS
    out = RESULTS / (f"{dt.date.today().isoformat()}.json" if full else
                     f"{dt.date.today().isoformat()}-{'-'.join(args.benchmarks)}.json")
    sigterm_as_interrupt()
    settings, brokers = start_brokers(base)
    failed: list[str] = []
    try:
        for name in args.benchmarks:
            LOGGER.info("benchmark %s ...", name)
            started = time.monotonic()
            module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
            try:
                report["results"][name] = module.run(settings, RESULTS)
            except Exception as error:  # one broken benchmark must not lose the others' figures
                LOGGER.exception("benchmark %s failed", name)
                report["results"][name] = {"error": repr(error)}
                failed.append(name)
            LOGGER.info("benchmark %s done in %.0f s", name, time.monotonic() - started)
            table = write_report(report, out, latest=full)
    except KeyboardInterrupt as interrupted:
        LOGGER.warning("stopped (%s) during the benchmarks; what finished is in %s",
                       interrupted or "SIGINT", out)
        failed.append("interrupted")
        table = write_report(report, out, latest=full)
    finally:
        for broker in reversed(brokers):
            broker.stop()
        shutil.rmtree(base, ignore_errors=True)
    print("\n".join(table))
    print(f"results written to {out}" + (f" and {RESULTS / 'latest.md'}" if full else ""))
    if failed:
        print(f"failed: {', '.join(failed)} (see the log above)")
    return 1 if failed else 0


if __name__ == "__main__":
    config.run(main)
