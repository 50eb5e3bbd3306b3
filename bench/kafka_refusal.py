"""A topic authorization failure that lasts minutes: what it costs the bridge.

On a Kafka of its own that checks ACLs (SCRAM users over SASL_SSL), one device publishes
WEBOS_BENCH_REFUSAL_RATE messages a second (default 20) through the bridge. Three windows of
WEBOS_BENCH_REFUSAL_SECONDS each (default 60, to keep `make bench` within 25 minutes):
- baseline: Write allowed, everything flows; the bridge's CPU in % of one core;
- refused: a DENY Write ACL on the device's topic; the bridge holds the device's messages and
  backs off (bridge/backoff.py); its CPU, and the lines it logged;
- recovery: the ACL removed; the seconds until every message published so far is in Kafka, and
  the audit of the device's sequence (missing, out of order).
The CPU figures are a ratio against the baseline measured in the same run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pika
import psutil

from bench.common import start_bridge, write_figures
from common.config import Settings
from common.pki import PKI
from rabbitmq import endpoints, naming, topology
from stack.kafka_server import (AUTHORIZER, LocalKafka, SecureListener, TopicAcls, TopicReader,
                                ensure_topic)
from stack.process import free_port, wait_until

COMMAND = ".venv/bin/python -m bench kafka_refusal  (WEBOS_BENCH_REFUSAL_SECONDS=120)"


def _say(text: str) -> None:
    print(f"[kafka_refusal] {text}", flush=True)


class Publisher(threading.Thread):
    """One device's messages onto webos.topic at `rate` a second, seq 0, 1, ... (confirmed)."""

    def __init__(self, settings: Settings, device: str, rate: float):
        super().__init__(daemon=True)
        self.settings, self.device, self.rate = settings, device, rate
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with pika.BlockingConnection(endpoints.admin_parameters(self.settings)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            started = time.monotonic()
            while not self.stop.is_set():
                body = json.dumps({"id": self.device, "seq": self.sent,
                                   "msg_id": f"{self.device}-{self.sent}"}).encode()
                channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(self.device, "info"),
                                      body, pika.BasicProperties(delivery_mode=2))
                self.sent += 1
                self.stop.wait(max(0.0, started + self.sent / self.rate - time.monotonic()))


def _cpu_percent(process: psutil.Process, seconds: float) -> float:
    """The process's CPU over the next `seconds`, in % of one core."""
    before = process.cpu_times()
    time.sleep(seconds)  # the measured window itself
    after = process.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    return round(100 * used / seconds, 2)


class SeqReader(TopicReader):
    """The seqs of the run's topic, as they arrive."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(bootstrap, topic, partitions=1)
        self.seqs: list[int] = []

    def on_record(self, record) -> None:
        if record.error() is None:
            self.seqs.append(json.loads(record.value())["seq"])


def run(settings: Settings, out_dir: Path) -> dict:
    seconds = float(os.environ.get("WEBOS_BENCH_REFUSAL_SECONDS", "60"))
    rate = float(os.environ.get("WEBOS_BENCH_REFUSAL_RATE", "20"))
    work = Path(tempfile.mkdtemp(prefix="webos-refusal-"))
    listener = SecureListener(port=free_port(), pki=PKI(settings.pki_path),
                              users={"webos-bridge": secrets.token_urlsafe(12)})
    kafka = LocalKafka(work / "kafka", port=free_port(), controller_port=free_port(),
                       secure=listener, overrides=AUTHORIZER)
    device = f"REF{uuid.uuid4().hex[:6]}"
    topic = f"bench.refusal.{device}"
    kafka.start()
    publisher = bridge = None
    try:
        kafka.wait_ready()
        acls = TopicAcls(kafka.bootstrap, "webos-bridge")
        acls.grant_all()
        ensure_topic(kafka.bootstrap, topic, 1)
        topology.declare_devices(settings, [device])
        as_bridge = dataclasses.replace(settings, **listener.client("webos-bridge"))
        bridge, _ = start_bridge(as_bridge, [naming.device_queue(device)], work / "bridge.log",
                                 ["--topic-template", topic, "--no-presence"])
        process = psutil.Process(bridge.process.pid)
        publisher = Publisher(settings, device, rate)
        publisher.start()
        _say(f"baseline: {rate:g} msg/s through the bridge for {seconds:g} s")
        baseline = _cpu_percent(process, seconds)
        acls.deny_write(topic)
        lines_before = len(bridge.output().splitlines())
        _say(f"refused: Write denied on {topic} for {seconds:g} s")
        refused = _cpu_percent(process, seconds)
        log_lines = len(bridge.output().splitlines()) - lines_before
        acls.allow_write(topic)
        allowed_at = time.monotonic()
        publisher.stop.set()
        publisher.join(10)
        _say(f"allowed again: waiting for all {publisher.sent} messages in Kafka")
        reader = SeqReader(kafka.bootstrap, topic).start()
        try:
            wait_until(lambda: len(set(reader.seqs)) >= publisher.sent, 10 * seconds, 0.1,
                       f"all {publisher.sent} messages in Kafka")
        except TimeoutError:
            pass  # what did not arrive is counted as missing below
        finally:
            reader.stop()
        seqs = list(reader.seqs)
        recovered = round(time.monotonic() - allowed_at, 1)
        first_seen = list(dict.fromkeys(seqs))
        figures = {
            "seconds_per_window": seconds, "rate_msgs_per_s": rate,
            "bridge_cpu_percent_baseline": baseline, "bridge_cpu_percent_refused": refused,
            "refused_over_baseline": round(refused / baseline, 2) if baseline else None,
            "bridge_log_lines_while_refused": log_lines,
            "log_lines_per_minute_refused": round(log_lines * 60 / seconds, 1),
            "seconds_to_deliver_all_after_allow": recovered,
            "published": publisher.sent, "missing": publisher.sent - len(set(seqs)),
            "out_of_order": int(first_seen != sorted(first_seen)),
            "duplicates": len(seqs) - len(set(seqs)),
        }
        _say(json.dumps(figures))
        write_figures(out_dir, "kafka_refusal", COMMAND, figures)
        return figures
    finally:
        if publisher is not None:
            publisher.stop.set()
        if bridge is not None:
            bridge.stop()
        kafka.stop()
