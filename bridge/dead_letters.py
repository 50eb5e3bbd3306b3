"""`python -m bridge dead list | redrive | purge`: what sits in webos.dead, and acting on it.

`list` consumes the messages without an ack and then closes the channel, so RabbitMQ puts every
one back where it was (only their `redelivered` flag changes). Parked by the bridge, a message
carries x-webos-dead-reason and its detail, queue, exchange and routing key; dead-lettered by a
quorum queue (its delivery limit), RabbitMQ's x-first-death-reason, -queue and -exchange.

`redrive` publishes each selected message back to the exchange and routing key it first came by,
with x-webos-redrives counted up and the parking it leaves added to x-webos-dead-history, and
removes the parked copy only once RabbitMQ confirmed the new one: killed halfway, it leaves a
message in webos.dead, on its way again, or both (a duplicate), never neither. One that fails
again is parked again by the bridge with its count and history; `--max-redrives` keeps a message
that keeps failing out of a loop. `purge` removes the selected messages after a confirmation.
Both run as the operator (WEBOS_ADMIN_USER): the bridge's own user may not write to webos.topic.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pika
import pika.exceptions

from common.config import Settings
from rabbitmq import naming
from rabbitmq import endpoints
from rabbitmq.naming import DEAD_DETAIL_HEADER, DEAD_EXCHANGE_HEADER, DEAD_HISTORY_HEADER, DEAD_QUEUE, DEAD_QUEUE_HEADER, DEAD_REASON_HEADER, DEAD_ROUTING_KEY_HEADER, REDRIVES_HEADER, header_text

IDLE_TIMEOUT = 2.0  # s without a delivery after which a pass ends (fewer than counted)
MAX_PREFETCH = 65_535  # basic.qos takes a 16-bit count; 0 (no limit) above that
DEFAULT_MAX_REDRIVES = 5
PROGRESS_EVERY = 200  # messages, for the line on stderr
# What a parked copy says about its parking; a redriven copy leaves these behind.
PARKING_HEADERS = (DEAD_REASON_HEADER, DEAD_DETAIL_HEADER, DEAD_QUEUE_HEADER,
                   DEAD_ROUTING_KEY_HEADER, DEAD_EXCHANGE_HEADER)
BROKER_DEATH_PREFIXES = ("x-death", "x-first-death-", "x-last-death-")


def describe(properties: pika.BasicProperties, body: bytes) -> dict:
    """One parked message as the listing shows it."""
    headers = properties.headers or {}
    death = (headers.get("x-death") or [{}])[0]
    queue = header_text(headers.get(DEAD_QUEUE_HEADER) or headers.get("x-first-death-queue"))
    parked = properties.timestamp or death.get("time")
    if isinstance(parked, dt.datetime):
        parked = parked.timestamp()
    return {
        "device": naming.device_of_queue(queue) or "",
        "queue": queue,
        "reason": header_text(headers.get(DEAD_REASON_HEADER) or headers.get("x-first-death-reason")),
        "detail": header_text(headers.get(DEAD_DETAIL_HEADER)),
        "exchange": header_text(headers.get(DEAD_EXCHANGE_HEADER) if DEAD_EXCHANGE_HEADER in headers
                          else headers.get("x-first-death-exchange", death.get("exchange"))),
        "routing_key": header_text(headers.get(DEAD_ROUTING_KEY_HEADER)
                             or (death.get("routing-keys") or [""])[0]),
        "redrives": int(headers.get(REDRIVES_HEADER) or 0),
        "history": json.loads(header_text(headers.get(DEAD_HISTORY_HEADER)) or "[]"),
        "size": len(body),
        "parked_at": (dt.datetime.fromtimestamp(parked, dt.timezone.utc).isoformat(timespec="seconds")
                      if parked else ""),
    }


def redriven_properties(properties: pika.BasicProperties, row: dict) -> pika.BasicProperties:
    """The parked message's properties for its way back: the parking's headers (the bridge's and
    the broker's) moved into x-webos-dead-history, x-webos-redrives one higher."""
    headers = {name: value for name, value in (properties.headers or {}).items()
               if name not in PARKING_HEADERS and not name.startswith(BROKER_DEATH_PREFIXES)}
    history = [*row["history"], {key: row[key] for key in ("reason", "detail", "parked_at")}]
    headers[REDRIVES_HEADER] = row["redrives"] + 1
    headers[DEAD_HISTORY_HEADER] = json.dumps(history)
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        headers=headers, delivery_mode=2, priority=properties.priority,
        correlation_id=properties.correlation_id, reply_to=properties.reply_to,
        message_id=properties.message_id, type=properties.type, user_id=properties.user_id,
        app_id=properties.app_id)


@dataclass(frozen=True)
class Selection:
    """Which parked messages a command acts on: any of `reasons` and any of `devices` (either
    may be empty: no condition), or all of them."""
    reasons: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()
    everything: bool = False

    def matches(self, row: dict) -> bool:
        return self.everything or ((not self.reasons or row["reason"] in self.reasons)
                                   and (not self.devices or row["device"] in self.devices))

    def __str__(self) -> str:
        if self.everything:
            return "all"
        parts = [f"reason {' or '.join(sorted(self.reasons))}"] if self.reasons else []
        parts += [f"device {' or '.join(sorted(self.devices))}"] if self.devices else []
        return ", ".join(parts)


