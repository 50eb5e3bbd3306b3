"""The forwarding loop: device queues in, Kafka records out, acks only after Kafka confirmed.

One thread owns the pika connection and drives both it and `producer.poll()`. The session's
`on_message` only collects the deliveries of one turn of the loop; the loop then produces them in
one burst (so librdkafka batches them into one request, where produce calls spread over time
would be cut into many small ones by linger.ms); bridge/pacing.py says when turns come.
Delivery reports only record; the session's Settlement acks, nacks and parks between
`process_data_events` calls. The parts: bridge/reconnect.py (the run loop), channel_session.py
(one connection), settlement.py, backoff.py (a refused queue's wait), presence.py, kafka_check.py.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from functools import partial

from confluent_kafka import KafkaException, Producer

from bridge.backoff import QueueBackoff
from bridge.channel_session import ChannelSession
from bridge.delivery import RouteCache, inspect_body, message_headers
from bridge.discovery import QueueDiscovery
from bridge.kafka_check import check_kafka
from bridge.metrics import BridgeStats
from bridge.options import BridgeOptions
from bridge.pacing import TurnPacer
from bridge.reconnect import run_sessions
from bridge.settlement import ParkingRefused
from common.config import Settings

LOGGER = logging.getLogger(__name__)
SATURATED_WAIT = 0.005  # s: longest wait for Kafka when the prefetch window is full


class Forwarder:
    """Consumes the device queues and forwards each message to Kafka; see the module docstring."""

    def __init__(self, settings: Settings, options: BridgeOptions, stop: threading.Event,
                 stats: BridgeStats | None = None):
        self.settings = settings
        self.options = options
        self.stop = stop
        self.stats = stats or BridgeStats()
        self.routes = RouteCache(options.topic_template)
        self.missing_warned: set[str] = set()  # queues found missing, warned about once
        self.last_node = ""  # "host:port" of the last session's node
        self.fatal_error: str | None = None    # librdkafka's fatal error, once there is one
        self.backoff = QueueBackoff(options.retry_max_seconds)  # outlives connections

    def run(self) -> int:
        """Forward until `stop` is set; 0 after a clean stop. Raises ConfigurationError."""
        kafka = check_kafka(self.settings, self.options)
        self.max_message_bytes = kafka.max_message_bytes
        config = self.options.producer_config(self.settings, kafka.max_message_bytes)
        self.producer = Producer({**config, "error_cb": self.on_kafka_error,
                                  "logger": logging.getLogger("bridge.kafka")})
        pattern = re.compile(self.options.queue_pattern) if self.options.queue_pattern else None
        self.discovery = QueueDiscovery(
            self.settings, pattern, self.options.discovery_interval, self.options.instance,
            list_queues=not self.options.queues, stats=self.stats).start()
        try:
            run_sessions(partial(self._open_session, kafka.presence), self._consume,
                         self.settings, self.stop, retriable=(ParkingRefused,))
            if self.fatal_error:
                raise RuntimeError(self.fatal_error)
        finally:
            self.discovery.stop()
            # The deliveries are settled by now (acked in _drain, or requeued with their
            # channel): a short last flush only spares Kafka duplicates of requeued ones.
            left = self.producer.flush(min(1.0, self.options.flush_timeout))
            if left:
                LOGGER.warning("%d records still unconfirmed by Kafka at exit; their RabbitMQ "
                               "deliveries were not acked and will be delivered again", left)
            LOGGER.info("bridge stopped: %s", self.stats.summary())
        return 0

    def _open_session(self, presence: bool, first: bool) -> ChannelSession:
        session = ChannelSession(self.settings, self.options, self.producer, self.stats,
                                 self.discovery, self.missing_warned, presence, self.backoff,
                                 last_node=self.last_node)
        self.last_node = session.node  # tried last next time: it may be hanging
        if not first:
            self.stats.reconnects += 1
            self.discovery.request_listing()  # what was created while disconnected
        if self.options.queues:
            session.sync_queues(self.options.queues, strict=first)
        elif self.discovery.queues is None:
            session.wait_for_listing()
        self.stats.connected = True
        LOGGER.info("connected to RabbitMQ %s as %s (instance %s); prefetch %d, Kafka %s, "
                    "topic %s", session.node, self.settings.bridge_user, self.options.instance,
                    self.options.prefetch, self.settings.kafka_bootstrap,
                    self.options.topic_template)
        return session

    def on_kafka_error(self, error) -> None:
        """librdkafka's error callback: most are transient (it retries); fatal ones stop us."""
        if error.fatal():
            self.fatal_error = f"Kafka producer fatal error: {error.str()}"
            LOGGER.error("%s", self.fatal_error)
        else:
            LOGGER.warning("Kafka: %s", error.str())

    def _consume(self, session: ChannelSession) -> None:
        """The hot loop of one connection, then its drain."""
        connection, producer, settlement = session.connection, self.producer, session.settlement
        tracker, prefetch = settlement.tracker, self.options.prefetch
        burst, pacer = max(1, prefetch // 2), TurnPacer()
        while not self.stop.is_set() and self.fatal_error is None:
            # Held deliveries wait for their back-off, not for Kafka: they do not keep us busy.
            in_flight = tracker.in_flight - len(tracker.held)
            if in_flight >= prefetch:
                # RabbitMQ sends nothing more until we ack: wait on Kafka's delivery reports.
                connection.process_data_events(time_limit=0)
                self._forward_turn(session)
                producer.poll(SATURATED_WAIT)
            else:
                pacer.wait(connection.process_data_events, bool(in_flight))
                # Under a backlog one read hands over at most 100 kB (about 240 deliveries): take
                # what already waits in the socket too, so Kafka gets fewer, bigger batches (its
                # broker's CPU is per request), and go on without a pause. Never waits.
                collected = 0
                while collected < len(session.deliveries) < burst:
                    collected = len(session.deliveries)
                    connection.process_data_events(time_limit=0)
                pacer.took(backlog=len(session.deliveries) >= burst)
                self._forward_turn(session)
                producer.poll(0)
            settlement.settle()
            session.after_turn(time.monotonic())
        self._drain(session)

    def _forward_turn(self, session: ChannelSession) -> None:
        if session.deliveries:
            self._forward(session)
        if session.presence is not None and session.presence.events:
            session.presence.forward()

    def _forward(self, session: ChannelSession) -> None:
        """Produce this turn's deliveries (their delivery reports settle them) or park them."""
        deliveries, session.deliveries = session.deliveries, []
        self.stats.consumed += len(deliveries)
        settlement = session.settlement
        # Once per delivery: locals, the route from a dict, no Python call but inspect_body.
        add, max_bytes = settlement.tracker.add, self.max_message_bytes
        cached, route_for_queue, waiting = self.routes.cached, self.routes.get, self.backoff.waiting
        produce, on_delivery = self.producer.produce, settlement.on_delivery
        for queue, method, properties, body in deliveries:
            tag = method.delivery_tag
            add(tag)
            routing_key = method.routing_key
            route = cached.get((queue, routing_key)) or route_for_queue(queue, routing_key)
            reason, detail, msg_id = inspect_body(body, max_bytes)
            if reason is not None:
                settlement.park(tag, body, reason, detail, queue, routing_key, method.exchange,
                                properties.headers)
                continue
            headers = [*route.headers, ("msg_id", msg_id)] if msg_id else [*route.headers]
            if properties.headers or properties.content_type:  # an MQTT 5 device's properties
                headers += message_headers(properties.headers, properties.content_type)
            if waiting and queue in waiting:  # after its refused ones, in order
                settlement.hold(tag, route, body, headers)
                continue
            try:
                produce(route.topic, body, route.key, headers=headers,
                        on_delivery=partial(on_delivery, tag, route))
            except (BufferError, KafkaException):
                settlement.produce(tag, route, body, headers, properties.headers, method.exchange)

    def _drain(self, session: ChannelSession) -> None:
        """Stop consuming, let Kafka confirm what is in flight, ack that, leave the rest unacked."""
        if self.fatal_error is not None:
            return
        settlement = session.settlement
        LOGGER.info("stopping: cancelling %d consumers, flushing Kafka (up to %.0f s)",
                    len(session.consumers), self.options.flush_timeout)
        for consumer_tag in list(session.consumers.values()):
            session.channel.basic_cancel(consumer_tag)
        session.consumers = {}
        deadline = time.monotonic() + self.options.flush_timeout
        tracker = settlement.tracker
        # Held deliveries are not in Kafka's hands: they stay unacked, RabbitMQ delivers them again.
        while ((tracker.in_flight - len(tracker.held) or session.deliveries)
               and time.monotonic() < deadline):
            if session.deliveries:
                self._forward(session)  # delivered before the cancel took effect
            self.producer.flush(min(0.1, max(0.0, deadline - time.monotonic())))
            settlement.settle(force=True)
            session.connection.process_data_events(time_limit=0)
        settlement.settle(force=True)
        if tracker.in_flight:
            LOGGER.warning("%d deliveries not confirmed by Kafka in time or held: left unacked, "
                           "RabbitMQ delivers them again", tracker.in_flight)
