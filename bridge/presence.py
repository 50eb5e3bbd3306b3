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
from functools import partial

from pika import exceptions as amqp_errors

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
    instance at a time gets them (single active consumer), so a device's events stay in order."""

    def __init__(self, connection, producer, topic: str, instance: str, stats: BridgeStats):
        self.producer = producer
        self.topic = topic
        self.stats = stats
        self.events: list[tuple] = []  # (method, properties) of this turn
        self.open = True
        self.channel = connection.channel()
        self.channel.basic_qos(prefetch_count=PRESENCE_PREFETCH)
        self.channel.basic_consume(naming.PRESENCE_QUEUE, self.on_event,
                                   consumer_tag=f"webos-bridge-presence {instance}")
        LOGGER.info("consuming %s: device presence to Kafka topic %s (one bridge instance at "
                    "a time)", naming.PRESENCE_QUEUE, topic)

    @classmethod
    def start(cls, connection, producer, topic: str, instance: str,
              stats: BridgeStats) -> "PresenceForwarder | None":
        """A forwarder, or None (logged) when webos.presence cannot be consumed."""
        try:
            return cls(connection, producer, topic, instance, stats)
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
            while True:
                try:
                    self.producer.produce(self.topic, value, device.encode(), headers=headers,
                                          on_delivery=partial(self.on_delivery, tag))
                    break
                except BufferError:
                    self.producer.poll(0.05)

    def on_delivery(self, tag: int, error, record) -> None:
        """Kafka's report on a presence record: ack its event, or requeue it."""
        if not self.open or not self.channel.is_open:
            return  # its channel is gone: RabbitMQ delivers it again
        if error is None:
            self.stats.presence += 1
            self.channel.basic_ack(tag)
        else:
            LOGGER.warning("Kafka did not take a presence record (%s); requeueing it", error.str())
            self.channel.basic_nack(tag, requeue=True)
