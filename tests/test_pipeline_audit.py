"""The whole pipeline under faults, audited: every published seq is in Kafka, in order per device.

Each test runs `python -m publisher` and `python -m bridge` as real processes through
bench/pipeline_run.py (its own devices, its own Kafka topic), injects one fault mid-stream from the test
thread, then audits Kafka: zero missing and zero out of order; duplicates are reported (printed)
and allowed. A broker a test stops is its own (started here on free ports): the session's are
never stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import time
from collections import Counter

import pika
import pytest

from bench.common import queue_depth
from bench.pipeline_run import PipelineRun
from bridge.options import BridgeOptions
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from rabbitmq.naming import DEAD_QUEUE_HEADER, DEAD_REASON_HEADER, NOT_JSON, NOT_OBJECT, TOO_LARGE
from common.config import Settings
from stack.kafka_server import LocalKafka
from stack.local import fresh_settings
from stack.process import free_port
from stack.rabbitmq_server import LocalRabbitMQ
from tests.helpers import RESTART_RECONNECT_MAX, wait_for

pytestmark = pytest.mark.faults

# How long Kafka stays down in the outage test (the issue asks for 30 s).
KAFKA_OUTAGE_SECONDS = float(os.environ.get("WEBOS_FAULT_KAFKA_OUTAGE", "30"))


def report_line(name: str, report) -> None:
    """Shown with -s and in the log of a failing test: the figures a reader wants."""
    print(f"\n{name}: {report.summary()}")


@pytest.fixture
def own_kafka(tmp_path):
    """A Kafka only this test stops and starts."""
    kafka = LocalKafka(tmp_path / "kafka", port=free_port(), controller_port=free_port())
    kafka.start()
    try:
        kafka.wait_ready()
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def own_rabbitmq(tmp_path, settings):
    """A RabbitMQ only this test restarts (topology applied); Kafka is the session's."""
    own = fresh_settings(tmp_path, kafka_bootstrap=settings.kafka_bootstrap,
                         kafka_topic=settings.kafka_topic,
                         reconnect_max_seconds=RESTART_RECONNECT_MAX)
    broker = LocalRabbitMQ(tmp_path / "rabbitmq", own, node_name=f"webos-audit-{os.getpid()}",
                           dist_port=free_port())
    broker.start()
    try:
        broker.wait_ready()
        topology.apply(own)
        broker.settings_for_test = own
        yield broker
    finally:
        broker.stop()


# ---------------------------------------------------------------------------------------------
# 1. kill -9 of the bridge, twice, during a stream of 20,000 messages from 100 devices

@pytest.mark.pipeline
def test_bridge_killed_twice_mid_stream_loses_nothing(settings, tmp_path):
    with PipelineRun(settings, tmp_path, devices=100, messages=20_000) as run:
        run.start()
        for at in (5_000, 12_000):
            run.wait_published(at)
            assert (run.bridge_metric("webos_bridge_acked_total") or 0) > 0  # it was forwarding
            assert run.kill_bridge() == -signal.SIGKILL
            run.start_bridge()  # consumes every queue again before the stream goes on
        report = run.finish()
    report_line("bridge kill -9 twice", report)
    assert report.published >= 20_000 and report.dropped == 0
    assert report.missing == 0, report.summary()
    assert report.out_of_order == 0, report.summary()
    assert report.unexpected == 0 and report.foreign == 0
    assert report.ok
    assert report.figures["bridges_started"] == 3
    assert report.figures["bridge_exit_codes"] == [-signal.SIGKILL, -signal.SIGKILL, 0]
    # Duplicates come only from the two killed bridges' in-flight windows (default --prefetch).
    assert report.duplicated <= 2 * BridgeOptions().prefetch


# ---------------------------------------------------------------------------------------------
# 2. Kafka stopped mid-stream, messages wait in RabbitMQ, all arrive once it is back

def test_kafka_outage_mid_stream_messages_wait_in_rabbitmq_then_all_arrive(
        settings, own_kafka, tmp_path):
    own = dataclasses.replace(settings, kafka_bootstrap=own_kafka.bootstrap)
    rate = 200  # 20 devices every 0.1 s
    # Enough messages that the devices keep publishing through the whole outage and after it.
    messages = 1_000 + int(rate * (KAFKA_OUTAGE_SECONDS + 8))
    with PipelineRun(own, tmp_path, devices=20, messages=messages, interval=(0.1, 0.1)) as run:
        run.start()
        run.wait_published(1_000)
        wait_for(lambda: run.tally.count > 0, 30, message="records in Kafka before the outage")
        own_kafka.stop()
        run.note("Kafka stopped")
        watched = run.queues[0]
        depths = []
        outage_ends = time.monotonic() + KAFKA_OUTAGE_SECONDS
        while time.monotonic() < outage_ends:  # the outage's length, sampled once a second
            depths.append(queue_depth(settings, watched))
            assert run.bridge.running, run.bridge.output()
            time.sleep(1.0)
        published_during_outage = run.published
        own_kafka.start()
        own_kafka.wait_ready()
        run.note(f"Kafka started again; {watched} depth samples {depths}")
        report = run.finish(timeout=180)
    report_line(f"Kafka down {KAFKA_OUTAGE_SECONDS:.0f} s", report)
    # While Kafka was down the messages waited in RabbitMQ, more and more of them.
    seen = [d for d in depths if d]
    assert seen, f"the management API never showed messages in {watched}: {depths}"
    assert max(seen) > seen[0], f"the depth of {watched} did not grow: {depths}"
    assert published_during_outage < report.published  # the stream went on after the outage
    assert report.missing == 0, report.summary()
    assert report.out_of_order == 0, report.summary()
    assert report.unexpected == 0 and report.foreign == 0 and report.dropped == 0
    assert report.ok
    assert report.figures["bridges_started"] == 1  # the same bridge, it never exited
    assert report.figures["bridge_exit_codes"] == [0]


