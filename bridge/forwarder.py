"""The forwarding loop: device queues in, Kafka records out, acks only after Kafka confirmed.

One thread owns the pika connection and drives both it and `producer.poll()`. `on_message` only
collects the deliveries of one `process_data_events` turn; the loop then produces them in one burst
(so librdkafka batches a whole socket read into one request, where per-delivery produce calls
spread over the read would be cut into many small ones by linger.ms). Delivery reports (called by
`poll`/`flush` on that same thread) only record what happened; the loop then acks, nacks and parks
between `process_data_events` calls. What lives and dies with the channels (delivery tags, the
consumers, what waits to be acked, nacked or parked) is one `_Session`, built by each connect; a
delivery report bound to an older session is ignored: its tag died with that channel.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import pika
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource
from pika import exceptions as amqp_errors

from bridge.discovery import QueueDiscovery, bridge_consumer_tag
from bridge.metrics import BridgeStats
from bridge.delivery import AckTracker, Route, RouteCache, inspect_body, message_headers
from bridge.presence import EVENT_TYPES, presence_record
from rabbitmq import naming
from rabbitmq import endpoints
from rabbitmq.naming import DEAD_DETAIL_HEADER, DEAD_EXCHANGE_HEADER, DEAD_QUEUE_HEADER, DEAD_REASON_HEADER, DEAD_ROUTING_KEY_HEADER, KAFKA_REJECTED
from common.config import ConfigError, Settings

LOGGER = logging.getLogger(__name__)

# Delivery errors that say "this record will never be accepted": park it, do not retry it.
REJECTED_BY_KAFKA = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG,
                     KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
                     KafkaError.INVALID_RECORD, KafkaError.TOPIC_EXCEPTION,
                     KafkaError._INVALID_ARG}
BUSY_WAIT = 0.001  # s: longest AMQP wait per loop turn while records are in flight
QUIET_WAIT = 0.008  # s: longest such wait while records are in flight but nothing happens
SATURATED_WAIT = 0.005  # s: longest wait for Kafka when the prefetch window is full
ACK_INTERVAL = 0.02  # s: longest a confirmed delivery waits for its (batched) ack
IDLE_WAIT = 0.05  # s: longest wait when nothing is in flight (also bounds stop/discovery latency)
# Fewest deliveries in flight per queue however many queues share --prefetch (the window is per
# consumer: RabbitMQ 4 quorum queues have no channel-wide one).
MIN_QUEUE_PREFETCH = 20
# Consumer priorities of single active consumer: the range each instance's priorities are drawn from.
PRIORITIES = 1000
PRESENCE_PREFETCH = 100  # connection events in flight on webos.presence's channel
# Room for the record's headers and batch framing inside a topic's max.message.bytes.
RECORD_OVERHEAD = 1024
AUTH_ERRORS = (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError,
               amqp_errors.ProbableAccessDeniedError)


class ConfigurationError(ConfigError):
    """Something only a person can fix (credentials, a missing queue or topic): stop, say what."""


@dataclass(frozen=True)
class BridgeOptions:
    """The bridge's own knobs (broker addresses and users come from Settings)."""

    # Their defaults are the settings table's (common/config.py says why each is what it is).
    queues: tuple[str, ...] = Settings.bridge_queues
    queue_pattern: str | None = Settings.bridge_queue_pattern or None
    topic_template: str = Settings.kafka_topic
    prefetch: int = Settings.bridge_prefetch
    linger_ms: float = Settings.bridge_linger_ms
    batch_size: int = Settings.bridge_batch_size
    max_message_bytes: int = Settings.bridge_max_message_bytes
    # s between full queue listings while queue events arrive (more often while they do not).
    discovery_interval: float = 30.0
    # This bridge among several: its consumer tags start with it, and it picks its priorities.
    instance: str = ""
    # Forward webos.presence (devices' connects and disconnects) to Settings.presence_topic.
    presence: bool = True
    flush_timeout: float = 10.0
    max_backoff: float = Settings.reconnect_max_seconds
    kafka_config: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def producer_config(self, settings: Settings, max_message_bytes: int | None = None) -> dict:
        """librdkafka configuration: durable (acks=all, idempotent), batched, records and batches
        at most `max_message_bytes` (default: the option), whatever --kafka-config says."""
        limit = max_message_bytes or self.max_message_bytes
        config = {**settings.kafka_client(), "acks": "all",
                  "enable.idempotence": True, "linger.ms": self.linger_ms,
                  "batch.size": self.batch_size, "client.id": "webos-bridge",
                  **dict(self.kafka_config)}
        config["message.max.bytes"] = limit
        config["batch.size"] = min(int(config["batch.size"]), limit)
        return config


