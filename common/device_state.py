"""A device's desired and reported state, as the compacted Kafka topic `webos.state` holds it
(key = device id): {"desired": {...}, "reported": {...}, "version": n, "updated_at": ms}.

The relay owns the writing (one writer, so versions only grow): a command that sets a desired
value (DESIRED_BY_COMMAND) raises the version and carries it to the device, which applies a
desired value only when its version is newer than the last it applied. So a desired value that
arrives late (an old command redelivered, a stale copy) is never re-applied. Replies and the
device's own reports update `reported`. Readers (python -m consumer state, the live view) only
read. Pure: no Kafka client here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

# The commands that set a desired value, and which field of `desired` each sets.
DESIRED_BY_COMMAND = {"set-status": "status", "set-interval": "interval"}


@dataclass(frozen=True)
class DeviceState:
    """One device's entry of `webos.state`."""

    desired: dict = field(default_factory=dict)
    reported: dict = field(default_factory=dict)
    version: int = 0
    updated_at: int = 0

    @classmethod
    def from_json(cls, value: bytes | None) -> "DeviceState":
        """An entry from its record value (an empty or unreadable one is the empty state)."""
        try:
            raw = json.loads(value or b"{}")
        except (ValueError, UnicodeDecodeError):
            return cls()
        if not isinstance(raw, dict):
            return cls()
        return cls(dict(raw.get("desired") or {}), dict(raw.get("reported") or {}),
                   int(raw.get("version") or 0), int(raw.get("updated_at") or 0))

    def to_json(self) -> bytes:
        return json.dumps({"desired": self.desired, "reported": self.reported,
                           "version": self.version, "updated_at": self.updated_at},
                          separators=(",", ":")).encode()

    def delta(self) -> dict:
        """The desired values the device has not reported yet."""
        return {key: value for key, value in self.desired.items()
                if self.reported.get(key) != value}

    def desire(self, name: str, args: dict, now_ms: int) -> tuple["DeviceState", dict] | None:
        """For a command that sets a desired value: the new state (version + 1) and the args to
        send, carrying that version; None for any other command or args without the value."""
        key = DESIRED_BY_COMMAND.get(name)
        if key is None or key not in args:
            return None
        version = self.version + 1
        state = replace(self, desired={**self.desired, key: args[key]}, version=version,
                        updated_at=now_ms)
        return state, {**args, "version": version}

    def report(self, reported: dict, now_ms: int) -> "DeviceState | None":
        """The state with the device's report merged in; None when nothing changed."""
        merged = {**self.reported, **reported}
        if merged == self.reported:
            return None
        return replace(self, reported=merged, updated_at=now_ms)
