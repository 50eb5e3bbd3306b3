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

import argparse
import datetime as dt
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pika
import pika.exceptions

from common.config import Settings, load_settings, positive_int
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
    with pika.BlockingConnection(parameters) as connection:
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


# ---------------------------------------------------------------------------------------------
# The command line

def print_table(count: int, rows: list[dict], out,
                selection: Selection = Selection(everything=True)) -> None:
    if selection.everything:
        print(f"{count} message(s) in {DEAD_QUEUE}" + (f"; the first {len(rows)}:" if rows and
              len(rows) < count else ":" if rows else "."), file=out)
    else:
        print(f"{count} message(s) in {DEAD_QUEUE}; {len(rows)} selected ({selection})"
              + (":" if rows else "."), file=out)
    if not rows:
        return
    columns = ("parked_at", "device", "reason", "redrives", "size", "detail")
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) for c in columns[:-1]}
    print("  ".join(c.upper().ljust(widths.get(c, 0)) for c in columns), file=out)
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths.get(c, 0)) for c in columns[:-1])
              + "  " + row["detail"][:120], file=out)


def _selection(args, parser) -> Selection:
    reasons, devices = frozenset(args.reason or ()), frozenset(args.device or ())
    everything = getattr(args, "all", not (reasons or devices))  # `list` shows all by default
    if everything and (reasons or devices):
        parser.error("--all selects every message: leave out --reason and --device")
    if not (everything or reasons or devices):
        parser.error("say which messages: --reason R, --device D (each may repeat) or --all")
    return Selection(reasons, devices, everything)


def _add_selection_flags(command, with_all: bool = True) -> None:
    command.add_argument("--reason", action="append", metavar="REASON",
                         help="messages parked for this reason (not-json, not-a-json-object, "
                              "too-large, kafka-rejected, delivery_limit); may repeat")
    command.add_argument("--device", action="append", metavar="DEVICE",
                         help="messages of this device; may repeat (with --reason: both hold)")
    if with_all:
        command.add_argument("--all", action="store_true", help="every message in the queue")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bridge dead",
        description=f"Inspect the messages parked in {DEAD_QUEUE}, put them back on their way "
                    "once their cause is fixed, or remove them.")
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser(
        "list", help="print the parked messages without taking them out of the queue",
        description=f"Print what sits in {DEAD_QUEUE}: device, reason, how often redriven, size, "
                    "detail and when it was parked. The messages stay in the queue, in their "
                    "order. Runs as webos-bridge.")
    _add_selection_flags(listing, with_all=False)
    listing.add_argument("--format", choices=["table", "json"], default="table",
                         help="table (default) or one JSON object per line")
    listing.add_argument("--limit", type=positive_int, default=1000,
                         help="show at most this many, the oldest first (default: %(default)s)")
    redrive = sub.add_parser(
        "redrive", help="publish selected messages back to their original route",
        description="Publish each selected message back to the exchange and routing key it "
                    f"first came by, then remove it from {DEAD_QUEUE} (only after RabbitMQ "
                    "confirmed the new copy: killed halfway, nothing is lost). Its "
                    f"{REDRIVES_HEADER} header counts the redrives and {DEAD_HISTORY_HEADER} "
                    "keeps each earlier parking, so one that fails again is parked again with "
                    "its history. Fix the cause first (a topic's size limit, the bridge's "
                    "--max-message-bytes). Runs as the operator, WEBOS_ADMIN_USER.")
    _add_selection_flags(redrive)
    redrive.add_argument("--max-redrives", type=positive_int, default=DEFAULT_MAX_REDRIVES,
                         help="leave a message in place once redriven this often "
                              "(default: %(default)s)")
    purge = sub.add_parser(
        "purge", help="remove selected messages for good (asks first)",
        description=f"Remove the selected messages from {DEAD_QUEUE}. Shows how many match and "
                    "asks for a yes on stdin unless --yes is given. Runs as the operator, "
                    "WEBOS_ADMIN_USER.")
    _add_selection_flags(purge)
    purge.add_argument("--yes", action="store_true", help="do not ask")
    return parser


def _confirmed(prompt: str) -> bool:
    print(prompt, end=" ", file=sys.stderr, flush=True)
    try:
        answer = input()
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def _report_left(outcome: Outcome) -> None:
    for why, count in outcome.left.most_common():
        print(f"  {count} left in {DEAD_QUEUE}: {why}", file=sys.stderr)


def run_command(args, parser, settings: Settings) -> int:
    selection = _selection(args, parser)
    if args.command == "list":
        count, rows = peek(settings, args.limit, selection)
        if args.format == "json":
            for row in rows:
                print(json.dumps(row))
            print(f"{count} message(s) in {DEAD_QUEUE}, {len(rows)} shown", file=sys.stderr)
        else:
            print_table(count, rows, sys.stdout, selection)
        return 0
    operator = {"user": settings.admin_user, "password": settings.admin_password}
    if args.command == "redrive":
        started = time.monotonic()
        outcome = sweep(settings, Redriver(args.max_redrives), selection, **operator,
                        progress=lambda o: print(
                            f"... {o.done} redriven ({o.done / (time.monotonic() - started):.0f}/s)",
                            file=sys.stderr, flush=True))
        print(f"redriven {outcome.done} of {outcome.matched} message(s) selected ({selection}) "
              f"of {outcome.in_queue} in {DEAD_QUEUE}")
        _report_left(outcome)
        return 0
    matching = sweep(settings, None, selection).matched
    if not matching:
        print(f"no message in {DEAD_QUEUE} matches ({selection})")
        return 0
    if not args.yes and not _confirmed(
            f"remove {matching} message(s) ({selection}) from {DEAD_QUEUE} for good? [y/N]"):
        print("nothing removed", file=sys.stderr)
        return 1
    outcome = sweep(settings, _purge, selection, **operator, limit=matching)
    print(f"purged {outcome.done} message(s) ({selection}) from {DEAD_QUEUE}")
    return 0


def main(argv=None) -> int:
    settings = load_settings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args, parser, settings)
    except (pika.exceptions.AMQPError, OSError) as error:
        user = settings.bridge_user if args.command == "list" else settings.admin_user
        print(f"python -m bridge dead {args.command}: cannot work on {DEAD_QUEUE} at "
              f"{settings.rabbitmq_host}:{settings.amqp_port} as {user} ({error!r}): is RabbitMQ "
              "up (make up) and its password right in .env?", file=sys.stderr)
        return 1
