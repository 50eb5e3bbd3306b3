"""`make soak`: the whole pipeline under random faults for SOAK_MINUTES, then the audit.

Three RabbitMQ nodes and three Kafka brokers of its own (free ports, a temporary directory), two
bridges, and a publisher running 1,000 TLS devices (one message each every 3-6 s). While they
stream, a fault script applies, one at a time and at random (seeded: `--seed` repeats a run),
each fault the suite tests one by one: a bridge killed with `kill -9` (and started again, as its
supervisor would), a RabbitMQ node restarted, a RabbitMQ node hung (SIGSTOP) and resumed, a Kafka
broker killed and started again, a Kafka broker hung and resumed, RabbitMQ's disk alarm forced and
cleared. Then every device stops, Kafka is audited (per device: missing, duplicated, out of
order), and the peak memory of every process (whatever its pid after restarts) is reported.

Writes bench/results/soak-<date>.json and .md; exits 1 when anything is missing or out of order.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.common import report_run, sigterm_as_interrupt
from bench.pipeline_run import PipelineRun
from common import config
from rabbitmq import topology
from stack.kafka_server import local_cluster
from stack.local import fresh_settings, start_rabbitmq
from stack.process import free_port
from stack.rabbitmq_server import wait_cluster

LOGGER = logging.getLogger("soak")
DEVICES = 1000
# s between two messages of a device: 222 msg/s over 1,000 devices. At 667 msg/s (1-2 s) three
# nodes, three Kafka brokers and the devices held both cores at 100 %, and a restarted node took
# 4 min 20 s to boot (recovering its 2,000 quorum queues while starved).
INTERVAL = (3.0, 6.0)
RECOVERY_SECONDS = 600.0  # the longest a restarted or resumed node may take to rejoin (5 min 7 s seen)
HANG_SECONDS = 20.0
ALARM_SECONDS = 10.0
PAUSE = (10.0, 25.0)   # s between the end of one fault and the next
FAULTS = ("bridge_kill", "rabbitmq_restart", "rabbitmq_hang", "kafka_kill", "kafka_hang", "disk_alarm")


class PeakMemory:
    """Peak RSS of named roles, each a function giving its processes now (pids change when a
    fault restarts one), sampled every 2 s in a thread."""

    def __init__(self, roles: dict):
        self.roles = roles
        self.peak_mb = {name: 0.0 for name in roles}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(2.0):
            for name, processes in self.roles.items():
                total = 0
                for pid in processes():
                    try:
                        tree = psutil.Process(pid)
                        total += sum(p.memory_info().rss for p in [tree, *tree.children(recursive=True)])
                    except psutil.Error:
                        continue
                self.peak_mb[name] = max(self.peak_mb[name], round(total / 2**20, 1))


class Faults:
    """The fault script: each fault applies and recovers before the next one starts."""

    def __init__(self, run: PipelineRun, rabbitmq: list, kafka: list, rng: random.Random,
                 names: tuple[str, ...] = FAULTS):
        self.run, self.rabbitmq, self.kafka, self.rng = run, rabbitmq, kafka, rng
        self.names = names
        self.applied: list[dict] = []
        self.elected: list[dict] = []  # quorum queues left without a leader, and when

    def apply_one(self) -> None:
        name = self.rng.choice(self.names)
        started = time.monotonic()
        target = getattr(self, name)()
        self.applied.append({"fault": name, "target": target, "at_s": round(started - self.run.started_at, 1),
                             "seconds": round(time.monotonic() - started, 1)})

    def bridge_kill(self) -> str:
        victim = self.rng.choice([b for b in self.run.bridges if b.running])
        self.run.kill_bridge(victim)
        # What supervisord does under `make run`. Under this load a new bridge takes minutes to
        # consume the 1,000 quorum queues (404 in its first 58 s: a passive declare and a
        # basic.consume, each a round trip, per queue).
        self.run.start_bridge(wait=False)
        self.run.wait_bridge_consuming(timeout=RECOVERY_SECONDS)
        return f"pid {victim.process.pid}"

    def rabbitmq_restart(self) -> str:
        node = self.rng.choice(self.rabbitmq)
        self.run.note(f"restart RabbitMQ {node.node_name}")
        node.stop()
        node.start()
        wait_cluster(self.rabbitmq, timeout=RECOVERY_SECONDS)
        self.elect_leaders()
        return node.node_name

    def elect_leaders(self) -> None:
        """What an operator does after a node restart on RabbitMQ 4.0.5 (`python -m stack
        elect-leaders`): an election in each quorum queue left without a leader, recorded."""
        queues = self.rabbitmq[0].elect_leaderless_queues()
        if queues:
            self.run.note(f"{len(queues)} quorum queue(s) had no leader: {', '.join(queues)}")
            self.elected.append({"at_s": round(time.monotonic() - self.run.started_at, 1),
                                 "queues": queues})

    def _hang(self, broker, name: str) -> str:
        self.run.note(f"SIGSTOP {name} for {HANG_SECONDS:.0f} s")
        broker.hang()
        try:
            time.sleep(HANG_SECONDS)  # the fault's length
        finally:
            broker.resume()
        return name

    def rabbitmq_hang(self) -> str:
        node = self.rng.choice(self.rabbitmq)
        self._hang(node, f"RabbitMQ {node.node_name}")
        wait_cluster(self.rabbitmq, timeout=RECOVERY_SECONDS)
        self.elect_leaders()
        return node.node_name

    def kafka_kill(self) -> str:
        broker = self.rng.choice(self.kafka)
        self.run.note(f"kill -9 Kafka node {broker.node_id}")
        broker.kill()
        time.sleep(HANG_SECONDS)  # down for a while, as a crashed broker is
        broker.start()
        broker.wait_ready(timeout=180)
        return f"node {broker.node_id}"

    def kafka_hang(self) -> str:
        broker = self.rng.choice(self.kafka)
        return self._hang(broker, f"Kafka node {broker.node_id}")

    def disk_alarm(self) -> str:
        node = self.rng.choice(self.rabbitmq)
        self.run.note(f"disk alarm on {node.node_name} for {ALARM_SECONDS:.0f} s")
        node.rabbitmqctl("set_disk_free_limit", str(10**15))  # a petabyte: above what is free
        try:
            time.sleep(ALARM_SECONDS)
        finally:
            node.rabbitmqctl("set_disk_free_limit", "50MB")  # the default: rabbitmq.conf sets none
        return node.node_name


def soak(minutes: float, seed: int, work: Path, faults: tuple[str, ...] = FAULTS) -> dict:
    """Start the clusters, stream for `minutes` under faults, audit; the results."""
    kafka = local_cluster(work / "kafka", [(free_port(), free_port()) for _ in range(3)])
    rabbitmq: list = []
    try:
        for broker in kafka:
            broker.start()
        settings = fresh_settings(work, rabbitmq_nodes=3, reconnect_max_seconds=5.0,
                                  kafka_bootstrap=",".join(f"127.0.0.1:{b.port}" for b in kafka))
        rabbitmq = start_rabbitmq(settings, work, "webos-soak")
        for broker in kafka:
            broker.wait_ready(timeout=180)
        topology.apply(settings, devices=[])
        messages = int(DEVICES * minutes * 60 / (sum(INTERVAL) / 2))
        with PipelineRun(settings, work / "run", devices=DEVICES, messages=messages,
                         interval=INTERVAL, replication=3) as run:
            run.prepare(bridges=2)
            memory = PeakMemory({
                "publisher": lambda: [run.publisher.pid] if run.publisher and run.publisher.running else [],
                "bridges": lambda: [b.pid for b in run.bridges if b.running],
                **{f"rabbitmq {n.node_name}": (lambda n=n: [p] if (p := n.main_pid()) else [])
                   for n in rabbitmq},
                **{f"kafka {b.node_id}": (lambda b=b: [p] if (p := b.main_pid()) else []) for b in kafka},
            })
            memory.thread.start()
            run.stream()
            faults = Faults(run, rabbitmq, kafka, random.Random(seed), faults)
            while run.streaming:
                time.sleep(faults.rng.uniform(*PAUSE))  # the script's pace, not a wait on a state
                if run.streaming:
                    faults.apply_one()
            faults.elect_leaders()
            report = run.finish(timeout=600, stream_timeout=600)
            memory.stop.set()
        return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "minutes": minutes, "seed": seed, "devices": DEVICES, "fault_names": list(faults.names),
                "faults": faults.applied, "leaderless_queues": faults.elected,
                "peak_rss_mb": memory.peak_mb, "audit": report.to_json()}
    finally:
        for broker in [*rabbitmq, *kafka]:  # throwaway data; SIGKILL ends a hung one too
            if broker.pid() is not None:
                broker.kill()


def markdown(result: dict) -> str:
    audit = result["audit"]
    lines = [f"Soak {result['date']}: {result['minutes']:g} min, {result['devices']} devices, "
             f"seed {result['seed']}.", "",
             "| fault | target | at s | took s |", "| --- | --- | --- | --- |"]
    lines += [f"| {f['fault']} | {f['target']} | {f['at_s']} | {f['seconds']} |" for f in result["faults"]]
    elected = result["leaderless_queues"]
    lines += ["", f"Quorum queues found without a leader (RabbitMQ 4.0.5) and given an election: "
              f"{sum(len(e['queues']) for e in elected)}"
              + "".join(f"; {len(e['queues'])} at {e['at_s']} s" for e in elected) + "."]
    lines += ["", "| audit | value |", "| --- | --- |"]
    lines += [f"| {key} | {audit[key]} |" for key in ("published", "acked", "dropped", "arrived",
                                                       "missing", "duplicated", "out_of_order")]
    lines += ["", "| process | peak RSS MB |", "| --- | --- |"]
    lines += [f"| {name} | {mb} |" for name, mb in result["peak_rss_mb"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the devices stream (30)")
    parser.add_argument("--seed", type=int, default=None, help="the fault script's seed (default: random)")
    parser.add_argument("--faults", default=",".join(FAULTS), metavar="NAME,...",
                        help=f"the faults to draw from (all: {','.join(FAULTS)})")
    args = parser.parse_args(argv)
    faults = tuple(name.strip() for name in args.faults.split(",") if name.strip())
    if not faults or set(faults) - set(FAULTS):
        parser.error(f"--faults {args.faults!r}: name one or more of {', '.join(FAULTS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    LOGGER.info("soak: %g minutes, %d devices, seed %d, faults %s", args.minutes, DEVICES, seed,
                ", ".join(faults))
    sigterm_as_interrupt()
    work = Path(tempfile.mkdtemp(prefix="webos-soak-"))
    try:
        result = soak(args.minutes, seed, work, faults)
    except BaseException:
        LOGGER.error("soak stopped early: the brokers' data and logs are kept in %s", work)
        raise
    audit = result["audit"]
    failures = ([f"{audit['missing']} missing, {audit['out_of_order']} out of order"]
                if audit["missing"] or audit["out_of_order"] else [])
    return report_run("soak", result, markdown(result), failures, work)


if __name__ == "__main__":
    config.run(main)
