"""The relay's Kafka side: the commands consumer, the feedback and state producer, and the device
states read back from the compacted `webos.state` at start (the relay is their one writer)."""
from __future__ import annotations

import json
import logging
import time
from functools import partial

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from bridge.backoff import refusal
from common import command_records as records
from common.config import Settings
from common.device_state import DeviceState

LOGGER = logging.getLogger(__name__)


def commands_consumer(settings: Settings) -> Consumer:
    """The consumer of `webos.commands`: offsets stored only once a command is handled (the broker
    confirmed it, or its feedback is produced), committed after its feedback is in Kafka."""
    consumer = Consumer(settings.kafka_client(**{
        "group.id": settings.relay_group, "group.instance.id": settings.relay_instance,
        "session.timeout.ms": 10_000, "client.id": "webos-relay", "enable.auto.commit": False,
        "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
        # A command is waited on by someone: do not let an idle fetch sit for the default 500 ms.
        "fetch.wait.max.ms": 5, "logger": logging.getLogger("bridge.kafka")}))
    consumer.subscribe([settings.commands_topic])
    return consumer


def feedback_producer(settings: Settings) -> Producer:
    """Durable (acks=all, idempotent) and quick to send: a person may be waiting on feedback."""
    return Producer(settings.kafka_client(**{
        "acks": "all", "enable.idempotence": True, "linger.ms": 0, "client.id": "webos-relay",
        "partitioner": "murmur2_random", "logger": logging.getLogger("bridge.kafka")}))


def load_states(settings: Settings, timeout: float = 30.0) -> dict[str, DeviceState]:
    """Every device's latest state from `webos.state`, read from its beginning to its end."""
    consumer = Consumer(settings.kafka_client(**{
        "group.id": "webos-relay-state-load", "enable.auto.commit": False,
        "logger": logging.getLogger("bridge.kafka")}))
    try:
        metadata = consumer.list_topics(settings.state_topic, timeout=timeout)
        topic = metadata.topics.get(settings.state_topic)
        if topic is None or topic.error is not None:
            raise KafkaException(f"Kafka topic {settings.state_topic} is missing "
                                 "(python -m stack up creates it)")
        deadline = time.monotonic() + timeout
        ends = {}
        for partition in topic.partitions:
            low, high = _watermarks(consumer, TopicPartition(settings.state_topic, partition),
                                    deadline)
            if high > low:
                ends[partition] = high
        consumer.assign([TopicPartition(settings.state_topic, p, OFFSET_BEGINNING) for p in ends])
        states: dict[str, DeviceState] = {}
        while ends and time.monotonic() < deadline:
            record = consumer.poll(0.2)
            if record is None or record.error() is not None:
                continue
            if record.key():
                states[record.key().decode(errors="replace")] = DeviceState.from_json(record.value())
            if record.offset() + 1 >= ends.get(record.partition(), 0):
                ends.pop(record.partition(), None)
        if ends:
            raise KafkaException(f"could not read {settings.state_topic} to its end in {timeout:.0f} s")
        return states
    finally:
        consumer.close()


def _watermarks(consumer: Consumer, partition: TopicPartition, deadline: float) -> tuple[int, int]:
    """A partition's low and high offsets, asked again while its leader is being elected (a
    topic created a moment ago)."""
    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=5)
        except KafkaException as error:
            if not error.args[0].retriable() or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # a back-off between two asks, not a wait for a condition


