"""A simulated device's side of commands, pure: check a command, apply it once, say what to answer.

A command arrives as JSON `{"command_id", "name", "args", ...}` (bridge/command_records.py). The
device applies each command id once (a redelivery after a reconnect or a relay restart is only
acknowledged), applies a desired value only when its `version` is newer than the last one it
applied (so an old desired value never comes back), and answers every command it applied or
refused with `{"command_id", "status", "detail", "reported"}`.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from common.command_records import REJECTED, SUCCEEDED
from common.devices import STATUSES, parse_interval

KNOWN = ("set-status", "set-interval", "ping", "emergency")
REMEMBERED_IDS = 1000  # command ids a device remembers (a redelivery comes within these)


@dataclass(frozen=True)
class Answer:
    """What to publish on the reply topic (JSON) for one command."""

    command_id: str
    name: str
    status: str
    detail: str
    reported: dict

    def to_json(self) -> bytes:
        return json.dumps({"command_id": self.command_id, "name": self.name,
                           "status": self.status, "detail": self.detail,
                           "reported": self.reported}, separators=(",", ":")).encode()


class DeviceCommands:
    """Applies commands to one device through `set_status` and `set_interval`; `reported()` says
    what the device reports back. Owned by the thread that runs the device."""

    def __init__(self, set_status: Callable[[str], object],
                 set_interval: Callable[[tuple[float, float]], object],
                 reported: Callable[[], dict]):
        self.set_status = set_status
        self.set_interval = set_interval
        self.reported = reported
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.applied_version = 0
        self.emergencies: list[str] = []

    def handle(self, body: bytes) -> Answer | None:
        """The answer to one command message; None for a command id already handled, or for a
        message without a readable command id (nothing to answer to)."""
        try:
            message = json.loads(body)
            command_id = message["command_id"]
        except (ValueError, UnicodeDecodeError, TypeError, KeyError):
            return None
        if not isinstance(command_id, str) or command_id in self.seen:
            return None
        self.seen[command_id] = None
        while len(self.seen) > REMEMBERED_IDS:
            self.seen.popitem(last=False)
        name, args = message.get("name"), message.get("args") or {}
        if name not in KNOWN:
            return Answer(command_id, str(name), REJECTED, f"unknown-command: {name!r} (this "
                          f"device knows {', '.join(KNOWN)})", self.reported())
        if not isinstance(args, dict):
            return Answer(command_id, name, REJECTED, "invalid-args: args must be an object",
                          self.reported())
        try:
            status, detail = getattr(self, "_" + name.replace("-", "_"))(args)
        except ValueError as error:
            status, detail = REJECTED, f"invalid-args: {error}"
        return Answer(command_id, name, status, detail, self.reported())

    def _newer(self, args: dict) -> bool:
        """True (and remembered) when a desired value's version is newer than the last applied;
        a command without a version (sent without the relay's state) always applies."""
        version = args.get("version")
        if version is None:
            return True
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError("version must be an integer")
        if version <= self.applied_version:
            return False
        self.applied_version = version
        return True

    def _set_status(self, args: dict) -> tuple[str, str]:
        status = args.get("status")
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        if not self._newer(args):
            return REJECTED, f"stale-version: {args['version']} <= {self.applied_version}"
        self.set_status(status)
        return SUCCEEDED, f"status {status}"

    def _set_interval(self, args: dict) -> tuple[str, str]:
        interval = parse_interval(args.get("interval"))
        if not self._newer(args):
            return REJECTED, f"stale-version: {args['version']} <= {self.applied_version}"
        self.set_interval(interval)
        return SUCCEEDED, f"interval {interval[0]:g}-{interval[1]:g} s"

    def _ping(self, args: dict) -> tuple[str, str]:
        return SUCCEEDED, "pong"

    def _emergency(self, args: dict) -> tuple[str, str]:
        text = str(args.get("text", ""))[:1000]
        self.emergencies = [*self.emergencies[-9:], text]
        return SUCCEEDED, "shown"
