"""Talking to devices through Kafka, as any service would: a command record into `webos.commands`,
its feedback read back from `webos.command-feedback`, a device's state from `webos.state`."""
from __future__ import annotations

import json
import time
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from common.command_records import SENT
from common.config import Settings
from common.device_state import DeviceState


class CommandProducer:
    """Produces command records into `webos.commands` (thread-safe, as librdkafka's producer)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.producer = Producer(settings.kafka_client(**{
            "linger.ms": 1, "acks": "all", "partitioner": "murmur2_random"}))

    def send(self, target: str, name: str, args: dict | None = None, *, ttl_s: float | None = None,
             command_id: str | None = None, raw: bytes | None = None) -> str:
        """Produce one command (or `raw` as the record's value) and wait until Kafka has it;
        its command id."""
        command_id = command_id or uuid.uuid4().hex
        value = {"command_id": command_id, "name": name, "args": args or {}}
        if ttl_s is not None:
            value["ttl_s"] = ttl_s
        self.producer.produce(self.settings.commands_topic,
                              raw if raw is not None else json.dumps(value).encode(),
                              target.encode())
        if self.producer.flush(10):
            raise KafkaException(f"Kafka did not take the command within 10 s "
                                 f"({self.settings.kafka_bootstrap})")
        return command_id

    def close(self) -> None:
        self.producer.flush(10)


class CommandSender(CommandProducer):
    """Produces command records and reads the feedback written after it started, by command id.
    Start it before sending: it reads from the ends the feedback partitions had then."""

    def __init__(self, settings: Settings, timeout: float = 10.0):
        super().__init__(settings)
        self.reader = Consumer(settings.kafka_client(**{
            "group.id": f"webos-command-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}))
        topic = settings.feedback_topic
        metadata = self.reader.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise KafkaException(f"Kafka topic {topic} is missing (python -m stack up creates it)")
        # Explicit offsets: OFFSET_END would be resolved later, after the feedback of a quick
        # command may already be there.
        self.reader.assign([
            TopicPartition(topic, p, self.reader.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout)[1])
            for p in metadata.partitions])
        self.feedback: dict[str, list[dict]] = {}

    def read(self, timeout: float = 0.2) -> list[dict]:
        """The feedback records that arrived (also kept in `feedback`)."""
        arrived = []
        for record in self.reader.consume(1000, timeout):
            if record.error() is None:
                try:
                    value = json.loads(record.value())
                except ValueError:
                    continue
                self.feedback.setdefault(value.get("command_id"), []).append(value)
                arrived.append(value)
        return arrived

    def finals(self, command_id: str) -> list[dict]:
        """The final records of `command_id` read so far (one per device that answered)."""
        return [value for value in self.feedback.get(command_id, []) if value["status"] != SENT]

    def wait_final(self, command_id: str, count: int = 1, timeout: float = 20.0) -> list[dict]:
        """The final records of `command_id` once there are `count`; TimeoutError if not."""
        deadline = time.monotonic() + timeout
        while len(self.finals(command_id)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.finals(command_id))} of {count} final records "
                                   f"for {command_id} after {timeout:g} s: "
                                   f"{self.feedback.get(command_id)}")
            self.read()
        return self.finals(command_id)

    def close(self) -> None:
        self.reader.close()
        super().close()


def read_state(settings: Settings, device: str, timeout: float = 10.0) -> DeviceState | None:
    """The latest `webos.state` entry of `device` (None if it has none), read from the
    compacted topic's beginning to its end."""
    reader = Consumer(settings.kafka_client(**{
        "group.id": f"webos-state-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "enable.partition.eof": True}))
    try:
        topic = settings.state_topic
        metadata = reader.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise KafkaException(f"Kafka topic {topic} is missing (python -m stack up creates it)")
        reader.assign([TopicPartition(topic, p, 0) for p in metadata.partitions])
        latest, ended = None, set()
        deadline = time.monotonic() + timeout
        while len(ended) < len(metadata.partitions):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {topic} to its end in {timeout:g} s")
            record = reader.poll(0.2)
            if record is None:
                continue
            if record.error() is not None:
                ended.add(record.partition())  # end of partition (or an error: stop reading it)
            elif record.key() == device.encode():
                latest = DeviceState.from_json(record.value())
        return latest
    finally:
        reader.close()
