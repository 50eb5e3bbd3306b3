"""The device registry's entries: ids, routes, intervals and first status, from devices.json or
the API.

Validated at the edge (ValueError names what is wrong) and shared by the devices file, the
command line, the REST API and the broker's provisioning (rabbitmq/topology.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rabbitmq import naming

ACTIVE = "Active"
INACTIVE = "Inactive"
STATUSES = (ACTIVE, INACTIVE)
DEFAULT_INTERVAL = (1.0, 2.0)
# A small loop walked by devices added without a route of their own.
DEFAULT_ROUTE = ((0, 0), (1, 0), (2, 0), (2, 1), (2, 2), (1, 2), (0, 2), (0, 1))
MAX_ROUTE_LENGTH = 10_000


def parse_route(raw) -> tuple[tuple[float, float], ...]:
    """A route from JSON: a non-empty list of [x, y] number pairs."""
    if not isinstance(raw, list) or not raw:
        raise ValueError("route must be a non-empty list of [x, y] positions")
    if len(raw) > MAX_ROUTE_LENGTH:
        raise ValueError(f"route has more than {MAX_ROUTE_LENGTH} positions")
    route = []
    for position in raw:
        if (not isinstance(position, (list, tuple)) or len(position) != 2
                or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in position)):
            raise ValueError(f"route position {position!r} is not an [x, y] pair of numbers")
        route.append((position[0], position[1]))
    return tuple(route)


def parse_interval(raw) -> tuple[float, float]:
    """An interval from JSON: [min, max] seconds (or one number), 0.05 <= min <= max <= 3600."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        raw = [raw, raw]
    if (not isinstance(raw, (list, tuple)) or len(raw) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
        raise ValueError("interval must be [min, max] seconds")
    low, high = float(raw[0]), float(raw[1])
    if not 0.05 <= low <= high <= 3600:
        raise ValueError("interval must satisfy 0.05 <= min <= max <= 3600 seconds")
    return low, high


@dataclass(frozen=True)
class DeviceConfig:
    """What a device is: its id, the positions it walks, how often it reports, its first status,
    and whether the simulator runs it (False: a real device, enrolled only: its certificate,
    broker user and queue are made, and it connects on its own)."""

    id: str
    route: tuple[tuple[float, float], ...] = DEFAULT_ROUTE
    interval: tuple[float, float] = DEFAULT_INTERVAL
    status: str = ACTIVE
    simulated: bool = True

    @classmethod
    def from_json(cls, raw, default_interval=DEFAULT_INTERVAL) -> "DeviceConfig":
        """A config from a JSON object; ValueError names what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("a device must be a JSON object")
        unknown = set(raw) - {"id", "route", "interval", "status", "simulated"}
        if unknown:
            raise ValueError(f"unknown device field(s): {', '.join(sorted(unknown))}")
        device = raw.get("id")
        if device is None:
            raise ValueError("missing device id")
        if not naming.is_valid_device_id(device):
            raise ValueError(f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -")
        status = raw.get("status", ACTIVE)
        if status not in STATUSES:
            raise ValueError("status must be \"Active\" or \"Inactive\"")
        simulated = raw.get("simulated", True)
        if not isinstance(simulated, bool):
            raise ValueError("simulated must be true or false")
        route = parse_route(raw["route"]) if "route" in raw else DEFAULT_ROUTE
        interval = parse_interval(raw["interval"]) if "interval" in raw else tuple(default_interval)
        return cls(device, route, interval, status, simulated)

    def to_json(self) -> dict:
        """The config as the API and the devices file show it."""
        return {"id": self.id, "route": [list(p) for p in self.route],
                "interval": list(self.interval), "status": self.status,
                "simulated": self.simulated}


def load_devices(path: Path, interval=None) -> list[DeviceConfig]:
    """Devices from a JSON file `{"interval": [1, 2], "devices": [{"id", "route", "interval"}]}`."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read devices file {path}: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("devices"), list):
        raise ValueError(f"devices file {path} must hold an object with a \"devices\" list")
    default_interval = parse_interval(interval if interval is not None
                                      else document.get("interval", list(DEFAULT_INTERVAL)))
    configs, seen = [], set()
    for raw in document["devices"]:
        if interval is not None and isinstance(raw, dict):
            raw = {k: v for k, v in raw.items() if k != "interval"}  # the command line wins
        config = DeviceConfig.from_json(raw, default_interval)
        if config.id in seen:
            raise ValueError(f"devices file {path} names {config.id} twice")
        seen.add(config.id)
        configs.append(config)
    return configs
