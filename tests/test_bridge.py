"""`python -m bridge` as a real process against the session's real RabbitMQ and Kafka.

Each test uses its own devices (new_device) and its own Kafka topic, so records never mix.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pika
import psutil
import pytest
import requests
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                  NewTopic, ResourceType)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge.options import BridgeOptions
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq.naming import DEAD_QUEUE_HEADER, DEAD_REASON_HEADER
from common.config import Settings
from stack.kafka_server import LocalKafka, ensure_topic
from stack.process import AppProcess, free_port
from tests.helpers import MqttDevice, dead_command, queue_depth, read_records, wait_for
from tests.support.bridge import BridgeProcess, body


@pytest.fixture
def bridges(settings, tmp_path):
    """Start bridges with `bridges(*flags)`; any left running are killed after the test."""
    started: list[BridgeProcess] = []

    def start(*flags: str, env: dict | None = None, on: Settings | None = None) -> BridgeProcess:
        bridge = BridgeProcess(on or settings, tmp_path, *flags, env=env)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.kill()
        print(f"--- output of {bridge.log_path.name} ---\n{bridge.output}")  # shown on failure


def device_client(settings: Settings, device: str) -> MqttDevice:
    client = MqttDevice(settings, device)
    assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
    return client


def seqs_of(records, device: str) -> list[int]:
    return [json.loads(r.value())["seq"] for r in records if r.key() == device.encode()]


@pytest.mark.pipeline
def test_every_mqtt_message_reaches_kafka_with_key_headers_and_order(
        settings, new_device, bridges, kafka_topic, admin_channel):
    devices = [new_device("K"), new_device("K")]
    bridge = bridges("--queues", ",".join(naming.device_queue(d) for d in devices),
                     "--topic-template", kafka_topic)
    bridge.wait_consuming(2)
    assert requests.get(bridge.url + "/healthz", timeout=2).status_code == 200
    sent = {}
    clients = [device_client(settings, d) for d in devices]
    try:
        for seq in range(60):
            for client, device in zip(clients, devices):
                message_type = naming.MESSAGE_TYPES[seq % 3]
                payload = body(device, seq)
                sent[(device, seq)] = (message_type, payload)
                assert client.publish(naming.mqtt_topic(device, message_type), payload)
    finally:
        for client in clients:
            client.close()

    records = read_records(settings, kafka_topic, lambda got: len(got) >= len(sent))
    assert len(records) == len(sent)
    for record in records:
        headers = {name: value.decode() for name, value in record.headers()}
        device = record.key().decode()
        seq = json.loads(record.value())["seq"]
        message_type, payload = sent[(device, seq)]
        assert record.value() == payload  # the bytes, unchanged
        assert headers == {"routing_key": naming.routing_key(device, message_type),
                           "mqtt_topic": naming.mqtt_topic(device, message_type),
                           "device": device, "type": message_type,
                           "queue": naming.device_queue(device), "msg_id": f"{device}-{seq}"}
    for device in devices:
        assert seqs_of(records, device) == list(range(60))  # per-device order kept

    wait_for(lambda: bridge.metric("webos_bridge_acked_total") == len(sent), 10,
             message="every delivery acked")
    samples = bridge.metrics()
    assert samples["webos_bridge_consumed_total"] == len(sent)
    assert samples["webos_bridge_produced_total"] == len(sent)
    assert samples["webos_bridge_in_flight"] == 0
    assert samples["webos_bridge_delivery_latency_seconds_count"] == len(sent)
    assert bridge.stop(signal.SIGTERM) == 0
    assert "bridge stopped: consumed=120 produced=120 acked=120" in bridge.output
    for device in devices:  # acked, not merely delivered: nothing came back when it disconnected
        assert queue_depth(admin_channel, naming.device_queue(device)) == 0


def test_mqtt5_content_type_and_user_properties_reach_kafka_as_headers(
        settings, new_device, bridges, kafka_topic):
    device = new_device("M")
    bridge = bridges("--queues", naming.device_queue(device), "--topic-template", kafka_topic)
    bridge.wait_consuming(1)
    client = MqttDevice(settings, device, protocol=mqtt.MQTTv5)
    assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
    properties = Properties(PacketTypes.PUBLISH)
    properties.ContentType = "application/json"
    # A user property named like one of the bridge's headers cannot pose as it.
    properties.UserProperty = [("site", "hall 3"), ("device", "someone-else")]
    try:
        assert client.publish(naming.mqtt_topic(device, "info"), body(device, 1), properties=properties)
        assert client.publish(naming.mqtt_topic(device, "info"), body(device, 2))
    finally:
        client.close()

    first, second = read_records(settings, kafka_topic, lambda got: len(got) >= 2)
    headers = dict((name, value.decode()) for name, value in first.headers())
    assert headers["device"] == device
    assert (headers["content_type"], headers["user.site"], headers["user.device"]) == (
        "application/json", "hall 3", "someone-else")
    assert not any(name.startswith("user.") or name == "content_type"
                   for name, _ in second.headers())  # a message without properties adds none


def test_new_device_queue_is_consumed_within_5_s(settings, new_device, bridges, kafka_topic):
    prefix = f"N{uuid.uuid4().hex[:6]}"
    first = new_device(prefix)
    bridge = bridges("--queue-pattern", rf"^webos\.{prefix}", "--topic-template", kafka_topic)
    bridge.wait_consuming(1)
    device = new_device(prefix)
    declared = time.monotonic()
    wait_for(lambda: bridge.metric("webos_bridge_queues") >= 2, 5,
             message=f"the bridge to consume webos.{device} within 5 s")
    picked_up = time.monotonic() - declared
    client = device_client(settings, device)
    try:
        assert client.publish(naming.mqtt_topic(device, "info"), body(device, 0))
    finally:
        client.close()
    records = read_records(settings, kafka_topic, lambda got: len(got) >= 1)
    assert records[0].key() == device.encode()
    assert first != device and picked_up < 5
    assert bridge.stop(signal.SIGINT) == 0


def test_queue_events_bring_new_queues_without_waiting_for_a_listing(
        settings, new_device, bridges, kafka_topic, admin_channel):
    prefix = f"E{uuid.uuid4().hex[:6]}"
    new_device(prefix)
    # One listing at start, the next only after 10 minutes: what follows is the event exchange's.
    bridge = bridges("--queue-pattern", rf"^webos\.{prefix}", "--topic-template", kafka_topic,
                     "--discovery-interval", "600")
    bridge.wait_consuming(1)
    assert "no queue events" not in bridge.output
    device = new_device(prefix)
    wait_for(lambda: bridge.metric("webos_bridge_queues") >= 2, 5,
             message=f"the bridge to consume webos.{device} from its queue.created event")
    topology.delete_device(admin_channel, device)
    wait_for(lambda: bridge.metric("webos_bridge_queues") == 1, 5,
             message="the bridge to drop the deleted queue")
    assert bridge.stop(signal.SIGINT) == 0


def dead_messages_of(admin_channel, queue: str, count: int, timeout: float = 20.0) -> dict:
    """Messages parked for `queue` in webos.dead, by reason; others are left there."""
    found = {}

    def collect():
        method, properties, payload = admin_channel.basic_get(naming.DEAD_QUEUE, auto_ack=False)
        if method is None:
            return False
        headers = properties.headers or {}
        if headers.get(DEAD_QUEUE_HEADER) == queue:
            admin_channel.basic_ack(method.delivery_tag)
            found[headers[DEAD_REASON_HEADER]] = (headers, payload)
        return len(found) >= count

    wait_for(collect, timeout, interval=0.01, message=f"{count} parked messages of {queue}")
    return found


def bridge_to_a_50_kb_topic(settings, bridges, device):
    """(topic, admin client, bridge): `device`'s own topic, taking at most 50 kB, and a bridge
    consuming its queue into topic template test.bridge.{device}. A 100 kB JSON object passes
    the bridge's own size check (1 MB; the template hides which topic it is at start) and Kafka
    refuses it (kafka-rejected)."""
    topic = f"test.bridge.{device}"
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1, config={"max.message.bytes": "50000"})])[topic] \
        .result(30)
    bridge = bridges("--queues", naming.device_queue(device), "--topic-template",
                     "test.bridge.{device}")
    bridge.wait_consuming(1)
    return topic, admin, bridge


@pytest.mark.pipeline
def test_poison_messages_are_parked_with_reasons_and_the_queue_keeps_flowing(
        settings, new_device, bridges, admin_channel):
    device = new_device("P")
    queue = naming.device_queue(device)
    topic, admin, bridge = bridge_to_a_50_kb_topic(settings, bridges, device)
    client = device_client(settings, device)
    try:
        assert client.publish(naming.mqtt_topic(device, "info"), body(device, 0))
        assert client.publish(naming.mqtt_topic(device, "error"), b"\x00 not json")
        assert client.publish(naming.mqtt_topic(device, "warning"), b"[1, 2, 3]")
        records = read_records(settings, topic, lambda got: len(got) >= 1)
        properties = pika.BasicProperties(delivery_mode=2)
        admin_channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(device, "info"),
                                    b'{"pad": "' + b"x" * 1_200_000 + b'"}', properties)
        admin_channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(device, "info"),
                                    body(device, 1, pad="y" * 100_000), properties)
        assert client.publish(naming.mqtt_topic(device, "info"), body(device, 2))
    finally:
        client.close()
    parked = dead_messages_of(admin_channel, queue, 4)
    assert set(parked) == {"not-json", "not-a-json-object", "too-large", "kafka-rejected"}
    assert parked["not-json"][1] == b"\x00 not json"  # parked unchanged
    assert parked["not-a-json-object"][0]["x-webos-routing-key"] == \
        naming.routing_key(device, "warning")
    assert "MSG_SIZE_TOO_LARGE" in parked["kafka-rejected"][0]["x-webos-dead-detail"]
    records = read_records(settings, topic, lambda got: len(got) >= 2)
    assert seqs_of(records, device) == [0, 2]  # the good message after the poison still flows
    wait_for(lambda: bridge.metric("webos_bridge_acked_total") == 6, 10, message="all acked")
    samples = bridge.metrics()
    for reason in ("not-json", "not-a-json-object", "too-large", "kafka-rejected"):
        assert samples[f'webos_bridge_dead_lettered_total{{reason="{reason}"}}'] == 1
    assert bridge.stop() == 0
    assert queue_depth(admin_channel, queue) == 0


def publish_in_background(settings: Settings, device: str, count: int):
    """A thread publishing seq 0..count-1 over MQTT as fast as PUBACKs come; returns it started."""
    failures = []

    def publish():
        client = device_client(settings, device)
        try:
            for seq in range(count):
                if not client.publish(naming.mqtt_topic(device, "info"), body(device, seq)):
                    failures.append(seq)
        finally:
            client.close()

    thread = threading.Thread(target=publish, daemon=True)
    thread.failures = failures
    thread.start()
    return thread


def assert_complete_and_ordered(records, device: str, count: int) -> int:
    """Every seq arrived; first arrivals are in order; returns the number of duplicates."""
    seqs = seqs_of(records, device)
    assert set(seqs) == set(range(count))
    first_seen = list(dict.fromkeys(seqs))
    assert first_seen == sorted(first_seen)
    return len(seqs) - count


def test_dead_list_shows_parked_messages_and_leaves_them_in_place(
        settings, new_device, bridges, admin_channel):
    device = new_device("DL")
    queue = naming.device_queue(device)
    bridge = bridges("--queues", queue)
    bridge.wait_consuming(1)
    properties = pika.BasicProperties(delivery_mode=2)
    for payload in (b"\x00 not json", b"[1, 2, 3]"):
        admin_channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(device, "info"),
                                    payload, properties)
    wait_for(lambda: sum(bridge.metric(f'webos_bridge_dead_lettered_total{{reason="{reason}"}}')
                         for reason in ("not-json", "not-a-json-object")) >= 2, 20,
             message="both messages parked")
    assert bridge.stop(signal.SIGINT) == 0
    depth = queue_depth(admin_channel, naming.DEAD_QUEUE)

    def dead_list(*flags):
        return dead_command(settings, "list", *flags)
    listed = dead_list("--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert dead_list("--format", "json").stdout == listed.stdout  # same messages, same order
    ours = [json.loads(line) for line in listed.stdout.splitlines()
            if json.loads(line)["queue"] == queue]
    assert [(row["device"], row["reason"], row["size"], row["routing_key"]) for row in ours] == [
        (device, "not-json", 10, naming.routing_key(device, "info")),
        (device, "not-a-json-object", 9, naming.routing_key(device, "info"))]
    assert all(row["parked_at"] and row["detail"] for row in ours)
    # Nothing was taken out.
    assert queue_depth(admin_channel, naming.DEAD_QUEUE) == depth
    table = dead_list()
    assert table.returncode == 0 and f"{depth} message(s) in webos.dead" in table.stdout
    assert device in table.stdout and "not-a-json-object" in table.stdout


def parked_rows(settings: Settings, device: str) -> list[dict]:
    listed = dead_command(settings, "list", "--device", device, "--format", "json",
                          "--limit", "100000")
    assert listed.returncode == 0, listed.stderr
    return [json.loads(line) for line in listed.stdout.splitlines()]


def test_dead_redrive_forwards_what_was_fixed_and_parks_again_what_was_not(
        settings, new_device, bridges, admin_channel):
    device = new_device("RD")
    topic, admin, bridge = bridge_to_a_50_kb_topic(settings, bridges, device)
    properties = pika.BasicProperties(delivery_mode=2)
    for payload in (b"\x00 not json", b"[1, 2, 3]", body(device, 1, pad="y" * 100_000),
                    b'{"pad": "' + b"x" * 1_200_000 + b'"}'):
        admin_channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(device, "info"),
                                    payload, properties)
    wait_for(lambda: bridge.metric("webos_bridge_acked_total") == 4, 30, message="all 4 parked")
    rows = parked_rows(settings, device)
    assert sorted(row["reason"] for row in rows) == [
        "kafka-rejected", "not-a-json-object", "not-json", "too-large"]
    assert all(row["redrives"] == 0 and row["history"] == [] for row in rows)

    # The cause of kafka-rejected fixed: the topic takes 2 MB now.
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[ConfigEntry(
        "max.message.bytes", "2000000", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([resource])[resource].result(30)
    redrive = dead_command(settings, "redrive", "--device", device, "--reason", "kafka-rejected")
    assert redrive.returncode == 0, redrive.stderr
    assert "redriven 1 of 1" in redrive.stdout
    records = read_records(settings, topic, lambda got: len(got) >= 1)
    assert seqs_of(records, device) == [1]
    assert dict(records[0].headers())["user.x-webos-redrives"] == b"1"  # Kafka sees it came back

    # not-json cannot be fixed: the bridge parks it again, counted, with its first parking.
    redrive = dead_command(settings, "redrive", "--device", device, "--reason", "not-json")
    assert redrive.returncode == 0 and "redriven 1 of 1" in redrive.stdout, redrive.stderr
    wait_for(lambda: bridge.metric('webos_bridge_dead_lettered_total{reason="not-json"}') == 2,
             20, message="not-json parked again")
    again = [row for row in parked_rows(settings, device) if row["reason"] == "not-json"]
    assert len(again) == 1 and again[0]["redrives"] == 1
    assert [entry["reason"] for entry in again[0]["history"]] == ["not-json"]
    # ... and a message redriven --max-redrives times stays where it is.
    held = dead_command(settings, "redrive", "--device", device, "--reason", "not-json",
                        "--max-redrives", "1")
    assert "redriven 0 of 1" in held.stdout and "redriven 1 times already" in held.stderr

    # purge asks first: a no keeps everything, --yes removes only what was selected.
    refused = dead_command(settings, "purge", "--device", device, "--reason", "too-large",
                           input="n\n")
    assert refused.returncode == 1 and "remove 1 message(s)" in refused.stderr
    assert len(parked_rows(settings, device)) == 3
    purged = dead_command(settings, "purge", "--device", device, "--reason", "too-large", "--yes")
    assert purged.returncode == 0 and "purged 1 message(s)" in purged.stdout, purged.stderr
    assert sorted(row["reason"] for row in parked_rows(settings, device)) == [
        "not-a-json-object", "not-json"]
    assert "say which messages" in dead_command(settings, "purge").stderr
    assert bridge.stop() == 0


def test_a_redrive_killed_halfway_loses_nothing(
        settings, new_device, bridges, kafka_topic, admin_channel, tmp_path):
    device = new_device("RK")
    queue = naming.device_queue(device)
    count = 5000
    for seq in range(count):  # parked as the bridge parks a message Kafka refused
        admin_channel.basic_publish("", naming.DEAD_QUEUE, body(device, seq), pika.BasicProperties(
            delivery_mode=2, timestamp=int(time.time()), headers={
                "x-webos-dead-reason": "kafka-rejected", "x-webos-dead-detail": "test",
                "x-webos-queue": queue, "x-webos-exchange": naming.TOPIC_EXCHANGE,
                "x-webos-routing-key": naming.routing_key(device, "info")}))
    wait_for(lambda: len(parked_rows(settings, device)) == count, 30, 0.2, f"{count} parked")
    redrive = AppProcess(["bridge", "dead", "redrive", "--device", device],
                         {**os.environ, **settings.to_env()}, tmp_path / "redrive.log")
    wait_for(lambda: "200 redriven" in redrive.output(), 60, interval=0.01,
             message="the redrive to report progress")
    assert redrive.kill() == -signal.SIGKILL  # halfway: it had not finished
    on_the_way = queue_depth(admin_channel, queue)
    still_parked = len(parked_rows(settings, device))
    assert 200 <= on_the_way < count
    assert on_the_way + still_parked >= count  # each one somewhere, some maybe in both

    finish = dead_command(settings, "redrive", "--device", device)
    assert finish.returncode == 0, finish.stderr
    assert parked_rows(settings, device) == []
    bridge = bridges("--queues", queue, "--topic-template", kafka_topic)
    records = read_records(settings, kafka_topic, lambda got: len(got) >= count and
                           set(seqs_of(got, device)) >= set(range(count)), 90)
    assert len(records) - count <= 1  # at most the one in flight when it was killed
    assert bridge.stop() == 0


@pytest.mark.pipeline
def test_kill_9_mid_stream_loses_nothing_and_the_standby_takes_over(
        settings, new_device, bridges, kafka_topic, admin_channel):
    device = new_device("X")
    queue = naming.device_queue(device)
    active = bridges("--queues", queue, "--topic-template", kafka_topic)
    active.wait_consuming(1)
    standby = bridges("--queues", queue, "--topic-template", kafka_topic)
    standby.wait_consuming(1)
    count = 1500
    publisher = publish_in_background(settings, device, count)
    wait_for(lambda: active.metric("webos_bridge_acked_total") >= 200, 30,
             message="the active bridge to forward some messages")
    assert standby.metric("webos_bridge_consumed_total") == 0  # single active consumer
    active.process.send_signal(signal.SIGKILL)
    assert active.process.wait(10) == -signal.SIGKILL
    publisher.join(60)
    assert not publisher.is_alive() and publisher.failures == []

    records = read_records(settings, kafka_topic,
                           lambda got: set(seqs_of(got, device)) >= set(range(count)), 90)
    duplicates = assert_complete_and_ordered(records, device, count)
    assert standby.metric("webos_bridge_consumed_total") > 0  # the standby took over mid-stream
    # At most the killed bridge's in-flight window (--prefetch, default here).
    assert duplicates <= BridgeOptions().prefetch
    print(f"kill -9 mid-stream: {count} messages, {duplicates} duplicates in Kafka")
    wait_for(lambda: queue_depth(admin_channel, queue) == 0
             and standby.metric("webos_bridge_in_flight") == 0, 30, message="queue drained")
    assert standby.stop() == 0


def test_connection_lost_reconnects_and_loses_nothing(settings, new_device, bridges, kafka_topic):
    device = new_device("R")
    bridge = bridges("--queues", naming.device_queue(device), "--topic-template", kafka_topic)
    bridge.wait_consuming(1)
    count = 2000
    publisher = publish_in_background(settings, device, count)
    wait_for(lambda: bridge.metric("webos_bridge_acked_total") >= 200, 30,
             message="some messages forwarded")
    api = f"{settings.management_url}/api/connections"
    auth = (settings.admin_user, settings.admin_password)
    # This bridge's own connection: the listing can still hold one of a bridge killed earlier.
    name = f"webos-bridge pid {bridge.process.pid}"
    connections = wait_for(lambda: [
        c["name"] for c in requests.get(api, auth=auth, verify=str(settings.ca_file), timeout=10).json()
        if (c.get("client_properties") or {}).get("connection_name") == name], 15,
        message="the management API to list the bridge's connection")
    for name in connections:  # as if RabbitMQ went away under the bridge
        closed = requests.delete(f"{api}/{requests.utils.quote(name, safe='')}", auth=auth,
                                 verify=str(settings.ca_file), timeout=10)
        assert closed.status_code == 204, (closed.status_code, closed.text)
    publisher.join(60)
    records = read_records(settings, kafka_topic,
                           lambda got: set(seqs_of(got, device)) >= set(range(count)), 90)
    assert_complete_and_ordered(records, device, count)
    wait_for(lambda: bridge.metric("webos_bridge_reconnects_total") >= 1, 30,
             message="the bridge to reconnect")
    assert bridge.stop() == 0
    assert "reconnecting" in bridge.output


def test_with_kafka_down_messages_wait_in_rabbitmq_then_all_arrive(
        settings, new_device, bridges, admin_channel, tmp_path):
    kafka = LocalKafka(tmp_path / "kafka", port=free_port(), controller_port=free_port())
    kafka.start()
    try:
        kafka.wait_ready()
        own = dataclasses.replace(settings, kafka_bootstrap=kafka.bootstrap)
        ensure_topic(own.kafka_bootstrap, own.kafka_topic, 3)
        device = new_device("O")
        queue = naming.device_queue(device)
        prefetch = 50
        bridge = bridges("--queues", queue, "--prefetch", str(prefetch), on=own)
        bridge.wait_consuming(1)
        kafka.stop()
        count = 500
        publisher = publish_in_background(settings, device, count)
        publisher.join(60)
        assert publisher.failures == []
        # The bridge holds at most `prefetch`; the rest waits in RabbitMQ.
        wait_for(lambda: queue_depth(admin_channel, queue) == count - prefetch, 30,
                 message=f"{count - prefetch} messages ready in {queue}")
        assert bridge.metric("webos_bridge_in_flight") == prefetch
        assert bridge.metric("webos_bridge_acked_total") == 0
        assert requests.get(bridge.url + "/healthz", timeout=2).status_code == 200
        assert psutil.Process(bridge.process.pid).memory_info().rss < 150 * 2**20

        kafka.start()
        kafka.wait_ready()
        records = read_records(own, own.kafka_topic,
                               lambda got: set(seqs_of(got, device)) >= set(range(count)), 120)
        assert_complete_and_ordered(records, device, count)
        wait_for(lambda: bridge.metric("webos_bridge_acked_total") >= count, 30,
                 message="all acked once Kafka is back")
        assert queue_depth(admin_channel, queue) == 0
        assert bridge.stop() == 0
    finally:
        kafka.stop()


@pytest.mark.parametrize("flags, env, expected", [
    ([], {"WEBOS_BRIDGE_PASSWORD": "wrong"}, "check WEBOS_BRIDGE_PASSWORD"),
    (["--queues", "webos.NoSuchDevice42"], {}, "cannot consume queue 'webos.NoSuchDevice42'"),
    (["--topic-template", "no.such.topic"], {}, "Kafka topic 'no.such.topic' does not exist"),
], ids=["wrong-password", "missing-queue", "missing-topic"])
def test_configuration_errors_stop_with_code_2_and_say_what_to_fix(
        settings, bridges, flags, env, expected):
    bridge = bridges(*flags, env=env)
    assert bridge.process.wait(60) == 2
    assert "configuration error" in bridge.output
    assert expected in bridge.output
    assert "Traceback" not in bridge.output