class FeedbackWriter:
    """Produces feedback and state records; remembers what it sent (for the times and names in
    the final record) and which finals it wrote, so that a redelivered reply is written once."""

    REMEMBERED = 100_000

    def __init__(self, settings: Settings, producer: Producer, states: dict[str, DeviceState]):
        self.settings = settings
        self.producer = producer
        self.states = states
        self.sent: dict[str, tuple[str, int, bool]] = {}  # command_id -> name, sent_at, broadcast
        self.finals: dict[tuple[str, str], None] = {}  # (device, command_id) written final
        self.failed: list[str] = []                     # refusals (backoff.refusal) since the last check
        # The AMQP delivery whose records are being produced (None: a command's), and per
        # delivery tag the records Kafka has not confirmed yet; then the tags to ack or nack.
        self.delivery: int | None = None
        self.outstanding: dict[int, int] = {}
        self.connection = 0  # which connection the tags belong to (a report may come late)
        self.to_ack: list[int] = []
        self.to_nack: list[int] = []
        self.refusals = False  # a command's final record produced since the last confirm

    def forget_deliveries(self) -> None:
        """A new connection: the AMQP deliveries of the last one are no longer ours to ack."""
        self.delivery, self.outstanding, self.to_ack, self.to_nack = None, {}, [], []
        self.connection += 1

    def begin(self, tag: int) -> None:
        """Records produced from now on belong to the AMQP delivery `tag`."""
        self.delivery = tag
        self.outstanding[tag] = 0

    def end(self) -> None:
        """The delivery's records are all produced: ack it once Kafka confirmed them (at once if
        there were none)."""
        tag, self.delivery = self.delivery, None
        if tag is not None and self.outstanding.get(tag) == 0:
            del self.outstanding[tag]
            self.to_ack.append(tag)

    def on_delivery(self, connection: int, tag: int | None, error, record) -> None:
        """Kafka's report on one record: noted; the relay loop acks and nacks. A final record
        Kafka refused is forgotten, so that its reply, delivered again, writes it again."""
        if error is not None:
            self.failed.append(refusal(error))
            if record is not None:
                self._forget_final(record.key(), record.value())
        if tag is None or connection != self.connection or tag not in self.outstanding:
            return
        if error is not None:
            del self.outstanding[tag]
            self.to_nack.append(tag)
            return
        self.outstanding[tag] -= 1
        if self.outstanding[tag] == 0 and self.delivery != tag:
            del self.outstanding[tag]
            self.to_ack.append(tag)

    def _produce(self, topic: str, key: str, value: bytes) -> None:
        tag = self.delivery
        if tag is not None and tag in self.outstanding:
            self.outstanding[tag] += 1
        while True:
            try:
                self.producer.produce(topic, value, key.encode(),
                                      on_delivery=partial(self.on_delivery, self.connection,
                                                          tag))
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as error:
                # Refused at once (a topic the client knows it may not write): as if reported.
                self.failed.append(refusal(error.args[0]))
                self._forget_final(key.encode(), value)
                if tag is not None and self.outstanding.pop(tag, None) is not None:
                    self.to_nack.append(tag)
                return

    def _forget_final(self, key: bytes | None, value: bytes | None) -> None:
        try:
            document = json.loads(value or b"{}")
        except ValueError:
            return
        if document.get("status") not in (None, records.SENT):
            self.finals.pop(((key or b"").decode(), document.get("command_id")), None)

    def sent_to(self, command: records.Command, now_ms: int) -> None:
        """The broker confirmed `command` into the device's (or devices') queue."""
        self.sent[command.command_id] = (command.name, now_ms, command.broadcast)
        _forget_oldest(self.sent, self.REMEMBERED)
        self._produce(self.settings.feedback_topic, command.target, records.feedback(
            command.target, command.command_id, records.SENT, name=command.name,
            broadcast=command.broadcast, sent_at=now_ms, completed_at=now_ms))

    def final(self, device: str, command_id: str, status: str, detail: str, now_ms: int, *,
              name: str = "", broadcast: bool = False) -> bool:
        """The one final record of a command for `device`; False if it was written already."""
        if (device, command_id) in self.finals:
            return False
        self.finals[(device, command_id)] = None
        _forget_oldest(self.finals, self.REMEMBERED)
        self.refusals = self.refusals or self.delivery is None
        known_name, sent_at, to_all = self.sent.get(command_id, (name, None, broadcast))
        self._produce(self.settings.feedback_topic, device, records.feedback(
            device, command_id, status, detail, name=known_name or name,
            broadcast=broadcast or to_all, sent_at=sent_at, completed_at=now_ms))
        return True

    def state(self, device: str, state: DeviceState) -> None:
        """The device's new state, kept here and in the compacted topic."""
        self.states[device] = state
        self._produce(self.settings.state_topic, device, state.to_json())

    def confirm(self, timeout: float) -> None:
        """Wait until Kafka has every record produced so far; KafkaException when it has not."""
        left = self.producer.flush(timeout)
        failed, self.failed, self.refusals = self.failed, [], False
        if left or failed:
            raise KafkaException(f"Kafka did not take {left or len(failed)} feedback or state "
                                 f"records ({failed[0] if failed else 'timed out'})")


def _forget_oldest(remembered: dict, limit: int) -> None:
    while len(remembered) > limit:
        del remembered[next(iter(remembered))]