# ---------------------------------------------------------------------------------------------
# 3. RabbitMQ restarted mid-stream: devices and bridge reconnect by themselves

def test_rabbitmq_restart_mid_stream_loses_nothing_it_accepted(own_rabbitmq, tmp_path):
    own = own_rabbitmq.settings_for_test
    with PipelineRun(own, tmp_path, devices=50, messages=10_000, interval=(0.1, 0.1)) as run:
        run.start()
        run.wait_published(2_000)
        assert (run.bridge_metric("webos_bridge_acked_total") or 0) > 0
        own_rabbitmq.stop()  # a clean stop: durable queues and persistent messages survive
        run.note("RabbitMQ stopped")
        wait_for(lambda: not any(row["connected"] for row in run.read_devices().values()), 30,
                 message="the devices to notice the broker is gone")
        acked_before_restart = sum(row["acked"] for row in run.rows.values())
        own_rabbitmq.start()
        own_rabbitmq.wait_ready()
        run.note("RabbitMQ started again")
        wait_for(lambda: all(row["connected"] for row in run.read_devices().values()), 90,
                 interval=0.5, message="every device reconnected by itself")
        run.note("every device reconnected")
        wait_for(lambda: (run.bridge_metric("webos_bridge_reconnects_total") or 0) >= 1, 90,
                 interval=0.5, message="the bridge reconnected by itself")
        run.note("the bridge reconnected")
        report = run.finish(timeout=180)
    report_line("RabbitMQ restart", report)
    # The devices published during the restart too and RabbitMQ acknowledged all of it in the
    # end (finish waits until acked == messages per device): "accepted" is every message.
    assert report.acked > acked_before_restart
    assert report.acked == report.published and report.dropped == 0
    assert report.missing == 0, report.summary()
    assert report.unexpected == 0 and report.foreign == 0
    assert report.figures["bridges_started"] == 1 and report.figures["bridge_exit_codes"] == [0]
    # Each device's order holds across the reconnect too: what it published while the CONNACK
    # was on its way waited behind the outage's backlog (publisher/simulator.py, _publish).
    assert report.out_of_order == 0, report.summary()
    assert report.ok


# ---------------------------------------------------------------------------------------------
# 5. Bad input at volume: 1,000 malformed payloads mixed into a good stream

TWO_MB = 2 * 1024 * 1024


def malformed_payload(index: int) -> tuple[bytes, str]:
    """The index-th malformed payload and the reason the bridge must park it with."""
    kind = index % 5
    if index % 100 == 0:  # 10 of the 1,000: 2 MB, half a valid JSON object, half binary
        if index % 200 == 0:
            return b'{"pad": "' + b"x" * TWO_MB + b'"}', TOO_LARGE
        return b"\xff" * TWO_MB, TOO_LARGE
    if kind == 0:
        return f"not json {index}".encode(), NOT_JSON
    if kind == 1:
        return b"\xff\xfe\x00" + os.urandom(61), NOT_JSON  # binary, not UTF-8
    if kind == 2:
        return f'{{"seq": {index}, "msg_id": "truncated'.encode(), NOT_JSON
    if kind == 3:
        return f"[{index}, 2, 3]".encode(), NOT_OBJECT
    return f'"a JSON string {index}"'.encode(), NOT_OBJECT


def parked_for(settings: Settings, queues: set[str], count: int, timeout: float = 60.0) -> list:
    """(reason, body) of `count` messages parked in webos.dead for `queues` (acked, so removed)."""
    found = []
    with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
        channel = connection.channel()

        def collect():
            while len(found) < count:
                method, properties, body = channel.basic_get(naming.DEAD_QUEUE)
                if method is None:
                    return False
                headers = properties.headers or {}
                if headers.get(DEAD_QUEUE_HEADER) in queues:
                    channel.basic_ack(method.delivery_tag)
                    found.append((headers.get(DEAD_REASON_HEADER), body))
                # Other tests' parked messages stay unacked and return to the queue at close.
            return True

        wait_for(collect, timeout, interval=0.1, message=f"{count} parked messages")
    return found


