"""Small helpers the tests share: waiting on a condition, MQTT clients, reading queues and Kafka."""
from __future__ import annotations

import threading
import time
import uuid

import paho.mqtt.client as mqtt
import requests
from confluent_kafka import Consumer

from common.config import Settings
from common.pki import PKI, Identity, client_context


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll `condition` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def answers(url: str, auth=None, verify=True) -> bool:
    """True when `url` answers 200 now (`verify`: the CA file for an https URL)."""
    try:
        return requests.get(url, auth=auth, verify=str(verify) if verify is not True else True,
                            timeout=2).status_code == 200
    except requests.RequestException:
        return False


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


def consume(consumer: Consumer, count: int, timeout: float = 30.0) -> list:
    """Poll until `count` records (errors fail the test) or the timeout."""
    records = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        record = consumer.poll(0.5)
        if record is None:
            continue
        assert record.error() is None, record.error()
        records.append(record)
    return records
