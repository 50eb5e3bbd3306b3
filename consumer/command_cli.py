"""`python -m consumer command | broadcast | state`: talk to devices from a terminal or a script."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from confluent_kafka import KafkaException

from common.command_records import COMMAND_NAME, SUCCEEDED
from common.config import load_settings
from consumer.command_line import CommandSender, read_state
from rabbitmq import naming

EXIT_NOT_SUCCEEDED, EXIT_NO_ANSWER = 1, 4

CONTRACT = """\
The command goes to Kafka webos.commands (key = the device id, or "broadcast"), value
{"command_id", "name", "args", "ttl_s"}; the relay (python -m bridge relay) sends it to the
device's MQTT session and writes to webos.command-feedback "sent", then one final record per
device: succeeded | failed | rejected | expired | undeliverable, with a detail.
Simulated devices know set-status (--arg status=Active|Inactive), set-interval
(--arg interval=[1,2]), ping and emergency (--arg text=...).
"""


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, json.loads(value)  # numbers, lists, true/false as JSON
    except ValueError:
        return key, value               # anything else as a string


def _command_name(text: str) -> str:
    if not COMMAND_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a command name is 1-64 of a-z 0-9 -")
    return text


def _device(text: str) -> str:
    if not naming.is_valid_device_id(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device id (1-64 of A-Z a-z 0-9 _ -)")
    return text


def _add_command_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", type=_command_name, help="the command, e.g. ping, set-status")
    parser.add_argument("--arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="an argument (VALUE is read as JSON when it parses, else a string); "
                             "repeat for more")
    parser.add_argument("--ttl", type=float, metavar="SECONDS",
                        help="how long the command may wait for the device (default: the relay's, "
                             "WEBOS_COMMAND_TTL_SECONDS, 3600)")
    parser.add_argument("--format", choices=("pretty", "json"), default="pretty")


def build_parser(action: str) -> argparse.ArgumentParser:
    """The command line of `python -m consumer <action>`."""
    if action == "state":
        parser = argparse.ArgumentParser(
            prog="python -m consumer state",
            description="Print a device's desired and reported state and their delta, from "
                        "Kafka's compacted webos.state (written by the relay).")
        parser.add_argument("device", type=_device)
        parser.add_argument("--format", choices=("pretty", "json"), default="pretty")
        return parser
    parser = argparse.ArgumentParser(
        prog=f"python -m consumer {action}", description=CONTRACT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("exit status: 0 sent (with --wait: the device answered succeeded); 1 a final "
                "status other than succeeded; 4 no final answer within --timeout; 2 bad usage."
                if action == "command" else
                "exit status: 0 when every answer was succeeded (or none came); 1 otherwise."))
    if action == "command":
        parser.add_argument("device", type=_device)
    _add_command_arguments(parser)
    if action == "command":
        parser.add_argument("--wait", action="store_true",
                            help="wait for the final feedback, print it, exit 0 only on succeeded")
        parser.add_argument("--timeout", type=float, default=30.0,
                            help="with --wait: how long to wait, seconds (default %(default)s)")
    else:
        parser.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                            help="how long to collect the devices' answers (default %(default)s)")
    return parser


def show(value: dict, form: str) -> str:
    """One feedback record as a line."""
    if form == "json":
        return json.dumps(value, separators=(",", ":"))
    took = (f" in {value['completed_at'] - value['sent_at']} ms"
            if value.get("sent_at") and value.get("completed_at") else "")
    return (f"{value['device']}: {value['name'] or 'command'} {value['command_id']} "
            f"{value['status']}{took}" + (f" ({value['detail']})" if value.get("detail") else ""))


def run_command(args, settings, target: str) -> int:
    sender = CommandSender(settings)
    try:
        command_id = sender.send(target, args.name, dict(args.arg), ttl_s=args.ttl)
        print(f"command {command_id} sent to {target}", file=sys.stderr)
        if target == naming.BROADCAST:
            return _collect(sender, command_id, args)
        if not args.wait:
            return 0
        try:
            [final] = sender.wait_final(command_id, timeout=args.timeout)[:1]
        except TimeoutError:
            print(f"no final answer within {args.timeout:g} s (is python -m bridge relay "
                  "running?)", file=sys.stderr)
            return EXIT_NO_ANSWER
        print(show(final, args.format))
        return 0 if final["status"] == SUCCEEDED else EXIT_NOT_SUCCEEDED
    finally:
        sender.close()


def _collect(sender: CommandSender, command_id: str, args) -> int:
    """Print each device's answer to a broadcast for --wait seconds."""
    deadline, failed = time.monotonic() + args.wait, 0
    while time.monotonic() < deadline:
        for value in sender.read(min(0.2, max(0.0, deadline - time.monotonic()))):
            if value["command_id"] == command_id and value["status"] != "sent":
                print(show(value, args.format), flush=True)
                failed += value["status"] != SUCCEEDED
    print(f"{len(sender.finals(command_id))} answers in {args.wait:g} s", file=sys.stderr)
    return EXIT_NOT_SUCCEEDED if failed else 0


def run_state(args, settings) -> int:
    state = read_state(settings, args.device)
    if state is None:
        print(f"{args.device} has no state yet (no desired value set, nothing reported)",
              file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps({"desired": state.desired, "reported": state.reported,
                          "delta": state.delta(), "version": state.version,
                          "updated_at": state.updated_at}))
        return 0
    for label, part in (("desired", state.desired), ("reported", state.reported),
                        ("delta", state.delta())):
        print(f"{label:9} {json.dumps(part, sort_keys=True)}")
    print(f"version   {state.version}, updated "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(state.updated_at / 1000))}")
    return 0


def main(action: str, argv) -> int:
    """`python -m consumer command|broadcast|state ARGS`."""
    args = build_parser(action).parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    try:
        if action == "state":
            return run_state(args, settings)
        return run_command(args, settings,
                           naming.BROADCAST if action == "broadcast" else args.device)
    except KafkaException as error:
        print(f"Kafka at {settings.kafka_bootstrap}: {error.args[0]}", file=sys.stderr)
        return 1
