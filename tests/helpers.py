"""Small helpers the tests share: waiting on a condition, MQTT clients, reading queues and Kafka
(the one poll loop every Kafka read of the tests goes through)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from confluent_kafka import Consumer

from common.config import REPO_ROOT, Settings
from common.pki import PKI, Identity, client_context
from stack.process import answers, wait_until as wait_for  # noqa: F401 (re-exported for the tests)

# Settings.reconnect_max_seconds where a test stops or kills a broker: with the default 30 s a
# device whose doubling wait reached 16 s while the broker was starting could reconnect half a
# minute after it was back (a CI run's RabbitMQ-restart audit took 88 s instead of 28 s).
RESTART_RECONNECT_MAX = 4.0


class MqttDevice:
    """A paho 2.x client on RabbitMQ's MQTT over TLS (MQTT 3.1.1 unless `protocol` says
    otherwise), logged in with `device`'s certificate (enrolled already) and, unless `client_id`
    says otherwise, its id as client id; records the CONNACK and each PUBACK's reason code."""

    def __init__(self, settings: Settings, device: str | None = None, client_id: str | None = None,
                 protocol: int = mqtt.MQTTv311, user: str | None = None,
                 password: str | None = None, identity: Identity | None = None):
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.reason_code = None
        self.puback_reasons: dict[int, mqtt.ReasonCode] = {}
        if identity is None and device is not None:
            identity = PKI(settings.pki_path).device(device)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=client_id or device or f"test-{uuid.uuid4().hex[:8]}",
                                  protocol=protocol)
        self.client.tls_set_context(client_context(settings.ca_file, identity))
        self.client.on_publish = self.on_publish
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self.on_connect
        self.client.on_disconnect = self.on_disconnect
        self.client.connect(settings.rabbitmq_host, settings.mqtt_port, keepalive=30)
        self.client.loop_start()

    def on_connect(self, client, userdata, flags, reason_code, properties):
        self.reason_code = reason_code
        self.connected.set()

    def on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnected.set()

    def on_publish(self, client, userdata, mid, reason_code, properties):
        self.puback_reasons[mid] = reason_code

    def publish(self, topic: str, payload: bytes, timeout: float = 10.0, properties=None) -> bool:
        """Publish with QoS 1; True when the broker acknowledged it within `timeout`."""
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        info.wait_for_publish(timeout)
        self.last_mid = info.mid
        return info.is_published()

    @property
    def last_puback_reason(self) -> mqtt.ReasonCode:
        """The reason code of the last publish's PUBACK (MQTT 3.1.1 has none: always Success)."""
        return self.puback_reasons[self.last_mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def get_message(channel, queue: str, timeout: float = 10.0):
    """basic_get (acked) until a message arrives: (method, properties, body)."""
    def attempt():
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        return (method, properties, body) if method else None
    return wait_for(attempt, timeout, message=f"a message in {queue}")


def kafka_consumer(settings: Settings, topics, group: str | None = None) -> Consumer:
    """A consumer in a fresh group that reads `topics` from the beginning."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                         "group.id": group or f"test-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe(list(topics))
    return consumer


def poll_records(consumer: Consumer, done, timeout: float = 30.0) -> list:
    """Poll until `done(records)` is true or the timeout (errors fail the test); what was read."""
    records = []
    deadline = time.monotonic() + timeout
    while not done(records) and time.monotonic() < deadline:
        record = consumer.poll(0.5)
        if record is None:
            continue
        assert record.error() is None, record.error()
        records.append(record)
    return records


def consume(consumer: Consumer, count: int, timeout: float = 30.0) -> list:
    """Poll until `count` records (errors fail the test) or the timeout."""
    return poll_records(consumer, lambda records: len(records) >= count, timeout)


def read_records(settings: Settings, topic: str, done, timeout: float = 60.0, reader=None) -> list:
    """Records of `topic` (from `reader`, else a fresh consumer) until `done(records)` is true;
    fails after `timeout`."""
    consumer = reader or kafka_consumer(settings, [topic])
    try:
        records = poll_records(consumer, done, timeout)
    finally:
        if reader is None:
            consumer.close()
    assert done(records), f"only {len(records)} records in {topic}"
    return records


def queue_depth(channel, queue: str) -> int:
    """Ready messages in `queue` (unacked ones are not counted), by a passive declare."""
    return channel.queue_declare(queue, passive=True).method.message_count


def dead_command(settings: Settings, *args: str, input: str | None = None):
    """`python -m bridge dead ARGS` run to its end, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "bridge", "dead", *args],
                          env={**os.environ, **settings.to_env()}, capture_output=True, text=True,
                          input=input, timeout=120, cwd=REPO_ROOT)
