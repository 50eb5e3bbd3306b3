"""The command contract, pure: a command record from Kafka checked, the message a device gets, its
reply read, and the feedback record each outcome becomes. No broker client is imported.

Kafka `webos.commands`, key = device id or `broadcast`:
    {"command_id": "<unique>", "name": "<command>", "args": {...}, "ttl_s": <seconds>}
To the device, on `webos/<device>/command` (or `webos/broadcast/command`), JSON:
    {"command_id", "name", "args", "reply_to", "sent_at", "expires_at"}
The device answers on `webos/<device>/reply`:
    {"command_id", "name", "status": "succeeded" | "failed" | "rejected", "detail",
     "reported": {...}} (name and reported optional)
or reports a change of its own without a command: {"reported": {...}}.
Kafka `webos.command-feedback`, key = device id: FEEDBACK_FIELDS.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from rabbitmq import naming

SUCCEEDED, FAILED, REJECTED, EXPIRED, UNDELIVERABLE = (
    "succeeded", "failed", "rejected", "expired", "undeliverable")
FINAL_STATUSES = (SUCCEEDED, FAILED, REJECTED, EXPIRED, UNDELIVERABLE)
SENT = "sent"  # the broker confirmed the command into the device's queue; not final
DEVICE_STATUSES = (SUCCEEDED, FAILED, REJECTED)  # what a device may answer
# Why a command was refused or not delivered (`detail` starts with one of these).
UNKNOWN_DEVICE, INVALID_COMMAND, QUEUE_FULL, NO_SESSION = (
    "unknown-device", "invalid-command", "queue-full", "no-session")
FEEDBACK_FIELDS = ("command_id", "device", "name", "status", "detail", "broadcast", "sent_at",
                   "completed_at")
COMMAND_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
COMMAND_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")
MAX_DETAIL = 500


class InvalidCommand(ValueError):
    """A command record that cannot be sent; its message says why. `command_id` when one was
    readable (then the sender gets feedback), else None (then it is only logged)."""

    def __init__(self, message: str, command_id: str | None = None):
        super().__init__(message)
        self.command_id = command_id


@dataclass(frozen=True)
class Command:
    """One checked command to a device, or to every device (target BROADCAST)."""

    target: str
    command_id: str
    name: str
    args: dict = field(default_factory=dict)
    ttl_s: float = 3600.0

    @property
    def broadcast(self) -> bool:
        return self.target == naming.BROADCAST

    @property
    def routing_key(self) -> str:
        return naming.command_routing_key(self.target)

    def body(self, now_ms: int) -> bytes:
        """What the device receives (JSON); a 3.1.1 device finds its reply topic here."""
        message = {"command_id": self.command_id, "name": self.name, "args": self.args,
                   "sent_at": now_ms, "expires_at": now_ms + int(self.ttl_s * 1000)}
        if not self.broadcast:
            message["reply_to"] = naming.reply_topic(self.target)
        return json.dumps(message, separators=(",", ":")).encode()


def parse_command(key: bytes | None, value: bytes | None, default_ttl: float,
                  max_ttl: float) -> Command:
    """A command from a `webos.commands` record; InvalidCommand says what is wrong."""
    target = (key or b"").decode(errors="replace")
    try:
        record = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        raise InvalidCommand("the value is not JSON") from None
    if not isinstance(record, dict):
        raise InvalidCommand("the value is not a JSON object")
    command_id = record.get("command_id")
    if not isinstance(command_id, str) or not COMMAND_ID.fullmatch(command_id):
        raise InvalidCommand("command_id must be 1-128 printable ASCII characters, no spaces")
    if target != naming.BROADCAST and not naming.is_valid_device_id(target):
        raise InvalidCommand(f"the key {target!r} is neither a device id nor "
                             f"{naming.BROADCAST!r}", command_id)
    name, args, ttl = record.get("name"), record.get("args", {}), record.get("ttl_s", default_ttl)
    if not isinstance(name, str) or not COMMAND_NAME.fullmatch(name):
        raise InvalidCommand("name must be 1-64 of a-z 0-9 -, starting with a letter", command_id)
    if not isinstance(args, dict):
        raise InvalidCommand("args must be a JSON object", command_id)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= max_ttl:
        raise InvalidCommand(f"ttl_s must be a number of seconds in (0, {max_ttl:g}]", command_id)
    return Command(target, command_id, name, args, float(ttl))


@dataclass(frozen=True)
class Reply:
    """What a device answered: to a command (command_id set) or a report of its own."""

    device: str
    command_id: str | None
    status: str | None
    detail: str
    reported: dict | None
    name: str = ""


def parse_reply(device: str, body: bytes) -> Reply:
    """A device's message on its reply topic; ValueError when it is neither reply nor report."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("a reply must be JSON") from None
    if not isinstance(message, dict):
        raise ValueError("a reply must be a JSON object")
    reported = message.get("reported")
    if reported is not None and not isinstance(reported, dict):
        raise ValueError("reported must be a JSON object")
    command_id = message.get("command_id")
    if command_id is None:
        if reported is None:
            raise ValueError("a reply needs a command_id, or reported")
        return Reply(device, None, None, "", reported)
    status = message.get("status")
    if not isinstance(command_id, str) or not COMMAND_ID.fullmatch(command_id):
        raise ValueError("command_id must be 1-128 printable ASCII characters")
    if status not in DEVICE_STATUSES:
        raise ValueError(f"status must be one of {', '.join(DEVICE_STATUSES)}")
    detail, name = message.get("detail", ""), message.get("name", "")
    return Reply(device, command_id, status, str(detail)[:MAX_DETAIL], reported,
                 name if isinstance(name, str) and COMMAND_NAME.fullmatch(name) else "")


def expired_command(headers: dict | None, body: bytes) -> tuple[str, str, str] | None:
    """(device, command_id, name) of a command RabbitMQ dead-lettered from a device's session
    queue because its TTL ran out; None for anything else."""
    deaths = (headers or {}).get("x-death") or []
    if not deaths or naming.header_text(deaths[0].get("reason")) != "expired":
        return None
    device = naming.device_of_subscription_queue(naming.header_text(deaths[0].get("queue")))
    try:
        message = json.loads(body)
        command_id, name = message["command_id"], message.get("name", "")
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        return None
    if device is None or not isinstance(command_id, str):
        return None
    return device, command_id, str(name)


def feedback(device: str, command_id: str, status: str, detail: str = "", *, name: str = "",
             broadcast: bool = False, sent_at: int | None = None,
             completed_at: int) -> bytes:
    """One `webos.command-feedback` record's value (FEEDBACK_FIELDS, JSON)."""
    return json.dumps({"command_id": command_id, "device": device, "name": name,
                       "status": status, "detail": detail, "broadcast": broadcast,
                       "sent_at": sent_at, "completed_at": completed_at},
                      separators=(",", ":")).encode()
