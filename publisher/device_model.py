"""One simulated device's state machine: status, position along its route, counters, and the
messages its transitions emit. Owned by the simulator's scheduler thread; pure, no I/O."""
from __future__ import annotations

import random
import time
import uuid

from common.devices import ACTIVE, STATUSES, DeviceConfig

def now_ms() -> int:
    """Epoch milliseconds, the payload's `ts`."""
    return time.time_ns() // 1_000_000


class DeviceState:
    """Status, position and counters of one device, and the messages its transitions emit.

    `generation` changes on every status change: a publish scheduled under an older generation
    is stale and dropped, so a quick Inactive -> Active -> Inactive can neither double nor skip.
    """

    def __init__(self, config: DeviceConfig, rng: random.Random | None = None):
        self.config = config
        self.id = config.id
        self.status = config.status
        self.interval = tuple(config.interval)  # set-interval changes it
        self.generation = 0
        self.position_index = 0
        self.seq = 0
        self.rng = rng or random.Random()
        self.published = 0
        self.acked = 0
        self.dropped = 0
        self.refused = 0  # acknowledged with an MQTT 5 reason code other than Success
        self.last_message_ts: int | None = None
        self.connected = False
        self.removed = False

    def set_status(self, status: str) -> bool:
        """Apply a status; True when it changed (the caller then emits or schedules a message)."""
        if status not in STATUSES:
            raise ValueError(f"invalid status {status!r}")
        if status == self.status:
            return False
        self.status = status
        self.generation += 1
        return True

    def next_interval(self) -> float:
        """Seconds until the next position report: uniform in the configured [min, max]."""
        low, high = self.interval
        return self.rng.uniform(low, high)

    def position(self) -> tuple[float, float]:
        """The position the device reports next."""
        return self.config.route[self.position_index]

    def message(self, command: str = "position", **extra) -> dict:
        """The next payload (`seq` +1); a position report while Active moves along the route."""
        x, y = self.position()
        self.seq += 1
        payload = {"Producer": self.id, "command": command, "id": self.id, "x": x, "y": y,
                   "status": self.status}
        payload.update(extra)
        payload.update(seq=self.seq, msg_id=uuid.uuid4().hex, ts=now_ms())
        if command == "position" and self.status == ACTIVE:
            self.position_index = (self.position_index + 1) % len(self.config.route)
        return payload

    def snapshot(self) -> dict:
        """What the API and the page show about this device."""
        x, y = self.position()
        return {"id": self.id, "status": self.status, "connected": self.connected,
                "messages": self.published, "acked": self.acked, "dropped": self.dropped,
                "refused": self.refused,
                "seq": self.seq, "last_message_ts": self.last_message_ts, "position": [x, y],
                "interval": list(self.interval), "route_length": len(self.config.route)}

    def reported(self) -> dict:
        """What the device reports of itself to the platform (webos.state's `reported`)."""
        return {"status": self.status, "interval": list(self.interval)}
