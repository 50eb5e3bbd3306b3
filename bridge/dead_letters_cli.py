"""`python -m bridge dead list | redrive | purge`: the command line over bridge/dead_letters.py
(what sits in webos.dead, and acting on it: see its docstring)."""
from __future__ import annotations

import argparse
import json
import sys
import time

import pika.exceptions

from bridge.dead_letters import (DEFAULT_MAX_REDRIVES, Outcome, Redriver, Selection, _purge,
                                 peek, sweep)
from common.config import Settings, load_settings, positive_int
from rabbitmq.naming import DEAD_HISTORY_HEADER, DEAD_QUEUE, REDRIVES_HEADER


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
