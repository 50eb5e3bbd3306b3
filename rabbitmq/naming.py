"""The names of the RabbitMQ topology and their parsers: exchanges, queues, routing keys, MQTT
topics, headers and device ids. Pure: no broker client is imported, so a consumer of records can
use them without the provisioning code (rabbitmq/topology.py declares what is named here).
"""
from __future__ import annotations

import re

TOPIC_EXCHANGE = "webos.topic"
FANOUT_EXCHANGE = "webos.fanout"
UNROUTED_EXCHANGE = "webos.unrouted"
UNROUTED_QUEUE = "webos.unrouted"
DEAD_QUEUE = "webos.dead"
# Devices' MQTT connects and disconnects, from RabbitMQ's event exchange, for the bridge to
# forward to Kafka's webos.presence. Bounded: without a bridge, the oldest events go first.
PRESENCE_QUEUE = "webos.presence"
CONNECTION_EVENTS = ("connection.created", "connection.closed")
PRESENCE_MAX_LENGTH = 100_000
MESSAGE_TYPES = ("info", "warning", "error")
# The other direction: a command to a device (key webos.<device>.command, or webos.broadcast.command
# for every device) lands only in the device's MQTT subscription queue; its answer comes back on
# webos.<device>.reply into REPLIES_QUEUE. A command that outlives its TTL in a subscription queue
# is dead-lettered into EXPIRED_QUEUE, so its expiry is reported, not lost.
COMMAND_TYPE = "command"
REPLY_TYPE = "reply"
BROADCAST = "broadcast"
REPLIES_QUEUE = "webos.replies"
EXPIRED_QUEUE = "webos.expired"
# What the MQTT plugin names a session's queue for its QoS 1 subscriptions (RabbitMQ 4.0).
SUBSCRIPTION_QUEUE_PREFIX = "mqtt-subscription-"
SUBSCRIPTION_QUEUE_SUFFIX = "qos1"
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A device logs in as the user its certificate names: no device may take a service user's name,
# nor a name whose queue would be one of the shared queues.
RESERVED_ID_PREFIX = "webos-"
DEVICE_QUEUE_PREFIX = "webos."
RESERVED_IDS = frozenset([BROADCAST, *(name[len(DEVICE_QUEUE_PREFIX):] for name in (
    UNROUTED_QUEUE, DEAD_QUEUE, PRESENCE_QUEUE, REPLIES_QUEUE, EXPIRED_QUEUE))])
# Where rabbitmq_event_exchange publishes what happens in the broker (headers name, vhost, ...),
# and the events the bridge finds new device queues by.
EVENT_EXCHANGE = "amq.rabbitmq.event"
QUEUE_EVENTS = ("queue.created", "queue.deleted")
# How often a quorum queue delivers a message before it dead-letters it to webos.dead (a
# message that makes its consumer crash each time, say). A classic queue has no such limit.
DELIVERY_LIMIT = 20
# What a message parked in webos.dead carries: why (and in detail), and where it came from.
DEAD_REASON_HEADER = "x-webos-dead-reason"
DEAD_DETAIL_HEADER = "x-webos-dead-detail"
DEAD_QUEUE_HEADER = "x-webos-queue"
DEAD_ROUTING_KEY_HEADER = "x-webos-routing-key"
DEAD_EXCHANGE_HEADER = "x-webos-exchange"
# What `python -m bridge dead redrive` adds when it puts a parked message back on its route: how
# often it was redriven, and each earlier parking (JSON list of {reason, detail, parked_at}).
REDRIVES_HEADER = "x-webos-redrives"
DEAD_HISTORY_HEADER = "x-webos-dead-history"

# Reasons a message is parked in webos.dead (the value of the x-webos-dead-reason header).
NOT_JSON = "not-json"
NOT_OBJECT = "not-a-json-object"
TOO_LARGE = "too-large"
KAFKA_REJECTED = "kafka-rejected"
DEAD_REASONS = (NOT_JSON, NOT_OBJECT, TOO_LARGE, KAFKA_REJECTED)


def header_text(value) -> str:
    """An AMQP header value as text: RabbitMQ sends strings as bytes (undecodable bytes replaced),
    a missing header is ''."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def is_valid_device_id(device: str) -> bool:
    """True when `device` may name a device: 1-64 of A-Z a-z 0-9 _ - (no `.`, `/`, `+`, `#`),
    not starting with `webos-` (the service users' names)."""
    return (isinstance(device, str) and DEVICE_ID_PATTERN.fullmatch(device) is not None
            and not device.startswith(RESERVED_ID_PREFIX) and device not in RESERVED_IDS)


def checked_device(device: str) -> str:
    if not is_valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -, "
                         f"not starting with {RESERVED_ID_PREFIX} and not "
                         f"{', '.join(sorted(RESERVED_IDS))}")
    return device


def device_queue(device: str) -> str:
    """The queue that holds one device's messages."""
    return DEVICE_QUEUE_PREFIX + checked_device(device)


def routing_key(device: str, message_type: str) -> str:
    """The routing key a device message carries on `webos.topic`."""
    return f"webos.{checked_device(device)}.{message_type}"


def mqtt_topic(device: str, message_type: str) -> str:
    """The MQTT topic a device publishes to; the MQTT plugin maps `/` to `.`."""
    return f"webos/{checked_device(device)}/{message_type}"


def device_of_queue(queue: str) -> str | None:
    """The device id a queue belongs to, or None for a queue that is not a device queue."""
    if not queue.startswith(DEVICE_QUEUE_PREFIX):
        return None
    device = queue[len(DEVICE_QUEUE_PREFIX):]
    if not is_valid_device_id(device):
        return None
    return device


def parse_routing_key(key: str) -> tuple[str, str] | None:
    """(device, type) from `webos.<device>.<type>`, or None when the key has another shape."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "webos" and is_valid_device_id(parts[1]):
        return parts[1], parts[2]
    return None


def command_routing_key(target: str) -> str:
    """The routing key of a command to `target`: a device id, or BROADCAST for every device."""
    return f"webos.{target if target == BROADCAST else checked_device(target)}.{COMMAND_TYPE}"


def command_topic(target: str) -> str:
    """The MQTT topic a device subscribes to for commands to it (or, BROADCAST, to all)."""
    return command_routing_key(target).replace(".", "/")


def reply_topic(device: str) -> str:
    """The MQTT topic a device answers commands on."""
    return mqtt_topic(device, REPLY_TYPE)


def subscription_queue(device: str) -> str:
    """The queue RabbitMQ's MQTT plugin keeps a device's QoS 1 subscriptions (its commands) in."""
    return f"{SUBSCRIPTION_QUEUE_PREFIX}{checked_device(device)}{SUBSCRIPTION_QUEUE_SUFFIX}"


def device_of_subscription_queue(queue: str) -> str | None:
    """The device whose MQTT subscription queue `queue` is, or None."""
    if not (queue.startswith(SUBSCRIPTION_QUEUE_PREFIX) and queue.endswith(SUBSCRIPTION_QUEUE_SUFFIX)):
        return None
    device = queue[len(SUBSCRIPTION_QUEUE_PREFIX):-len(SUBSCRIPTION_QUEUE_SUFFIX)]
    return device if is_valid_device_id(device) else None
