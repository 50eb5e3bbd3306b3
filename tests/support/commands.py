"""Sending commands and reading their feedback and the devices' state, as a service would:
records in Kafka `webos.commands`, answers from `webos.command-feedback` and `webos.state`."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from common.config import Settings
from common.pki import PKI


class CommandLine:
    """A producer of command records and a reader of feedback from now on, keyed by command id."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 1,
                                  "partitioner": "murmur2_random"})
        self.reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                "group.id": f"test-feedback-{uuid.uuid4().hex[:8]}",
                                "enable.auto.commit": False})
        partitions = self.reader.list_topics(settings.feedback_topic, timeout=10) \
            .topics[settings.feedback_topic].partitions
        # From the end as it is now (OFFSET_END would be resolved later, after a first command).
        self.reader.assign([TopicPartition(settings.feedback_topic, p, self.reader.get_watermark_offsets(
            TopicPartition(settings.feedback_topic, p), timeout=10)[1]) for p in partitions])
        self.feedback: dict[str, list[dict]] = {}

    def send(self, target: str, name: str, args: dict | None = None, *, ttl_s=None,
             command_id: str | None = None, raw: bytes | None = None) -> str:
        """Produce one command record (or `raw` as its value); its command id."""
        command_id = command_id or uuid.uuid4().hex
        value = {"command_id": command_id, "name": name, "args": args or {}}
        if ttl_s is not None:
            value["ttl_s"] = ttl_s
        self.producer.produce(self.settings.commands_topic,
                              raw if raw is not None else json.dumps(value).encode(),
                              target.encode())
        self.producer.flush(10)
        return command_id

    def read(self, timeout: float = 0.2) -> None:
        """Take what feedback arrived into `feedback`."""
        for record in self.reader.consume(1000, timeout):
            if record.error() is None:
                value = json.loads(record.value())
                self.feedback.setdefault(value["command_id"], []).append(value)

    def finals(self, command_id: str) -> list[dict]:
        return [value for value in self.feedback.get(command_id, []) if value["status"] != "sent"]

    def wait_final(self, command_id: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        """The final records of `command_id` once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while len(self.finals(command_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.finals(command_id))} of {count} final records for "
                                   f"{command_id} after {timeout:g} s: {self.feedback.get(command_id)}")
            self.read()
        return self.finals(command_id)

    def close(self) -> None:
        self.reader.close()


def read_state(settings: Settings, device: str, timeout: float = 10.0) -> dict | None:
    """The latest `webos.state` value of `device`, read from the topic's beginning to its end."""
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                       "group.id": f"test-state-{uuid.uuid4().hex[:8]}",
                       "auto.offset.reset": "earliest", "enable.auto.commit": False,
                       "enable.partition.eof": True})
    try:
        partitions = reader.list_topics(settings.state_topic, timeout=timeout) \
            .topics[settings.state_topic].partitions
        reader.assign([TopicPartition(settings.state_topic, p, 0) for p in partitions])
        latest, ends = None, set()
        deadline = time.monotonic() + timeout
        while len(ends) < len(partitions) and time.monotonic() < deadline:
            record = reader.poll(0.2)
            if record is None:
                continue
            if record.error() is not None:
                ends.add(record.partition())
            elif record.key() == device.encode():
                latest = json.loads(record.value())
        return latest
    finally:
        reader.close()


def mosquitto_sub(settings: Settings, device: str, topic: str) -> str:
    """What mosquitto_sub (MQTT 5, QoS 1, the device's certificate) prints subscribing to `topic`
    for two seconds."""
    if shutil.which("mosquitto_sub") is None:
        pytest.fail("mosquitto_sub is missing: `make install-test` installs mosquitto-clients")
    identity = PKI(settings.pki_path).device(device)
    done = subprocess.run(
        ["mosquitto_sub", "-h", settings.rabbitmq_host, "-p", str(settings.mqtt_port),
         "-V", "mqttv5", "-q", "1", "-t", topic, "-i", device, "-W", "2",
         "--cafile", str(settings.ca_file), "--cert", str(identity.cert),
         "--key", str(identity.key)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr
