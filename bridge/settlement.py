"""Settlement: what Kafka's delivery reports ask for a connection's deliveries (ack, requeue,
park, send alone), done by the loop between its AMQP waits.

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


class ParkingRefused(Exception):
    """webos.dead did not take a parked copy (unroutable or nacked); reconnect and try again."""


class Settlement:
    """One connection's acks, requeues and parkings, from what Kafka reported."""

    def __init__(self, channel, dead_channel, producer: Producer, stats: BridgeStats,
                 prefetch: int, flush_timeout: float):
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
        self.to_nack: list[int] = []
        self.to_park: list[tuple[int, Route, bytes, list, str]] = []
        self.to_isolate: list[tuple[int, Route, bytes, list, str]] = []

    def on_delivery(self, tag: int, route: Route, error, record, alone: bool = False) -> None:
        """Kafka's delivery report: note it; acks, nacks and counters are `settle`'s job."""
        if not self.open:
            self.stats.forgotten += 1  # its delivery tag died with the old channel
        elif error is None:
            self.confirmed.append((tag, record.latency()))
        elif error.code() in REJECTED_BY_KAFKA:
            # Kafka refuses whole batches: a good record batched with a bad one fails with it.
            # Only a record refused when sent alone is parked.
            detail = f"{error.name()}: {error.str()}"
            (self.to_park if alone else self.to_isolate).append(
                (tag, route, record.value(), record.headers() or [], detail))
        else:
            LOGGER.warning("Kafka did not take a record from %s (%s); requeueing it",
                           route.queue, error.str())
            self.to_nack.append(tag)

    def produce(self, tag: int, route: Route, body: bytes, headers: list, amqp_headers=None,
                exchange: str = "", alone: bool = False) -> None:
        """Produce one record, waiting while librdkafka's queue is full; park what it refuses."""
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
                self.park(tag, body, KAFKA_REJECTED, str(error.args[0]), route.queue,
                          route.routing_key, exchange, amqp_headers)
                return

    def settle(self, force: bool = False) -> None:
        """Send the nacks, parks and acks the delivery reports asked for (`force`: ack now)."""
        stats, tracker = self.stats, self.tracker
        if self.confirmed:
            confirmed, self.confirmed = self.confirmed, []
            tracker.confirm_all(confirmed)
            stats.produced += len(confirmed)
            stats.latency.observe_all(latency for _, latency in confirmed)
        if self.to_nack:
            for tag in self.to_nack:
                self.channel.basic_nack(tag, requeue=True)
                tracker.nacked(tag)
                stats.requeued += 1
            self.to_nack.clear()
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
        stats.in_flight = tracker.in_flight

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
