"""The other direction of the pipe: commands from Kafka to the devices, their outcomes back.

One thread owns everything. It takes command records from `webos.commands`, publishes each to
`webos.topic` (key webos.<device>.command: only the device's MQTT session queue takes it;
persistent, mandatory, confirmed) and stores the record's offset once the broker confirmed (or
the command's refusal is produced); offsets are committed after every feedback record of the
batch is in Kafka. It consumes the devices' replies (webos.replies) and the commands RabbitMQ
dead-lettered when their TTL ran out (webos.expired), writes one final feedback record per
command and device, and acks each delivery after Kafka has the record. A crash repeats at most
the uncommitted commands (devices apply a command id once) and the unacked replies (a final
already written is not written again while the relay runs).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import pika
from confluent_kafka import KafkaException, TopicPartition
from pika import exceptions as amqp_errors

from common import command_records as records
from bridge.backoff import QueueBackoff
from bridge.reconnect import run_sessions
from bridge.state_store import FeedbackWriter, commands_consumer, feedback_producer, load_states
from common.config import Settings
from common.device_state import DeviceState
from rabbitmq import endpoints, naming

LOGGER = logging.getLogger(__name__)
BATCH = 200           # commands taken from Kafka per turn
TURN_WAIT = 0.005     # s: longest wait on each side per turn (bounds a command's added latency)
REPLY_PREFETCH = 500  # replies and expired commands in flight
CONFIRM_TIMEOUT = 10.0
COMMIT_INTERVAL = 0.2  # s between commits of the stored offsets


def now_ms() -> int:
    return int(time.time() * 1000)


class RelaySession:
    """One AMQP connection: a confirmed channel that publishes commands, and a channel that
    consumes replies and expired commands. A new one per connection: its delivery tags die
    with it."""

    def __init__(self, settings: Settings, writer: FeedbackWriter):
        self.settings = settings
        self.writer = writer
        self.connection = endpoints.open_connection(endpoints.amqp_parameters(
            settings, settings.bridge_user, settings.bridge_password, heartbeat=endpoints.HEARTBEAT_SECONDS,
            blocked_connection_timeout=60, connection_attempts=1,
            client_properties={"connection_name": "webos-relay"}))
        self.publish_channel = self.connection.channel()
        self.publish_channel.confirm_delivery()
        self.consume_channel = self.connection.channel()
        self.consume_channel.basic_qos(prefetch_count=REPLY_PREFETCH)
        self.deliveries: list[tuple[str, int, str, object, bytes]] = []
        self.backoff = QueueBackoff(settings.bridge_retry_max_seconds)
        self.held: list[int] = []  # replies whose feedback Kafka refused, requeued when due
        for queue in (naming.REPLIES_QUEUE, naming.EXPIRED_QUEUE):
            self.consume_channel.basic_consume(queue, self.on_message)
        writer.forget_deliveries()  # the tags of an earlier connection died with it
        self.worked = True  # consuming: a later loss starts the back-off from 1 s again
        LOGGER.info("connected to RabbitMQ; waiting for commands")

    def on_message(self, channel, method, properties, body: bytes) -> None:
        """A reply or an expired command: noted for `settle_replies`."""
        queue = naming.EXPIRED_QUEUE if method.routing_key == naming.EXPIRED_QUEUE else naming.REPLIES_QUEUE
        self.deliveries.append((queue, method.delivery_tag, method.routing_key,
                                properties.headers, body))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    # -- commands -------------------------------------------------------------------------

    def send(self, command: records.Command) -> None:
        """Publish one command and write what came of it (sent, or its final refusal)."""
        now = now_ms()
        state_change = None
        if not command.broadcast:
            state = self.writer.states.get(command.target, DeviceState())
            state_change = state.desire(command.name, command.args, now)
            if state_change:
                command = replace(command, args=state_change[1])
        properties = pika.BasicProperties(
            delivery_mode=2, content_type="application/json", expiration=str(int(command.ttl_s * 1000)),
            correlation_id=command.command_id, message_id=command.command_id,
            # RabbitMQ 4.0.5 turns correlation_id into MQTT 5 Correlation Data, but an AMQP 0.9.1
            # reply_to into no Response Topic: the topic goes as a user property (and in the body).
            headers={} if command.broadcast else {"response-topic": naming.reply_topic(command.target)})
        try:
            self.publish_channel.basic_publish(naming.TOPIC_EXCHANGE, command.routing_key,
                                               command.body(now), properties, mandatory=True)
        except amqp_errors.UnroutableError:
            status, detail = self._unroutable(command)
            self.writer.final(command.target, command.command_id, status, detail, now,
                              name=command.name, broadcast=command.broadcast)
            return
        except amqp_errors.NackError:
            self.writer.final(command.target, command.command_id, records.REJECTED,
                              f"{records.QUEUE_FULL}: {self.settings.command_queue_limit} commands "
                              "already wait for this device", now, name=command.name,
                              broadcast=command.broadcast)
            return
        self.writer.sent_to(command, now)
        if state_change:
            self.writer.state(command.target, state_change[0])

    def _unroutable(self, command: records.Command) -> tuple[str, str]:
        """Why no queue took a command: an unknown device, or one with no session right now."""
        if command.broadcast:
            return records.UNDELIVERABLE, f"{records.NO_SESSION}: no device is subscribed"
        probe = self.connection.channel()
        try:
            probe.queue_declare(naming.device_queue(command.target), passive=True)
        except amqp_errors.ChannelClosedByBroker:
            return records.REJECTED, f"{records.UNKNOWN_DEVICE}: {command.target} is not enrolled"
        probe.close()
        return (records.UNDELIVERABLE, f"{records.NO_SESSION}: {command.target} has no session "
                "subscribed to its commands (never connected, or its session expired)")

    # -- replies and expired commands --------------------------------------------------------

    def settle_replies(self) -> None:
        """Write what this turn's replies and expired commands mean; each delivery is acked once
        Kafka confirmed its records (`ack_confirmed`)."""
        deliveries, self.deliveries = self.deliveries, []
        now = now_ms()
        for queue, tag, routing_key, headers, body in deliveries:
            self.writer.begin(tag)
            if queue == naming.EXPIRED_QUEUE:
                self._on_expired(headers, body, now)
            else:
                self._on_reply(routing_key, body, now)
            self.writer.end()

    def ack_confirmed(self) -> None:
        """Ack the replies Kafka has. Those it refused are held unacked and requeued (to come
        again) after a back-off that doubles while Kafka keeps refusing (bridge/backoff.py):
        requeued at once, they came back at once, and the relay spun."""
        writer, now = self.writer, time.monotonic()
        writer.producer.poll(0)
        for tag in writer.to_ack:
            self.consume_channel.basic_ack(tag)
        if writer.to_ack:
            self.backoff.taken(naming.REPLIES_QUEUE)
        if writer.to_nack:
            error = writer.failed[-1] if writer.failed else "refused"
            wait = self.backoff.refused(naming.REPLIES_QUEUE, error, now)
            if wait is not None and self.backoff.should_log(error, now):
                LOGGER.warning("Kafka refuses feedback records (%s): %d replies held, requeued in "
                               "%.1f s", error, len(self.held) + len(writer.to_nack), wait)
            self.held += writer.to_nack
        if self.held and self.backoff.due(now):
            for tag in self.held:
                self.consume_channel.basic_nack(tag, requeue=True)
            self.held = []
        writer.to_ack, writer.to_nack, writer.failed = [], [], []

    def _on_expired(self, headers, body: bytes, now: int) -> None:
        expired = records.expired_command(headers, body)
        if expired is None:
            LOGGER.warning("dropping a message in %s that is no expired command", naming.EXPIRED_QUEUE)
            return
        device, command_id, name = expired
        self.writer.final(device, command_id, records.EXPIRED,
                          "its TTL ran out before the device took it", now, name=name)

    def _on_reply(self, routing_key: str, body: bytes, now: int) -> None:
        parsed = naming.parse_routing_key(routing_key)
        if parsed is None:
            LOGGER.warning("dropping a reply with routing key %r: not webos.<device>.reply", routing_key)
            return
        device = parsed[0]
        try:
            reply = records.parse_reply(device, body)
        except ValueError as error:
            LOGGER.warning("dropping a reply from %s: %s", device, error)
            return
        if reply.command_id is not None:
            self.writer.final(device, reply.command_id, reply.status, reply.detail, now,
                              name=reply.name)
        if reply.reported:
            state = self.writer.states.get(device, DeviceState()).report(reply.reported, now)
            if state is not None:
                self.writer.state(device, state)


class Relay:
    """Runs relay sessions until `stop` is set, reconnecting with capped back-off."""

    def __init__(self, settings: Settings, stop: threading.Event):
        self.settings = settings
        self.stop = stop

    def run(self) -> int:
        """Relay until `stop`; 0 after a clean stop. Raises ConfigurationError."""
        producer = feedback_producer(self.settings)
        writer = FeedbackWriter(self.settings, producer, load_states(self.settings))
        LOGGER.info("relaying Kafka %s to the devices; feedback to %s, state in %s (%d devices)",
                    self.settings.commands_topic, self.settings.feedback_topic,
                    self.settings.state_topic, len(writer.states))
        consumer = commands_consumer(self.settings)
        try:
            run_sessions(lambda first: RelaySession(self.settings, writer),
                         lambda session: self._loop(session, consumer, writer),
                         self.settings, self.stop, retriable=(KafkaException,))
        finally:
            consumer.close()
            producer.flush(CONFIRM_TIMEOUT)
        return 0

    def _loop(self, session: RelaySession, consumer, writer: FeedbackWriter) -> None:
        # Nothing in a turn waits on Kafka: the AMQP wait ends as soon as a reply arrives, the
        # commands are taken without waiting, replies are acked from delivery reports. (A
        # profile of the first version, which flushed the producer and committed synchronously
        # each turn: 9 ms per flush, 5.5 ms per consume; 72 ms from a command record to its
        # publish at p50, 200 commands/s.)
        next_commit, uncommitted = 0.0, False
        while not self.stop.is_set():
            session.connection.process_data_events(time_limit=TURN_WAIT)
            if session.deliveries:
                session.settle_replies()
            batch = consumer.consume(BATCH, 0)
            handled = 0
            try:
                for record in batch:
                    self._relay(session, record, self.settings)
                    handled += 1
            finally:
                _rewind(consumer, batch[handled:])
            if handled:
                if writer.refusals:
                    # A refusal is a final record: in Kafka before its command's offset moves.
                    writer.confirm(CONFIRM_TIMEOUT)
                for record in batch[:handled]:
                    consumer.store_offsets(record)
                uncommitted = True
            if uncommitted and time.monotonic() >= next_commit:
                # Asynchronous, at most every COMMIT_INTERVAL: a commit lost in a crash repeats
                # commands the broker confirmed already, and each device applies a command id
                # once (a commit per turn kept Kafka's coordinator busy).
                consumer.commit(asynchronous=True)
                next_commit, uncommitted = time.monotonic() + COMMIT_INTERVAL, False
            session.ack_confirmed()

    @staticmethod
    def _relay(session: RelaySession, record, settings: Settings) -> None:
        if record.error() is not None:
            LOGGER.warning("Kafka: %s", record.error())
            return
        try:
            command = records.parse_command(record.key(), record.value(),
                                            settings.command_ttl_seconds,
                                            settings.command_max_ttl_seconds)
        except records.InvalidCommand as error:
            target = (record.key() or b"").decode(errors="replace")
            LOGGER.warning("refusing command record at %s[%d]@%d: %s", record.topic(),
                           record.partition(), record.offset(), error)
            if error.command_id is not None:
                session.writer.final(target, error.command_id, records.REJECTED,
                                     f"{records.INVALID_COMMAND}: {error}", now_ms())
            return
        session.send(command)


def _rewind(consumer, unhandled) -> None:
    """Seek each partition back to its first record not relayed (the connection failed)."""
    first: dict[tuple[str, int], int] = {}
    for record in unhandled:
        first.setdefault((record.topic(), record.partition()), record.offset())
    for (topic, partition), offset in first.items():
        consumer.seek(TopicPartition(topic, partition, offset))