def test_malformed_payloads_at_volume_are_parked_and_the_good_stream_is_complete(
        settings, tmp_path):
    count = 1_000
    with PipelineRun(settings, tmp_path, devices=20, messages=6_000, interval=(0.05, 0.05)) as run:
        run.start()
        run.wait_published(500)
        sent = []
        # Over AMQP as webos-admin, onto the route each device's messages take: a device's own
        # certificate may publish only as that device, and its MQTT session is the publisher's.
        with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for index in range(count):
                payload, reason = malformed_payload(index)
                target = run.devices[index % len(run.devices)]
                channel.basic_publish(
                    naming.TOPIC_EXCHANGE,
                    naming.routing_key(target, naming.MESSAGE_TYPES[index % 3]), payload,
                    pika.BasicProperties(delivery_mode=2), mandatory=True)  # raises if refused
                sent.append((reason, hashlib.sha256(payload).hexdigest()))
        published_meanwhile = run.published
        run.note(f"{count} malformed payloads confirmed by RabbitMQ")
        report = run.finish()
        parked = parked_for(settings, set(run.queues), count)
    report_line("1,000 malformed payloads", report)
    assert published_meanwhile < report.published  # they were mixed into a running stream
    assert Counter(reason for reason, _ in parked) == Counter(reason for reason, _ in sent)
    assert sorted((reason, hashlib.sha256(body).hexdigest()) for reason, body in parked) \
        == sorted(sent)  # each parked unchanged, with the reason that fits it
    assert report.missing == 0, report.summary()
    assert report.out_of_order == 0, report.summary()
    assert report.foreign == 0  # no malformed payload reached Kafka
    assert report.unexpected == 0 and report.duplicated == 0 and report.dropped == 0
    assert report.ok


# ---------------------------------------------------------------------------------------------
# 6. RabbitMQ's disk alarm mid-stream: devices are blocked, buffer, and resend once it clears

def node_status(settings: Settings) -> dict:
    """The (one) node's disk figures and alarm, from the management API (which has them a few
    seconds after the node started, once it collected its first statistics)."""
    def read() -> dict | None:
        with endpoints.management_api(settings) as http:
            node, = http.get(f"{settings.management_url}/api/nodes", timeout=10).json()
        return node if "disk_free_alarm" in node else None
    return wait_for(read, 30, interval=0.5, message="the node's disk statistics")


def test_a_disk_alarm_blocks_the_devices_which_keep_what_they_can_and_count_the_rest(
        own_rabbitmq, tmp_path):
    """RabbitMQ's documented back-pressure: under a disk alarm it stops reading from publishing
    connections. Each simulated device then holds its unacknowledged messages (up to
    --max-queued, shown as webos_publisher_waiting) and counts what does not fit
    (webos_publisher_dropped); after the alarm clears it hands everything it held over. Kafka
    then holds every message a device kept, and exactly the dropped ones are missing."""
    own = own_rabbitmq.settings_for_test
    limit = node_status(own)["disk_free_limit"]
    with PipelineRun(own, tmp_path, devices=10, messages=2_000, interval=(0.1, 0.1),
                     max_queued=30) as run:
        run.start()
        run.wait_published(200)
        # A limit above what is free raises the alarm (the way to force it).
        forced = own_rabbitmq.rabbitmqctl("set_disk_free_limit", str(node_status(own)["disk_free"] * 2))
        assert forced.returncode == 0, forced.stderr
        try:
            wait_for(lambda: node_status(own)["disk_free_alarm"], 30, message="the disk alarm")
            run.note("disk alarm raised")
            # Blocked: no acknowledgement comes; every device fills its buffer and then drops.
            wait_for(lambda: all(row["dropped"] > 0 for row in run.read_devices().values()), 60,
                     interval=0.5, message="every device's buffer full")
            metrics = run._http.get(run.publisher_url + "/metrics", timeout=10).text
            waiting = [float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("webos_publisher_waiting{") and run.devices[0] in line]
            assert waiting == [30.0], waiting
        finally:
            restored = own_rabbitmq.rabbitmqctl("set_disk_free_limit", str(limit))
            assert restored.returncode == 0, restored.stderr
        wait_for(lambda: not node_status(own)["disk_free_alarm"], 30, message="the alarm to clear")
        run.note("disk alarm cleared")
        report = run.finish(timeout=180)
    report_line("disk alarm", report)
    # Each seq a device gave out was either kept (RabbitMQ acknowledged it in the end, and it is
    # in Kafka) or dropped and counted; exactly the counted ones are missing.
    assert report.dropped > 0
    assert report.acked + report.dropped == report.published, report.summary()
    assert report.arrived == report.acked, report.summary()
    assert report.missing == report.dropped, report.summary()
    assert report.out_of_order == 0 and report.unexpected == 0, report.summary()