@dataclass
class Outcome:
    """What a pass over webos.dead found and did."""
    in_queue: int = 0                       # messages in webos.dead when the pass began
    seen: int = 0
    matched: int = 0
    done: int = 0                           # listed, redriven or purged
    rows: list[dict] = field(default_factory=list)  # what `list` shows
    left: Counter = field(default_factory=Counter)  # why selected messages were left in place


def _parked(channel, count: int) -> Iterator[tuple]:
    """The first `count` messages of webos.dead, delivered unacked on `channel`; ends early when
    none arrives for IDLE_TIMEOUT s (another consumer took some)."""
    if count < 1:
        return
    channel.basic_qos(prefetch_count=count if count <= MAX_PREFETCH else 0)
    for seen, delivery in enumerate(channel.consume(DEAD_QUEUE, inactivity_timeout=IDLE_TIMEOUT), 1):
        if delivery[0] is None:
            return
        yield delivery
        if seen >= count:
            return


def sweep(settings: Settings, act: Callable | None, selection: Selection = Selection(everything=True),
          *, user: str = "", password: str = "", limit: int | None = None,
          progress: Callable[[Outcome], None] | None = None) -> Outcome:
    """One pass over what webos.dead holds now. Each selected message (up to `limit`) goes to
    `act(connection, channel, method, properties, body, row)`, which acks it or returns why it
    stays; without `act` it is listed. Whatever is not acked goes back in place when the
    connection closes."""
    parameters = endpoints.amqp_parameters(settings, user or settings.bridge_user,
                                          password or settings.bridge_password,
                                          connection_attempts=2, retry_delay=1)
    outcome = Outcome()
    with endpoints.open_connection(parameters) as connection:
        channel = connection.channel()
        outcome.in_queue = channel.queue_declare(DEAD_QUEUE, passive=True).method.message_count
        wanted = outcome.in_queue
        if limit is not None and selection.everything:
            wanted = min(wanted, limit)  # no need to look further
        for method, properties, body in _parked(channel, wanted):
            outcome.seen += 1
            row = describe(properties, body)
            if not selection.matches(row):
                continue
            outcome.matched += 1
            if act is None:
                outcome.rows.append(row)
                outcome.done += 1
            else:
                why_left = act(connection, channel, method, properties, body, row)
                if why_left:
                    outcome.left[why_left] += 1
                else:
                    outcome.done += 1
                    if progress and outcome.done % PROGRESS_EVERY == 0:
                        progress(outcome)
            if limit is not None and outcome.matched >= limit:
                break
    return outcome


def peek(settings: Settings, limit: int,
         selection: Selection = Selection(everything=True)) -> tuple[int, list[dict]]:
    """(messages in webos.dead, the first `limit` selected ones described), leaving all in place."""
    outcome = sweep(settings, None, selection, limit=limit)
    return outcome.in_queue, outcome.rows


class Redriver:
    """`act` for a redrive: publish back with a confirm, then ack the parked copy."""

    def __init__(self, max_redrives: int):
        self.max_redrives = max_redrives
        self._publisher = None
        self._queues: dict[str, bool] = {}  # queue -> exists

    def _queue_exists(self, connection, queue: str) -> bool:
        if queue not in self._queues:
            probe = connection.channel()
            try:
                probe.queue_declare(queue, passive=True)
                self._queues[queue] = True
                probe.close()
            except pika.exceptions.ChannelClosedByBroker:
                self._queues[queue] = False
        return self._queues[queue]

    def __call__(self, connection, channel, method, properties, body, row) -> str:
        if row["redrives"] >= self.max_redrives:
            return f"redriven {self.max_redrives} times already (raise --max-redrives or purge)"
        if not row["routing_key"] or not row["queue"]:
            return "its original route is not recorded"
        if not self._queue_exists(connection, row["queue"]):
            return "its queue no longer exists"
        if self._publisher is None:
            self._publisher = connection.channel()
            self._publisher.confirm_delivery()
        # Blocks until RabbitMQ confirmed it (raises when it refused): only then is the parked
        # copy removed.
        # A record Kafka refused in a delivery report is parked without its exchange: a device
        # routing key came by the topic exchange (a queue's own name, by the default one).
        exchange = row["exchange"] or (naming.TOPIC_EXCHANGE
                                       if row["routing_key"] != row["queue"] else "")
        try:
            self._publisher.basic_publish(exchange, row["routing_key"], body,
                                          redriven_properties(properties, row), mandatory=True)
        except pika.exceptions.UnroutableError:
            return f"no queue is bound to {row['routing_key']} on {exchange or 'amq.default'}"
        except pika.exceptions.NackError:
            return "RabbitMQ refused the new copy (nack)"
        channel.basic_ack(method.delivery_tag)
        return ""


def _purge(connection, channel, method, properties, body, row) -> str:
    channel.basic_ack(method.delivery_tag)
    return ""
