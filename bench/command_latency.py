"""Command round trips: a Kafka record in webos.commands -> relay -> the device's MQTT session ->
the simulated device applies it and replies -> its final record in webos.command-feedback.

N simulated devices (WEBOS_BENCH_COMMAND_DEVICES, default 1,000; MQTT 5 over TLS, persistent
sessions, all Inactive so that only commands travel) in one simulator process, the relay as a
child. Then: `ping` commands at RATE per second (WEBOS_BENCH_COMMAND_RATE, default 200) for
SECONDS (default 15) to random devices, each timed from the moment it is handed to the Kafka
producer to the Kafka timestamp of its final feedback record (one clock: this machine); and a
broadcast `ping` to every device, timed until the last device's final record. Aims (issue 21):
p99 <= 50 ms, broadcast <= 1 s. Beside them, measured in the same run: one plain Kafka hop
(produce with acks=all -> a waiting consumer) at the same rate; a round trip makes two.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from pathlib import Path

import psutil
from confluent_kafka import Consumer, Producer

from common.config import Settings
from common.devices import INACTIVE, DeviceConfig
from consumer.command_line import CommandSender
from publisher.simulator import Simulator
from rabbitmq import naming, topology
from stack.kafka_server import ensure_topic
from stack.process import AppProcess, wait_until

LOGGER = logging.getLogger("bench.command_latency")
CONNECT_TIMEOUT = 300.0
SETTLE_TIMEOUT = 30.0


def percentile(values: list[float], p: float) -> float | None:
    """The p-th percentile of `values` (nearest rank), None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))], 1)


def start_fleet(settings: Settings, count: int) -> tuple[Simulator, list[str]]:
    """`count` enrolled, quiet (Inactive) simulated devices, each subscribed to its commands."""
    devices = [f"cmd{count}-{i:05d}" for i in range(count)]
    started = time.monotonic()
    topology.enrol_devices(settings, devices, timeout=300)
    LOGGER.info("%d devices enrolled in %.0f s", count, time.monotonic() - started)
    simulator = Simulator(settings, [DeviceConfig(d, status=INACTIVE) for d in devices])
    simulator.start()

    def subscribed() -> bool:
        stats = simulator.stats()
        if time.monotonic() >= subscribed.next_log:
            subscribed.next_log = time.monotonic() + 5
            LOGGER.info("%d of %d devices connected, %d subscribed", stats["connected"], count,
                        stats["subscribed"])
        return stats["subscribed"] == count
    subscribed.next_log = 0.0
    wait_until(subscribed, CONNECT_TIMEOUT, interval=0.5, message="every device subscribed")
    LOGGER.info("%d devices subscribed %.0f s after start", count, time.monotonic() - started)
    return simulator, devices


def offered_load(sender: CommandSender, devices: list[str], rate: float, seconds: float) -> dict:
    """`ping` at `rate` per second for `seconds`; the send time (epoch ms) of each command id."""
    sent: dict[str, float] = {}
    rng = random.Random(1)
    interval, started = 1.0 / rate, time.monotonic()
    for number in range(int(rate * seconds)):
        due = started + number * interval
        while (wait := due - time.monotonic()) > 0:
            sender.read(min(wait, 0.005))  # take feedback while pacing (nothing else waits)
        command_id = uuid.uuid4().hex
        value = json.dumps({"command_id": command_id, "name": "ping", "args": {}}).encode()
        sent[command_id] = time.time() * 1000
        sender.producer.produce(sender.settings.commands_topic, value,
                                rng.choice(devices).encode())
        sender.producer.poll(0)
    sender.producer.flush(10)
    return sent