def share_priority(instance: str, queue: str) -> int:
    """This instance's consumer priority on `queue` (0..PRIORITIES-1), the same every time.

    Every bridge instance consumes every device queue; single active consumer delivers to the
    consumer of highest priority (RabbitMQ 4 quorum queues), so each queue goes to the instance
    whose hash of (instance, queue) is highest: rendezvous hashing. Each instance is thus active
    on an even share with no coordination; an instance that joins takes over a share (RabbitMQ
    switches once the old consumer's in-flight messages are settled, so order is kept), and the
    queues of one that dies go to the instances with the next priority.
    """
    digest = hashlib.blake2b(f"{instance}\0{queue}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % PRIORITIES


class _ParkingRefused(Exception):
    """webos.dead did not take a parked copy (unroutable or nacked); reconnect and try again."""


class _Session:
    """What lives and dies with one connection's channels: their delivery tags and consumers, and
    the deliveries of this turn, with what Kafka's reports asked for them (confirmed, to nack, to
    park, to send alone)."""

    __slots__ = ("channel", "dead_channel", "probe_channel", "consumers", "was_consuming",
                 "tracker", "deliveries", "presence", "confirmed", "to_nack", "to_park",
                 "to_isolate", "queue_prefetch", "events_channel", "presence_channel")

    def __init__(self, channel, dead_channel, probe_channel, tracker: AckTracker):
        self.channel = channel
        self.dead_channel = dead_channel
        self.probe_channel = probe_channel
        self.consumers: dict[str, str] = {}      # queue -> consumer tag
        self.was_consuming = False               # a basic_consume went through
        self.tracker = tracker
        self.deliveries: list[tuple] = []        # (queue, method, properties, body) of this turn
        self.presence: list[tuple] = []          # (method, properties) from presence_channel
        self.confirmed: list[tuple[int, float | None]] = []  # (tag, latency) Kafka confirmed
        self.to_nack: list[int] = []
        self.to_park: list[tuple[int, Route, bytes, list, str]] = []
        self.to_isolate: list[tuple[int, Route, bytes, list, str]] = []
        self.queue_prefetch = 0                  # the basic.qos set for the next consumers
        self.events_channel = None               # where queue events arrive (None: not watched)
        self.presence_channel = None             # where webos.presence is consumed, if it is

    def on_message(self, queue: str, channel, method, properties, body: bytes) -> None:
        """One delivery: noted for `_forward`, which the loop calls after this turn's events."""
        self.deliveries.append((queue, method, properties, body))

    def on_presence(self, channel, method, properties, body: bytes) -> None:
        """One connection event: noted for `_forward_presence`."""
        self.presence.append((method, properties))


class Forwarder:
    """Consumes the device queues and forwards each message to Kafka; see the module docstring."""

    def __init__(self, settings: Settings, options: BridgeOptions, stop: threading.Event,
                 stats: BridgeStats | None = None):
        self.settings = settings
        self.options = options
        self.stop = stop
        self.stats = stats or BridgeStats()
        self.routes = RouteCache(options.topic_template)
        self.pattern = re.compile(options.queue_pattern) if options.queue_pattern else None
        self.producer: Producer | None = None
        self.max_message_bytes = options.max_message_bytes
        self.discovery: QueueDiscovery | None = None
        self.connection: pika.BlockingConnection | None = None
        self.session: _Session | None = None     # None while not connected
        self.missing_warned: set[str] = set()
        self._sync_soon = False  # a queue event changed the queues: sync in this loop turn
        self._fatal: str | None = None
        # Where devices' connects and disconnects go; empty: not forwarded (off, or no topic).
        self.presence_topic = settings.presence_topic if options.presence else ""

    # ---- start and stop -------------------------------------------------------------------

    def run(self) -> int:
        """Forward until `stop` is set; 0 after a clean stop. Raises ConfigurationError."""
        topic_limit = self._check_kafka()
        if topic_limit is not None and topic_limit < self.max_message_bytes:
            LOGGER.info("topic %s takes at most %d bytes per batch: payloads above %d go to %s",
                        self.options.topic_template, topic_limit, topic_limit - RECORD_OVERHEAD,
                        naming.DEAD_QUEUE)
            self.max_message_bytes = topic_limit - RECORD_OVERHEAD
        config = self.options.producer_config(self.settings, self.max_message_bytes)
        self.producer = Producer({**config, "error_cb": self.on_kafka_error,
                                  "logger": logging.getLogger("bridge.kafka")})
        self.discovery = QueueDiscovery(
            self.settings, self.pattern, self.options.discovery_interval,
            self.options.instance, list_queues=not self.options.queues, stats=self.stats).start()
        backoff = 1.0
        first = True
        try:
            while not self.stop.is_set():
                try:
                    self._connect(first)
                    first = False
                    self._consume_loop()
                except AUTH_ERRORS as error:
                    raise ConfigurationError(
                        f"RabbitMQ refused {self.settings.bridge_user!r} at "
                        f"{self.settings.rabbitmq_host}:{self.settings.amqp_port} ({error!r}): "
                        "check WEBOS_BRIDGE_PASSWORD (in the environment or .env) and that the "
                        "user exists (python -m rabbitmq.topology creates it)") from None
                except amqp_errors.ChannelClosedByBroker as error:
                    if error.reply_code == 403:
                        raise ConfigurationError(
                            f"RabbitMQ refused {self.settings.bridge_user!r} something it needs: "
                            f"{error.reply_text}. Check its permissions (python -m "
                            "rabbitmq.topology sets them) and --queues/--queue-pattern") from None
                    what, lost = "RabbitMQ closed the channel", error
                except (amqp_errors.AMQPError, _ParkingRefused, OSError) as error:
                    what, lost = "RabbitMQ connection lost", error
                finally:
                    was_consuming = self.session is not None and self.session.was_consuming
                    self._close_connection()
                if self._fatal:
                    raise RuntimeError(self._fatal)
                if self.stop.is_set():
                    break
                if was_consuming:
                    backoff = 1.0  # only once consuming worked (pika's ReconnectingExampleConsumer)
                LOGGER.warning("%s (%r); reconnecting in %.0f s", what, lost, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, self.options.max_backoff)
        finally:
            if self.discovery:
                self.discovery.stop()
            self._flush_producer()
            LOGGER.info("bridge stopped: %s", self.stats.summary())
        return 0

    def _check_kafka(self) -> int | None:
        """The fixed topic's max.message.bytes (None if unknown); stop now when it is missing.

        Only warns when Kafka does not answer yet. The limit caps what the bridge sends: Kafka
        refuses a whole batch that is bigger, good records with it.
        """
        template = self.options.topic_template
        admin = AdminClient(self.settings.kafka_client(logger=logging.getLogger("bridge.kafka")))
        try:
            metadata = admin.list_topics(timeout=10)
        except KafkaException as error:
            LOGGER.warning("Kafka at %s does not answer yet (%s); messages wait in RabbitMQ",
                           self.settings.kafka_bootstrap, error)
            return None
        if self.presence_topic and self.presence_topic not in metadata.topics:
            LOGGER.warning("Kafka topic %s does not exist: device presence is not forwarded "
                           "(create it: python -m stack up does)", self.presence_topic)
            self.presence_topic = ""
        if "{" in template:
            return None
        if template not in metadata.topics:
            raise ConfigurationError(
                f"Kafka topic {template!r} does not exist at {self.settings.kafka_bootstrap} and "
                "topics are not created automatically: create it (python -m stack up does for "
                "webos.events) or pass another --topic-template")
        try:
            resource = ConfigResource(ConfigResource.Type.TOPIC, template)
            configs = admin.describe_configs([resource])[resource].result(10)
            return int(configs["max.message.bytes"].value)
        except (KafkaException, KeyError, ValueError) as error:
            LOGGER.warning("cannot read max.message.bytes of %s (%s)", template, error)
            return None

    def _connect(self, first: bool) -> None:
        parameters = endpoints.amqp_parameters(
            self.settings, self.settings.bridge_user, self.settings.bridge_password,
            heartbeat=30, blocked_connection_timeout=60, connection_attempts=1,
            # Which bridge process a connection is, in the management UI and API.
            client_properties={"connection_name": f"webos-bridge pid {os.getpid()}"})
        self.connection = pika.BlockingConnection(parameters)
        if not first:
            self.stats.reconnects += 1
        dead_channel = self.connection.channel()
        dead_channel.confirm_delivery()
        probe_channel = self.connection.channel()
        self._check_dead_queue(probe_channel)
        channel = self.connection.channel()
        channel.add_on_cancel_callback(self.on_consumer_cancelled)
        # Confirmed tags are acked together: one basic.ack (multiple) per ACK_INTERVAL or per
        # quarter window, not one per loop turn.
        tracker = AckTracker(max(1, self.options.prefetch // 4), ACK_INTERVAL)
        self.session = _Session(channel, dead_channel, probe_channel, tracker)
        self._consume_presence()
        if not self.options.queues:
            self._watch_queue_events()
            if not first:
                self.discovery.request_listing()  # what was created while disconnected
        if self.options.queues:
            self._sync_queues(self.options.queues, strict=first)
        elif self.discovery.queues is None:
            # The first listing may still be on its way; never start blind on a reconnect.
            deadline = time.monotonic() + 10
            while self.discovery.queues is None and time.monotonic() < deadline \
                    and not self.stop.is_set():
                self.connection.process_data_events(time_limit=0.1)
        self.stats.connected = True
        node = self.connection._impl.params  # the node pika reached, of those it was given
        LOGGER.info("connected to RabbitMQ %s:%s as %s (instance %s); prefetch %d, Kafka %s, "
                    "topic %s", node.host, node.port, self.settings.bridge_user,
                    self.options.instance, self.options.prefetch,
                    self.settings.kafka_bootstrap, self.options.topic_template)

    def _watch_queue_events(self) -> None:
        """Receive queue.created and queue.deleted from RabbitMQ's event exchange, into an
        exclusive queue of this connection; without them (plugin off, no permission) the
        discovery lists queues more often instead."""
        channel = self.connection.channel()
        try:
            events = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for key in naming.QUEUE_EVENTS:
                channel.queue_bind(events, naming.EVENT_EXCHANGE, routing_key=key)
            channel.basic_consume(events, self.on_queue_event, auto_ack=True)
        except amqp_errors.ChannelClosedByBroker as error:
            LOGGER.warning("no queue events from %s (%s): finding new queues by listing them "
                           "every %.0f s", naming.EVENT_EXCHANGE, error.reply_text,
                           self.discovery.fallback_interval)
            self.discovery.events_working = False
            return
        self.session.events_channel = channel
        self.discovery.events_working = True

    def on_queue_event(self, channel, method, properties, body) -> None:
        """One queue event: a device queue made or deleted; consume a new one at once."""
        headers = properties.headers or {}
        name = naming.header_text(headers.get("name"))
        if not name or naming.header_text(headers.get("vhost")) != self.settings.vhost:
            return
        if self.discovery.on_event(name, method.routing_key == "queue.created"):
            self._sync_soon = True

    def _check_dead_queue(self, probe_channel) -> None:
        try:
            probe_channel.queue_declare(naming.DEAD_QUEUE, passive=True)
        except amqp_errors.ChannelClosedByBroker as error:
            raise ConfigurationError(
                f"queue {naming.DEAD_QUEUE} is missing ({error.reply_text}): apply the "
                "topology first (python -m rabbitmq.topology)") from None

    def _close_connection(self) -> None:
        self.stats.connected = False
        if self.discovery is not None:
            self.discovery.events_working = False
        self.stats.queues = 0
        connection, self.connection = self.connection, None
        self.session = None  # its delivery tags die with its channels
        if connection is not None and connection.is_open:
            try:
                connection.close()
            except amqp_errors.AMQPError as error:
                LOGGER.debug("closing the connection: %r", error)

    def _flush_producer(self) -> None:
        # The deliveries are settled by now (acked in _drain, or requeued with their channel):
        # a short last flush only spares Kafka duplicates of requeued ones.
        if self.producer is None:
            return
        left = self.producer.flush(min(1.0, self.options.flush_timeout))
        if left:
            LOGGER.warning("%d records still unconfirmed by Kafka at exit; their RabbitMQ "
                           "deliveries were not acked and will be delivered again", left)

    # ---- which queues ---------------------------------------------------------------------

    def _sync_queues(self, wanted, strict: bool = False) -> None:
        """Consume every queue in `wanted` not yet consumed (queues only come, cancels remove)."""
        session = self.session
        wanted = set(wanted)
        new = sorted(wanted - session.consumers.keys())
        if not new:
            return
        # The window is per consumer: --prefetch shared out over the queues, so that what is in
        # flight stays about --prefetch however many queues there are (MIN_QUEUE_PREFETCH each at
        # least). It applies to consumers made from now on.
        queue_prefetch = max(MIN_QUEUE_PREFETCH, self.options.prefetch // len(wanted))
        if queue_prefetch != session.queue_prefetch:
            session.channel.basic_qos(prefetch_count=queue_prefetch)
            session.queue_prefetch = queue_prefetch
        for queue in new:
            if not self._queue_exists(queue, strict):
                continue
            session.consumers[queue] = session.channel.basic_consume(
                queue, partial(session.on_message, queue), auto_ack=False,
                consumer_tag=bridge_consumer_tag(self.options.instance, queue),
                arguments={"x-priority": share_priority(self.options.instance, queue)})
            session.was_consuming = True
            self.missing_warned.discard(queue)
            LOGGER.info("consuming %s", queue)
        self.stats.queues = len(session.consumers)

    def _queue_exists(self, queue: str, strict: bool) -> bool:
        # A passive declare of a missing queue closes its channel: use the throwaway probe channel.
        session = self.session
        if not session.probe_channel.is_open:
            session.probe_channel = self.connection.channel()
        try:
            session.probe_channel.queue_declare(queue, passive=True)
            return True
        except amqp_errors.ChannelClosedByBroker as error:
            if strict:
                raise ConfigurationError(
                    f"cannot consume queue {queue!r}: {error.reply_code} {error.reply_text}. "
                    f"Declare it (python -m rabbitmq.topology {naming.device_of_queue(queue) or '<device>'}) "
                    "or fix --queues") from None
            if queue not in self.missing_warned:
                LOGGER.warning("queue %s is not there (%s); will look again", queue, error.reply_text)
                self.missing_warned.add(queue)
            return False

    def on_consumer_cancelled(self, method_frame) -> None:
        """The broker cancelled a consumer (its queue was deleted): forget it; discovery re-adds."""
        tag = method_frame.method.consumer_tag
        consumers = self.session.consumers
        for queue, consumer_tag in list(consumers.items()):
            if consumer_tag == tag:
                del consumers[queue]
                self.missing_warned.add(queue)  # discovery may list it a while yet: no warning
                LOGGER.info("broker cancelled the consumer of %s (queue deleted?)", queue)
        self.stats.queues = len(consumers)

    # ---- the loop -------------------------------------------------------------------------

    def _consume_loop(self) -> None:
        connection, producer, session = self.connection, self.producer, self.session
        tracker = session.tracker
        next_sync = 0.0
        prefetch = self.options.prefetch
        burst = max(1, prefetch // 2)
        stats = self.stats
        wait = BUSY_WAIT
        while not self.stop.is_set() and self._fatal is None:
            in_flight = tracker.in_flight
            consumed = stats.consumed
            if in_flight >= prefetch:
                # RabbitMQ sends nothing more until we ack: wait on Kafka's delivery reports.
                connection.process_data_events(time_limit=0)
                if session.deliveries:
                    self._forward()
                if session.presence:
                    self._forward_presence()
                served = producer.poll(SATURATED_WAIT)
            else:
                # A delivery ends the AMQP wait at once; the wait only bounds how late delivery
                # reports (hence acks) are served: short while things happen, longer when not.
                connection.process_data_events(time_limit=wait if in_flight else IDLE_WAIT)
                # Under a backlog one call hands over one socket read (pika takes ~100 kB, about
                # 240 deliveries, per event): take what already waits in the socket too, so Kafka
                # gets fewer, bigger batches (its broker's CPU is per request). Never waits.
                collected = 0
                while collected < len(session.deliveries) < burst:
                    collected = len(session.deliveries)
                    connection.process_data_events(time_limit=0)
                if session.deliveries:
                    self._forward()
                if session.presence:
                    self._forward_presence()
                served = producer.poll(0)
            wait = BUSY_WAIT if served or stats.consumed != consumed else min(wait * 2, QUIET_WAIT)
            self._settle()
            now = time.monotonic()
            if now >= next_sync or self._sync_soon:
                next_sync = now + 1.0
                self._sync_soon = False
                wanted = self.options.queues or self.discovery.queues or ()
                self._sync_queues(wanted)
        self._drain()

    def _forward(self) -> None:
        """Produce this turn's deliveries (their delivery reports settle them) or park them."""
        session = self.session
        deliveries, session.deliveries = session.deliveries, []
        self.stats.consumed += len(deliveries)
        # Once per delivery: locals, the route from a dict, no Python call but inspect_body.
        add, max_bytes = session.tracker.add, self.max_message_bytes
        cached, route_for_queue = self.routes.cached, self.routes.get
        produce, on_delivery = self.producer.produce, self.on_delivery
        for queue, method, properties, body in deliveries:
            tag = method.delivery_tag
            add(tag)
            routing_key = method.routing_key
            route = cached.get((queue, routing_key)) or route_for_queue(queue, routing_key)
            reason, detail, msg_id = inspect_body(body, max_bytes)
            if reason is not None:
                self._park(tag, body, reason, detail, queue, routing_key, method.exchange,
                           properties.headers)
                continue
            headers = [*route.headers, ("msg_id", msg_id)] if msg_id else [*route.headers]
            if properties.headers or properties.content_type:  # an MQTT 5 device's properties
                headers += message_headers(properties.headers, properties.content_type)
            try:
                produce(route.topic, body, route.key, headers=headers,
                        on_delivery=partial(on_delivery, session, tag, route))
            except (BufferError, KafkaException):
                self._produce(tag, route, body, headers, properties.headers, method.exchange)

    def _consume_presence(self) -> None:
        """Consume webos.presence on a channel of its own (its few deliveries are acked one by
        one, apart from the device messages' batches); skipped when the queue is missing."""
        if not self.presence_topic:
            return
        channel = self.connection.channel()
        try:
            channel.basic_qos(prefetch_count=PRESENCE_PREFETCH)
            channel.basic_consume(naming.PRESENCE_QUEUE, self.session.on_presence,
                                  consumer_tag=f"webos-bridge-presence {self.options.instance}")
        except amqp_errors.ChannelClosedByBroker as error:
            LOGGER.warning("not forwarding device presence: %s (apply the topology: python -m "
                           "rabbitmq.topology)", error.reply_text)
            self.presence_topic = ""
            return
        self.session.presence_channel = channel
        LOGGER.info("consuming %s: device presence to Kafka topic %s (one bridge instance at "
                    "a time)", naming.PRESENCE_QUEUE, self.presence_topic)

    def _forward_presence(self) -> None:
        """Produce this turn's connection events of devices to the presence topic, keyed by
        device; each is acked once Kafka has it (the events of other connections at once)."""
        session = self.session
        events, session.presence = session.presence, []
        for method, properties in events:
            tag = method.delivery_tag
            record = presence_record(method.routing_key, properties.headers)
            if record is None:
                session.presence_channel.basic_ack(tag)
                continue
            device, value = record
            headers = [("type", EVENT_TYPES[method.routing_key].encode())]
            while True:
                try:
                    self.producer.produce(self.presence_topic, value, device.encode(),
                                          headers=headers,
                                          on_delivery=partial(self.on_presence_delivery, session,
                                                              tag))
                    break
                except BufferError:
                    self.producer.poll(0.05)

    def on_presence_delivery(self, session: _Session, tag: int, error, record) -> None:
        """Kafka's report on a presence record: ack its event, or requeue it."""
        if session is not self.session or not session.presence_channel.is_open:
            return  # its channel is gone: RabbitMQ delivers it again
        if error is None:
            self.stats.presence += 1
            session.presence_channel.basic_ack(tag)
        else:
            LOGGER.warning("Kafka did not take a presence record (%s); requeueing it", error.str())
            session.presence_channel.basic_nack(tag, requeue=True)

    def _produce(self, tag: int, route: Route, body: bytes, headers: list, amqp_headers=None,
                 exchange: str = "", alone: bool = False) -> None:
        """Produce one record, waiting while librdkafka's queue is full; park what it refuses."""
        callback = partial(self.on_delivery, self.session, tag, route, alone=alone)
        while True:
            try:
                self.producer.produce(route.topic, body, route.key, headers=headers,
                                      on_delivery=callback)
                return
            except BufferError:
                # librdkafka's queue is full (prefetch larger than its limits): let it drain.
                self.producer.poll(0.05)
            except KafkaException as error:
                self._park(tag, body, KAFKA_REJECTED, str(error.args[0]), route.queue,
                           route.routing_key, exchange, amqp_headers)
                return

    def on_delivery(self, session: _Session, tag: int, route: Route, error, record,
                    alone: bool = False) -> None:
        """Kafka's delivery report: note it; acks, nacks and counters are the loop's job."""
        if session is not self.session:
            self.stats.forgotten += 1  # its delivery tag died with the old channel
        elif error is None:
            session.confirmed.append((tag, record.latency()))
        elif error.code() in REJECTED_BY_KAFKA:
            # Kafka refuses whole batches: a good record batched with a bad one fails with it.
            # Only a record refused when sent alone is parked.
            detail = f"{error.name()}: {error.str()}"
            (session.to_park if alone else session.to_isolate).append(
                (tag, route, record.value(), record.headers() or [], detail))
        else:
            LOGGER.warning("Kafka did not take a record from %s (%s); requeueing it",
                           route.queue, error.str())
            session.to_nack.append(tag)

    def on_kafka_error(self, error) -> None:
        """librdkafka's error callback: most are transient (it retries); fatal ones stop us."""
        if error.fatal():
            self._fatal = f"Kafka producer fatal error: {error.str()}"
            LOGGER.error("%s", self._fatal)
        else:
            LOGGER.warning("Kafka: %s", error.str())

    def _settle(self, force: bool = False) -> None:
        """Send the nacks, parks and acks the delivery reports asked for (`force`: ack now)."""
        session = self.session
        channel, tracker = session.channel, session.tracker
        if session.confirmed:
            confirmed, session.confirmed = session.confirmed, []
            tracker.confirm_all(confirmed)
            self.stats.produced += len(confirmed)
            self.stats.latency.observe_all(latency for _, latency in confirmed)
        if session.to_nack:
            for tag in session.to_nack:
                channel.basic_nack(tag, requeue=True)
                tracker.nacked(tag)
                self.stats.requeued += 1
            session.to_nack.clear()
        if session.to_isolate:
            isolated, session.to_isolate = session.to_isolate, []
            for tag, route, value, headers, detail in isolated:
                LOGGER.info("Kafka refused a batch with a record from %s (%s); sending it alone",
                            route.queue, detail)
                self._produce(tag, route, value, headers, alone=True)
                # Rare path: flushing is what makes the next batch hold this one record.
                self.producer.flush(self.options.flush_timeout)
        if session.to_park:
            parked, session.to_park = session.to_park, []
            for tag, route, value, _, detail in parked:
                self._park(tag, value, KAFKA_REJECTED, detail, route.queue, route.routing_key,
                           "", None)
        last, count = tracker.ack_due(time.monotonic(), force)
        if last:
            channel.basic_ack(last, multiple=True)
            self.stats.acked += count
        self.stats.in_flight = tracker.in_flight

    def _park(self, tag: int, body: bytes, reason: str, detail: str, queue: str,
              routing_key: str, exchange: str, original_headers) -> None:
        """Publish to webos.dead (confirmed) with the reason, then let the original be acked."""
        LOGGER.warning("parking a message from %s (routing key %s) in %s: %s (%s)", queue,
                       routing_key, naming.DEAD_QUEUE, reason, detail)
        headers = dict(original_headers or {})
        headers.update({DEAD_REASON_HEADER: reason, DEAD_DETAIL_HEADER: detail,
                        DEAD_QUEUE_HEADER: queue, DEAD_ROUTING_KEY_HEADER: routing_key,
                        DEAD_EXCHANGE_HEADER: exchange})
        try:
            # confirm_delivery is on: this returns once RabbitMQ has the copy.
            self.session.dead_channel.basic_publish(
                "", naming.DEAD_QUEUE, body, mandatory=True,
                properties=pika.BasicProperties(delivery_mode=2, headers=headers,
                                                timestamp=int(time.time())))
        except (amqp_errors.UnroutableError, amqp_errors.NackError) as error:
            raise _ParkingRefused(
                f"{naming.DEAD_QUEUE} did not take a parked message: {error!r}") from None
        self.session.tracker.confirm(tag)
        self.stats.dead_lettered[reason] += 1

    def _drain(self) -> None:
        """Stop consuming, let Kafka confirm what is in flight, ack that, leave the rest unacked."""
        if self._fatal is not None:
            return
        session = self.session
        LOGGER.info("stopping: cancelling %d consumers, flushing Kafka (up to %.0f s)",
                    len(session.consumers), self.options.flush_timeout)
        for consumer_tag in list(session.consumers.values()):
            session.channel.basic_cancel(consumer_tag)
        session.consumers = {}
        deadline = time.monotonic() + self.options.flush_timeout
        while (session.tracker.in_flight or session.deliveries) and time.monotonic() < deadline:
            if session.deliveries:
                self._forward()  # delivered before the cancel took effect
            self.producer.flush(min(0.1, max(0.0, deadline - time.monotonic())))
            self._settle(force=True)
            self.connection.process_data_events(time_limit=0)
        self._settle(force=True)
        if session.tracker.in_flight:
            LOGGER.warning("%d deliveries not confirmed by Kafka in time: left unacked, RabbitMQ "
                           "delivers them again", session.tracker.in_flight)
