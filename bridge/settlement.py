"""Settlement: what Kafka's delivery reports ask for a connection's deliveries (ack, park, send
alone, hold while their queue backs off), done by the loop between its AMQP waits.

Delivery reports (called by `poll`/`flush` on the loop's thread) only record; `settle()` acts.
One Settlement per connection: a report that arrives after its connection is gone is only
counted, its delivery tag died with the channel (RabbitMQ delivers that message again).
"""
from __future__ import annotations

import logging
import time
from functools import partial

import pika
from confluent_kafka import KafkaError, KafkaException, Producer
from pika import exceptions as amqp_errors

from bridge.backoff import QueueBackoff, refusal
from bridge.delivery import AckTracker, Route
from bridge.metrics import BridgeStats
from rabbitmq import naming
from rabbitmq.naming import (DEAD_DETAIL_HEADER, DEAD_EXCHANGE_HEADER, DEAD_QUEUE_HEADER,
                             DEAD_REASON_HEADER, DEAD_ROUTING_KEY_HEADER, KAFKA_REJECTED)

LOGGER = logging.getLogger(__name__)

# Delivery errors that say "this record will never be accepted": park it, do not retry it.
REJECTED_BY_KAFKA = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG,
                     KafkaError.INVALID_MSG_SIZE, KafkaError.RECORD_LIST_TOO_LARGE,
                     KafkaError.INVALID_RECORD, KafkaError.TOPIC_EXCEPTION,
                     KafkaError._INVALID_ARG}
ACK_INTERVAL = 0.02  # s: longest a confirmed delivery waits for its (batched) ack
RELEASE_INTERVAL = 0.1  # s between looks at the back-off's due queues (and its metrics)


class ParkingRefused(Exception):
    """webos.dead did not take a parked copy (unroutable or nacked); reconnect and try again."""


