"""Device presence: RabbitMQ's connection events, as the records of Kafka's webos.presence.

rabbitmq_event_exchange publishes `connection.created` and `connection.closed` with empty bodies
and the connection's properties as headers (seen on 4.0.5: `user`, `node`, `protocol`
"{'MQTT',{3,1,1}}", `client_properties` ['{client_id,longstr,<<"D1">>}'], `timestamp_in_ms`,
and on a closed connection no reason). A device's MQTT connection becomes one record: key = the
device id, which is the user its certificate proved (not the client id it chose), value

    {"type": "connected" | "disconnected", "device", "client_id", "node", "ts", ["reason"]}

Other connections (AMQP clients, service users) are not presence and give no record.
"""
from __future__ import annotations

import json
import logging
import re
import time
from functools import partial

from pika import exceptions as amqp_errors

from bridge.backoff import QueueBackoff, refusal
from bridge.metrics import BridgeStats
from rabbitmq import naming
from rabbitmq.naming import header_text, is_valid_device_id

LOGGER = logging.getLogger(__name__)
PRESENCE_PREFETCH = 100  # connection events in flight on webos.presence's channel

EVENT_TYPES = {"connection.created": "connected", "connection.closed": "disconnected"}
_CLIENT_ID = re.compile(r'\{client_id,longstr,<<"(.*)">>\}')


def presence_record(event: str, headers: dict | None) -> tuple[str, bytes] | None:
    """(device, JSON value) for a device's MQTT connect or disconnect, else None."""
    kind = EVENT_TYPES.get(event)
    headers = headers or {}
    device = header_text(headers.get("user"))
    if kind is None or "MQTT" not in header_text(headers.get("protocol")) \
            or not is_valid_device_id(device):
        return None
    client_id = ""
    for item in headers.get("client_properties") or ():
        match = _CLIENT_ID.fullmatch(header_text(item))
        if match:
            client_id = match.group(1)
    value = {"type": kind, "device": device, "client_id": client_id,
             "node": header_text(headers.get("node")), "ts": int(headers.get("timestamp_in_ms") or 0)}
    if headers.get("reason"):
        value["reason"] = header_text(headers["reason"])
    return device, json.dumps(value, separators=(",", ":")).encode()


class PresenceForwarder:
    """One connection's forwarding of webos.presence to Kafka, on a channel of its own (its few
    deliveries are acked one by one, apart from the device messages' batches). One bridge
    instance at a time gets them (single active consumer), so a device's events stay in order.
    What Kafka refuses for a reason that may pass is held and produced again after a back-off
    (bridge/backoff.py), with every later event, in order; acks are one by one, so nothing
    else waits behind it."""

    def __init__(self, connection, producer, topic: str, instance: str, stats: BridgeStats,
                 retry_max_seconds: float = 60.0):
        self.producer = producer
        self.topic = topic
        self.stats = stats
        self.events: list[tuple] = []  # (method, properties) of this turn
        self.open = True
        self.backoff = QueueBackoff(retry_max_seconds)
        self.refused: list[tuple[int, bytes, bytes, list, str]] = []  # reported, not yet held
        self.held: list[tuple[int, bytes, bytes, list]] = []  # (tag, key, value, headers)
        self.channel = connection.channel()
        self.channel.basic_qos(prefetch_count=PRESENCE_PREFETCH)
        self.channel.basic_consume(naming.PRESENCE_QUEUE, self.on_event,
                                   consumer_tag=f"webos-bridge-presence {instance}")
        LOGGER.info("consuming %s: device presence to Kafka topic %s (one bridge instance at "
                    "a time)", naming.PRESENCE_QUEUE, topic)

    @classmethod
    def start(cls, connection, producer, topic: str, instance: str, stats: BridgeStats,
              retry_max_seconds: float) -> "PresenceForwarder | None":
        """A forwarder, or None (logged) when webos.presence cannot be consumed."""
        try:
            return cls(connection, producer, topic, instance, stats, retry_max_seconds)
        except amqp_errors.ChannelClosedByBroker as error:
            LOGGER.warning("not forwarding device presence: %s (apply the topology: python -m "
                           "rabbitmq.topology)", error.reply_text)
            return None

    def on_event(self, channel, method, properties, body: bytes) -> None:
        """One connection event: noted for `forward`."""
        self.events.append((method, properties))

    def forward(self) -> None:
        """Produce this turn's device connects and disconnects, keyed by device; each is acked
        once Kafka has it (the events of other connections at once)."""
        events, self.events = self.events, []
        for method, properties in events:
            tag = method.delivery_tag
            record = presence_record(method.routing_key, properties.headers)
            if record is None:
                self.channel.basic_ack(tag)
                continue
            device, value = record
            headers = [("type", EVENT_TYPES[method.routing_key].encode())]
            if naming.PRESENCE_QUEUE in self.backoff:
                self.held.append((tag, device.encode(), value, headers))
            else:
                self._produce(tag, device.encode(), value, headers)

    def _produce(self, tag: int, key: bytes, value: bytes, headers: list) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value, key, headers=headers,
                                      on_delivery=partial(self.on_delivery, tag))
                return
            except BufferError:
                self.producer.poll(0.05)

    def on_delivery(self, tag: int, error, record) -> None:
        """Kafka's report on a presence record: ack its event, or note the refusal."""
        if not self.open or not self.channel.is_open:
            return  # its channel is gone: RabbitMQ delivers it again
        if error is None:
            self.stats.presence += 1
            self.channel.basic_ack(tag)
            self.backoff.taken(naming.PRESENCE_QUEUE)
        else:
            self.refused.append((tag, record.key(), record.value(), record.headers() or [],
                                 refusal(error)))

    @property
    def backing_off(self) -> bool:
        """True while anything is refused, held or waiting: `release_due` has work."""
        return bool(self.refused or self.held or self.backoff.waiting)

    def release_due(self, now: float | None = None) -> None:
        """Hold what Kafka refused; once the back-off is due, produce what is held, in order."""
        now = time.monotonic() if now is None else now
        refused, self.refused = self.refused, []
        for tag, key, value, headers, detail in refused:
            wait = self.backoff.refused(naming.PRESENCE_QUEUE, detail, now)
            if wait is not None and self.backoff.should_log(detail, now):
                LOGGER.warning("Kafka refuses presence records (%s): holding them, next try in "
                               "%.1f s", detail, wait)
            self.held.append((tag, key, value, headers))
        if self.held and self.backoff.due(now):
            held, self.held = sorted(self.held, key=lambda item: item[0]), []
            for tag, key, value, headers in held:
                self._produce(tag, key, value, headers)