def kafka_hop(settings: Settings, rate: float, seconds: float) -> dict:
    """The baseline, in the same run: one Kafka hop (produce with acks=all -> a consumer that
    waits for it) at the same rate; a command round trip makes two such hops."""
    topic = f"bench.kafka-hop.{uuid.uuid4().hex[:6]}"
    ensure_topic(settings.kafka_bootstrap, topic, settings.kafka_partitions)
    reader = Consumer(settings.kafka_client(**{
        "group.id": f"bench-hop-{uuid.uuid4().hex[:6]}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "fetch.wait.max.ms": 5}))
    reader.subscribe([topic])
    wait_until(lambda: reader.poll(0.1) is None and reader.assignment(), 30,
               message="the baseline reader's partitions")
    producer = Producer(settings.kafka_client(**{"linger.ms": 1, "acks": "all"}))
    hops, started = [], time.monotonic()
    for number in range(int(rate * seconds)):
        while (wait := started + number / rate - time.monotonic()) > 0:
            hops += [time.time() * 1000 - float(m.value()) for m in reader.consume(100, wait)
                     if m.error() is None]
        producer.produce(topic, str(time.time() * 1000).encode(), str(number).encode())
        producer.poll(0)
    producer.flush(10)
    deadline = time.monotonic() + 5
    while len(hops) < int(rate * seconds) and time.monotonic() < deadline:
        hops += [time.time() * 1000 - float(m.value()) for m in reader.consume(100, 0.1)
                 if m.error() is None]
    reader.close()
    return {"p50_ms": percentile(hops, 50), "p99_ms": percentile(hops, 99)}


def settle(sender: CommandSender, command_ids, timeout: float) -> None:
    """Read feedback until every command id has a final record, or `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(not sender.finals(c) for c in command_ids):
        sender.read(0.1)


def latencies(sender: CommandSender, sent: dict[str, float]) -> tuple[list[float], dict, dict]:
    """Round trip (ms) per command with a final record, the count per final status, and where
    the time went (p50 and p99 ms of each leg): Kafka to the relay's confirmed publish
    (`sent_at`), from there to the reply's handling (`completed_at`), then into Kafka."""
    times, statuses, legs = [], {}, {"to_relay_publish": [], "device_round_trip": [],
                                     "feedback_to_kafka": []}
    for command_id, sent_ms in sent.items():
        finals = sender.finals(command_id)
        if finals:
            final = finals[0]
            statuses[final["status"]] = statuses.get(final["status"], 0) + 1
            times.append(final["_kafka_ms"] - sent_ms)
            if final.get("sent_at"):
                legs["to_relay_publish"].append(final["sent_at"] - sent_ms)
                legs["device_round_trip"].append(final["completed_at"] - final["sent_at"])
                legs["feedback_to_kafka"].append(final["_kafka_ms"] - final["completed_at"])
    return times, statuses, {leg: {"p50_ms": percentile(values, 50),
                                   "p99_ms": percentile(values, 99)}
                             for leg, values in legs.items()}


class TimedSender(CommandSender):
    """A CommandSender that keeps each feedback record's Kafka timestamp (ms) as `_kafka_ms`."""

    def read(self, timeout: float = 0.2) -> list[dict]:
        arrived = []
        for record in self.reader.consume(1000, timeout):
            if record.error() is None:
                value = json.loads(record.value())
                value["_kafka_ms"] = record.timestamp()[1]
                self.feedback.setdefault(value.get("command_id"), []).append(value)
                arrived.append(value)
        return arrived


def run(settings: Settings, out_dir) -> dict:
    """The benchmark's figures (see the module docstring)."""
    count = int(os.environ.get("WEBOS_BENCH_COMMAND_DEVICES", "1000"))
    rate = float(os.environ.get("WEBOS_BENCH_COMMAND_RATE", "200"))
    seconds = float(os.environ.get("WEBOS_BENCH_COMMAND_SECONDS", "15"))
    log_path = Path(out_dir) / "command-latency-relay.log"
    # A line per device added and per command applied would bury the figures.
    logging.getLogger("publisher.simulator").setLevel(logging.WARNING)
    relay = AppProcess(["bridge", "relay"], {**os.environ, **settings.to_env()}, log_path, "relay")
    simulator = None
    try:
        wait_until(lambda: "waiting for commands" in relay.output(), 60,
                   message="the relay to connect", watch=[relay])
        simulator, devices = start_fleet(settings, count)
        sender = TimedSender(settings)
        warm = offered_load(sender, devices, 50, 1)
        settle(sender, warm, SETTLE_TIMEOUT)
        relay_process = psutil.Process(relay.pid)
        cpu_before = relay_process.cpu_times()
        sent = offered_load(sender, devices, rate, seconds)
        settle(sender, sent, SETTLE_TIMEOUT)
        cpu_after = relay_process.cpu_times()
        times, statuses, legs = latencies(sender, sent)
        baseline = kafka_hop(settings, rate, min(seconds, 5))
        broadcast_id = sender.send(naming.BROADCAST, "ping")
        broadcast_sent = time.time() * 1000
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while len(sender.finals(broadcast_id)) < count and time.monotonic() < deadline:
            sender.read(0.05)
        answers = sender.finals(broadcast_id)
        relay_cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        result = {
            "devices": count, "rate_target": rate, "seconds": seconds, "commands": len(sent),
            "final": len(times), "missing": len(sent) - len(times), "statuses": statuses,
            "p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90),
            "p99_ms": percentile(times, 99), "max_ms": percentile(times, 100), "legs": legs,
            "kafka_hop_baseline": baseline,
            "p99_over_kafka_hop_p99": (round(percentile(times, 99) / baseline["p99_ms"], 2)
                                       if times and baseline["p99_ms"] else None),
            "relay_cpu_percent_of_one_core": round(100 * relay_cpu / seconds, 1),
            "broadcast_devices_answered": len(answers),
            "broadcast_last_answer_ms": (round(max(a["_kafka_ms"] for a in answers)
                                               - broadcast_sent, 1) if answers else None),
        }
        sender.close()
        LOGGER.info("command round trips at %.0f/s over %d devices: p50 %s ms, p99 %s ms, max "
                    "%s ms, %d missing; broadcast: %d answers, last after %s ms", rate, count,
                    result["p50_ms"], result["p99_ms"], result["max_ms"], result["missing"],
                    len(answers), result["broadcast_last_answer_ms"])
        return result
    finally:
        if simulator is not None:
            simulator.close()
        relay.stop()