class Settlement:
    """One connection's acks, parkings and held deliveries, from what Kafka reported."""

    def __init__(self, channel, dead_channel, producer: Producer, stats: BridgeStats,
                 prefetch: int, flush_timeout: float, backoff: QueueBackoff):
        self.channel = channel
        self.dead_channel = dead_channel  # confirm_delivery is on: a park returns once stored
        self.producer = producer
        self.stats = stats
        self.flush_timeout = flush_timeout
        # Confirmed tags are acked together: one basic.ack (multiple) per ACK_INTERVAL or per
        # quarter window, not one per loop turn.
        self.tracker = AckTracker(max(1, prefetch // 4), ACK_INTERVAL)
        self.open = True  # False once its connection is gone: reports are then only counted
        self.confirmed: list[tuple[int, float | None]] = []  # (tag, latency) Kafka confirmed
        self.to_park: list[tuple[int, Route, bytes, list, str]] = []
        self.to_isolate: list[tuple[int, Route, bytes, list, str]] = []
        self.backoff = backoff  # the forwarder's: it outlives connections
        self.refused: list[tuple[int, Route, bytes, list, str]] = []  # reported, not yet held
        self.held: dict[str, list[tuple[int, Route, bytes, list]]] = {}  # queue -> its held
        self.next_release = 0.0

    def on_delivery(self, tag: int, route: Route, error, record, alone: bool = False) -> None:
        """Kafka's delivery report: note it; acks, nacks and counters are `settle`'s job."""
        if not self.open:
            self.stats.forgotten += 1  # its delivery tag died with the old channel
        elif error is None:
            self.confirmed.append((tag, record.latency()))
            if self.backoff.probing:
                self.backoff.taken(route.queue)
        elif error.code() in REJECTED_BY_KAFKA:
            # Kafka refuses whole batches: a good record batched with a bad one fails with it.
            # Only a record refused when sent alone is parked.
            detail = refusal(error)
            (self.to_park if alone else self.to_isolate).append(
                (tag, route, record.value(), record.headers() or [], detail))
        else:
            self.refused.append((tag, route, record.value(), record.headers() or [],
                                 refusal(error)))

    def produce(self, tag: int, route: Route, body: bytes, headers: list, amqp_headers=None,
                exchange: str = "", alone: bool = False) -> None:
        """Produce one record, waiting while librdkafka's queue is full; park what it refuses
        for good, hold what it refuses for now."""
        callback = partial(self.on_delivery, tag, route, alone=alone)
        while True:
            try:
                self.producer.produce(route.topic, body, route.key, headers=headers,
                                      on_delivery=callback)
                return
            except BufferError:
                # librdkafka's queue is full (prefetch larger than its limits): let it drain.
                self.producer.poll(0.05)
            except KafkaException as error:
                # Raised at once when the client already knows: a record too large is parked,
                # a topic it may not write (or that is gone) is held like a refused record.
                kafka_error = error.args[0]
                detail = refusal(kafka_error)
                if kafka_error.code() in REJECTED_BY_KAFKA:
                    self.park(tag, body, KAFKA_REJECTED, detail, route.queue, route.routing_key,
                              exchange, amqp_headers)
                else:
                    self.refused.append((tag, route, body, headers, detail))
                return

    def settle(self, force: bool = False) -> None:
        """Hold, park and ack as the delivery reports asked (`force`: ack now)."""
        stats, tracker = self.stats, self.tracker
        if self.confirmed:
            confirmed, self.confirmed = self.confirmed, []
            tracker.confirm_all(confirmed)
            stats.produced += len(confirmed)
            stats.latency.observe_all(latency for _, latency in confirmed)
        if self.refused:
            self._hold_refused()
        if self.to_isolate:
            isolated, self.to_isolate = self.to_isolate, []
            for tag, route, value, headers, detail in isolated:
                LOGGER.info("Kafka refused a batch with a record from %s (%s); sending it alone",
                            route.queue, detail)
                self.produce(tag, route, value, headers, alone=True)
                # Rare path: flushing is what makes the next batch hold this one record.
                self.producer.flush(self.flush_timeout)
        if self.to_park:
            parked, self.to_park = self.to_park, []
            for tag, route, value, _, detail in parked:
                self.park(tag, value, KAFKA_REJECTED, detail, route.queue, route.routing_key,
                          "", None)
        last, count = tracker.ack_due(time.monotonic(), force)
        if last:
            self.channel.basic_ack(last, multiple=True)
            stats.acked += count
        if tracker.head_held():
            for tag in tracker.take_singles():
                self.channel.basic_ack(tag)
                stats.acked += 1
        stats.in_flight = tracker.in_flight

    # ---- back-off: hold a refused queue's deliveries, produce them again when it is due ----

    def hold(self, tag: int, route: Route, body: bytes, headers: list) -> None:
        """Keep a delivery unacked, unproduced, until its queue's back-off is due."""
        self.held.setdefault(route.queue, []).append((tag, route, body, headers))
        self.tracker.held.add(tag)
        self.stats.held += 1

    def _hold_refused(self) -> None:
        """Hold what Kafka refused, and put each queue it came from into back-off."""
        now = time.monotonic()
        refused, self.refused = self.refused, []
        started: dict[str, list[float]] = {}  # refusal text -> the waits of the queues it stopped
        for tag, route, value, headers, detail in refused:
            wait = self.backoff.refused(route.queue, detail, now)
            if wait is not None:
                started.setdefault(detail, []).append(wait)
            self.hold(tag, route, value, headers)
            self.stats.refused += 1
        for detail, waits in started.items():
            if self.backoff.should_log(detail, now):
                LOGGER.warning("Kafka refuses records (%s): %d queue(s) more hold their messages "
                               "in RabbitMQ, next try in %.1f-%.1f s, retries doubling up to "
                               "%.0f s (WEBOS_BRIDGE_RETRY_MAX_SECONDS); %d held in all",
                               detail, len(waits), min(waits), max(waits), self.backoff.cap,
                               self.stats.held)

    def release_due(self, now: float) -> None:
        """Produce again, in delivery order, the held deliveries of the queues whose wait is
        over (every RELEASE_INTERVAL s); keep the metrics' view of the back-off current."""
        if now < self.next_release:
            return
        self.next_release = now + RELEASE_INTERVAL
        for queue in self.backoff.due(now):
            held = sorted(self.held.pop(queue, ()), key=lambda item: item[0])
            for tag, route, body, headers in held:
                self.tracker.held.discard(tag)
                self.produce(tag, route, body, headers)
            self.stats.held -= len(held)
        errors: dict[str, int] = {}  # by Kafka's error name: a label of few values
        for detail, count in self.backoff.errors().items():
            name = detail.split(":", 1)[0]
            errors[name] = errors.get(name, 0) + count
        if self.stats.retrying and not errors:
            LOGGER.info("Kafka takes records again: no queue backs off any more")
        self.stats.retrying = errors

    def park(self, tag: int, body: bytes, reason: str, detail: str, queue: str,
             routing_key: str, exchange: str, original_headers) -> None:
        """Publish to webos.dead (confirmed) with the reason, then let the original be acked."""
        LOGGER.warning("parking a message from %s (routing key %s) in %s: %s (%s)", queue,
                       routing_key, naming.DEAD_QUEUE, reason, detail)
        headers = dict(original_headers or {})
        headers.update({DEAD_REASON_HEADER: reason, DEAD_DETAIL_HEADER: detail,
                        DEAD_QUEUE_HEADER: queue, DEAD_ROUTING_KEY_HEADER: routing_key,
                        DEAD_EXCHANGE_HEADER: exchange})
        try:
            self.dead_channel.basic_publish(
                "", naming.DEAD_QUEUE, body, mandatory=True,
                properties=pika.BasicProperties(delivery_mode=2, headers=headers,
                                                timestamp=int(time.time())))
        except (amqp_errors.UnroutableError, amqp_errors.NackError) as error:
            raise ParkingRefused(
                f"{naming.DEAD_QUEUE} did not take a parked message: {error!r}") from None
        self.tracker.confirm(tag)
        self.stats.dead_lettered[reason] += 1
