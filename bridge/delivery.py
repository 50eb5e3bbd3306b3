"""Pure logic of the bridge: what a delivery becomes in Kafka, why one is parked, which tags to ack.

Nothing here talks to a broker, so all of it is unit-tested without one.
"""
from __future__ import annotations

import json
import string
from collections import deque
from dataclasses import dataclass

import orjson

from rabbitmq import naming
from rabbitmq.naming import NOT_JSON, NOT_OBJECT, TOO_LARGE

TEMPLATE_FIELDS = ("device", "type", "queue", "routing_key")
UNKNOWN_TYPE = "unknown"


class TemplateError(ValueError):
    """A topic template names a placeholder the bridge does not know."""


def check_template(template: str) -> str:
    """`template` if every placeholder in it is one of {device} {type} {queue} {routing_key}."""
    try:
        fields = [name for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise TemplateError(f"topic template {template!r}: {error}") from None
    unknown = sorted({name for name in fields if name not in TEMPLATE_FIELDS})
    if unknown:
        raise TemplateError(f"topic template {template!r} uses {', '.join(unknown)}; "
                            f"allowed placeholders: {', '.join('{%s}' % f for f in TEMPLATE_FIELDS)}")
    if not template.format(device="d", type="t", queue="q", routing_key="r"):
        raise TemplateError("topic template is empty")
    return template


@dataclass(frozen=True)
class Route:
    """Where and how a delivery from one queue with one routing key goes in Kafka."""

    topic: str
    key: bytes
    headers: tuple[tuple[str, bytes], ...]
    queue: str
    routing_key: str


def route_for(template: str, queue: str, routing_key: str) -> Route:
    """The Kafka topic, key and fixed headers for a delivery from `queue` with `routing_key`."""
    device = naming.device_of_queue(queue) or queue
    parsed = naming.parse_routing_key(routing_key)
    # A broadcast (webos.fanout) copy may carry any routing key; the queue still says whose it is.
    message_type = parsed[1] if parsed and parsed[0] == device else UNKNOWN_TYPE
    mqtt_topic = routing_key.replace(".", "/")
    topic = template.format(device=device, type=message_type, queue=queue, routing_key=routing_key)
    headers = (("routing_key", routing_key.encode()), ("mqtt_topic", mqtt_topic.encode()),
               ("device", device.encode()), ("type", message_type.encode()),
               ("queue", queue.encode()))
    return Route(topic, device.encode(), headers, queue, routing_key)


# An MQTT 5 device's user properties (which RabbitMQ hands on as AMQP headers of the same names)
# reach Kafka as headers USER_HEADER_PREFIX + name; its content type as CONTENT_TYPE_HEADER. The
# prefix keeps them apart from the bridge's own headers above, whatever a device names them.
USER_HEADER_PREFIX = "user."
CONTENT_TYPE_HEADER = "content_type"


def message_headers(amqp_headers: dict | None, content_type: str | None) -> list[tuple[str, bytes]]:
    """The Kafka headers a delivery's own properties give: content type, then each AMQP header."""
    headers = [(CONTENT_TYPE_HEADER, content_type.encode())] if content_type else []
    for name, value in (amqp_headers or {}).items():
        if isinstance(value, str):
            value = value.encode()
        elif not isinstance(value, bytes):
            # An AMQP client may send numbers, booleans or nested tables: JSON says which it was.
            value = json.dumps(value, default=str).encode()
        headers.append((USER_HEADER_PREFIX + name, value))
    return headers


class RouteCache:
    """route_for() memoised per (queue, routing key); bounded so odd routing keys cannot grow it."""

    def __init__(self, template: str, limit: int = 10_000):
        self.template = check_template(template)
        self.limit = limit
        self._routes: dict[tuple[str, str], Route] = {}
        self.cached = self._routes  # read directly on the hot path; misses go through get()

    def get(self, queue: str, routing_key: str) -> Route:
        """The route for one delivery."""
        route = self._routes.get((queue, routing_key))
        if route is None:
            if len(self._routes) >= self.limit:
                self._routes.clear()  # in place: `cached` is the same dict
            route = self._routes[(queue, routing_key)] = route_for(self.template, queue, routing_key)
        return route


def inspect_body(body: bytes, max_bytes: int) -> tuple[str | None, str | None, str]:
    """(reason, detail, msg_id): reason is None for a body Kafka should get, else why it is parked.

    Called for every message: the common case (a JSON object) is parsed by orjson, which is
    stricter than json (RFC 8259, valid UTF-8 only); whatever it refuses is judged by json.loads,
    so what passes is exactly what json.loads takes, with json's words for the reason.
    """
    if len(body) > max_bytes:
        return TOO_LARGE, f"{len(body)} bytes is more than message.max.bytes={max_bytes}", ""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if type(document) is not dict:
        try:
            document = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as error:
            return NOT_JSON, f"not UTF-8: {error}"[:200], ""
        except ValueError as error:
            return NOT_JSON, str(error)[:200], ""
        if not isinstance(document, dict):
            return NOT_OBJECT, f"a JSON {type(document).__name__}, not an object", ""
    msg_id = document.get("msg_id")
    return None, None, msg_id if isinstance(msg_id, str) else ""


class AckTracker:
    """Delivery tags of one channel, from delivery to settlement, acked in contiguous batches.

    `add(tag)`: a delivery arrived (tags grow on a channel). `confirm(tag)`: Kafka confirmed its
    record, or webos.dead its parked copy. `nacked(tag)`: it was requeued. `take_ackable()` returns
    the highest tag below which every tag is settled: one `basic_ack(tag, multiple=True)` then
    acks exactly the confirmed ones (nacked ones are no longer outstanding on the broker, so
    `multiple` skips them). `ack_due(now)` batches those acks: one per `batch` confirmed tags or
    per `interval` seconds, since each ack costs the loop a socket write.

    `held`: tags kept unacked while their queue backs off (bridge/backoff.py). A held tag at the
    head would stop every later ack, and with them the other queues (their prefetch windows
    fill): while one is there, `take_singles()` hands out the confirmed tags behind it to be
    acked one by one (an ack with `multiple` would settle the held tag too).
    """

    def __init__(self, batch: int = 1, interval: float = 0.0):
        self.batch = batch
        self.interval = interval
        self._outstanding: deque[int] = deque()
        self._settled: set[int] = set()
        self._ack_tag = 0        # highest confirmed tag taken and not yet acked
        self._ack_count = 0      # confirmed deliveries that ack will settle
        self._ack_since = 0.0    # when the oldest of them was taken
        self.held: set[int] = set()
        # Called once per message: bound builtins, no Python frame.
        self.add = self._outstanding.append
        self.confirm = self._settled.add

    def __len__(self) -> int:
        return len(self._outstanding)

    @property
    def in_flight(self) -> int:
        """Tags delivered and not yet acked or nacked (confirmed ones waiting for their ack too)."""
        return len(self._outstanding) + self._ack_count

    def confirm_all(self, confirmed) -> None:
        """`confirm` for each (tag, anything) pair."""
        self._settled.update(tag for tag, _ in confirmed)

    def nacked(self, tag: int) -> None:
        """The tag was nacked (requeued) on the broker; skip it when acking."""
        self._settled.add(-tag)

    def head_held(self) -> bool:
        """True when the oldest unsettled tag is held: later confirmed ones need `take_singles`."""
        return bool(self.held) and bool(self._outstanding) and self._outstanding[0] in self.held

    def take_singles(self) -> list[int]:
        """The confirmed tags (to ack one by one), taken out; nacked ones are dropped too."""
        outstanding, settled = self._outstanding, self._settled
        singles, kept = [], []
        for tag in outstanding:
            if tag in settled:
                settled.remove(tag)
                singles.append(tag)
            elif -tag in settled:
                settled.remove(-tag)
            else:
                kept.append(tag)
        outstanding.clear()  # in place: `add` is bound to this deque
        outstanding.extend(kept)
        return singles

    def take_ackable(self) -> tuple[int, int]:
        """(highest tag to ack with multiple=True or 0, how many confirmed tags that acks)."""
        outstanding, settled = self._outstanding, self._settled
        last = 0
        acked = 0
        while outstanding:
            tag = outstanding[0]
            if tag in settled:
                settled.remove(tag)
                last = tag
                acked += 1
            elif -tag in settled:
                settled.remove(-tag)
            else:
                break
            outstanding.popleft()
        return last, acked

    def ack_due(self, now: float, force: bool = False) -> tuple[int, int]:
        """(tag to ack with multiple=True, how many it acks) when a batch is due, else (0, 0).

        Due when `batch` confirmed tags wait, when the oldest has waited `interval` seconds, or
        at once with `force`. The caller must send that ack: the tracker counts them as acked.
        """
        last, count = self.take_ackable()
        if last:
            if not self._ack_count:
                self._ack_since = now
            self._ack_tag = last
            self._ack_count += count
        if self._ack_count and (force or self._ack_count >= self.batch
                                or now - self._ack_since >= self.interval):
            due = self._ack_tag, self._ack_count
            self._ack_count = 0
            return due
        return 0, 0
