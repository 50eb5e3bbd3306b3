"""What the consumer knows about one Kafka record, and the bookkeeping over a stream of them.

Pure logic, no broker: decoding a record, filters, the de-duplication window, `seq` gap tracking,
the exit summary and the two output formats.
"""
from __future__ import annotations

import datetime
import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

from rabbitmq import naming

DEFAULT_DEDUPE_WINDOW = 100_000


def _text(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    return raw.decode("utf-8", errors="replace")


def type_from_headers(headers: dict[str, str]) -> str | None:
    """The message type: the `type` header, else the last part of `routing_key` or `mqtt_topic`."""
    if headers.get("type"):
        return headers["type"]
    parsed = naming.parse_routing_key(headers.get("routing_key", ""))
    if parsed:
        return parsed[1]
    parts = headers.get("mqtt_topic", "").split("/")
    if len(parts) == 3 and parts[0] == "webos":
        return parts[2]
    return None


@dataclass(frozen=True)
class Record:
    """One Kafka record as the consumer shows it: key, place in the log, headers, decoded value."""

    topic: str
    partition: int
    offset: int
    timestamp: int | None
    key: str | None
    headers: dict[str, str]
    value: bytes
    payload: Any = None
    is_json: bool = True

    @classmethod
    def from_message(cls, message) -> "Record":
        """Decode a confluent_kafka Message; a value that is not JSON is kept raw, never an error."""
        headers = {name: _text(raw) or "" for name, raw in (message.headers() or [])}
        value = message.value() or b""
        _, timestamp = message.timestamp()
        return cls.build(message.topic(), message.partition(), message.offset(),
                         timestamp if timestamp and timestamp > 0 else None,
                         _text(message.key()), headers, value)

    @classmethod
    def build(cls, topic: str, partition: int, offset: int, timestamp: int | None,
              key: str | None, headers: dict[str, str], value: bytes) -> "Record":
        """A Record from its parts, decoding the value as JSON when it is JSON."""
        try:
            payload, is_json = json.loads(value), True
        except (UnicodeDecodeError, ValueError):
            payload, is_json = None, False
        return cls(topic, partition, offset, timestamp, key, dict(headers), bytes(value),
                   payload, is_json)

    def _field(self, name: str):
        return self.payload.get(name) if isinstance(self.payload, dict) else None

    @property
    def device(self) -> str | None:
        """The device: the record key, else the `device` header, else the payload's `id`."""
        return self.key or self.headers.get("device") or _as_str(self._field("id"))

    @property
    def message_type(self) -> str | None:
        """`info`, `warning`, `error`, from the headers (None when they do not say)."""
        return type_from_headers(self.headers)

    @property
    def msg_id(self) -> str | None:
        """The payload's `msg_id`, else the `msg_id` header."""
        return _as_str(self._field("msg_id")) or self.headers.get("msg_id") or None

    @property
    def seq(self) -> int | None:
        """The payload's per-device counter, when it is an integer."""
        seq = self._field("seq")
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None

    @property
    def status(self) -> str | None:
        return _as_str(self._field("status"))

    @property
    def raw_text(self) -> str:
        """The value as text (undecodable bytes replaced), for showing a non-JSON record."""
        return self.value.decode("utf-8", errors="replace")

    def to_json_dict(self) -> dict:
        """The `--format json` line: key, partition, offset, headers and the decoded payload."""
        line = {"topic": self.topic, "key": self.key, "partition": self.partition,
                "offset": self.offset, "timestamp": self.timestamp, "headers": self.headers,
                "payload": self.payload}
        if not self.is_json:
            line["raw"] = self.raw_text
            line["error"] = "value is not JSON"
        return line


def _as_str(value) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class RecordFilter:
    """Which records to show: any of the devices (key or `device` header) and any of the types."""

    devices: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()

    @classmethod
    def of(cls, devices: Iterable[str] | None = None, types: Iterable[str] | None = None):
        return cls(frozenset(devices or ()), frozenset(types or ()))

    def matches(self, record: Record) -> bool:
        """True when the record passes every filter given (no filter passes everything)."""
        if self.devices and not ({record.key, record.headers.get("device")} & self.devices):
            return False
        if self.types and record.message_type not in self.types:
            return False
        return True


class DedupeWindow:
    """The last `size` msg_ids seen: `seen(id)` is True for a repeat inside the window."""

    def __init__(self, size: int = DEFAULT_DEDUPE_WINDOW):
        if size < 1:
            raise ValueError("dedupe window must hold at least one id")
        self.size = size
        self._ids: OrderedDict[Hashable, None] = OrderedDict()

    def seen(self, msg_id: Hashable) -> bool:
        """Remember `msg_id`; True when it was already among the last `size` ids."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return True
        self._ids[msg_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class SeqTracker:
    """Per device, the last `seq` seen; counts gaps (a jump forward) and repeats/regressions."""

    last: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    missing: int = 0
    out_of_order: int = 0

    def observe(self, device: str | None, seq: int | None) -> str | None:
        """Record one `seq`; returns "gap", "out-of-order" or None (in order, or nothing to check)."""
        if device is None or seq is None:
            return None
        previous = self.last.get(device)
        self.last[device] = seq if previous is None else max(previous, seq)
        if previous is None or seq == previous + 1:
            return None
        if seq > previous + 1:
            self.gaps += 1
            self.missing += seq - previous - 1
            return "gap"
        self.out_of_order += 1
        return "out-of-order"


@dataclass
class Summary:
    """Counts for the one-line summary printed on exit."""

    records: int = 0
    per_device: Counter = field(default_factory=Counter)
    duplicates: int = 0
    filtered: int = 0
    non_json: int = 0
    seq: SeqTracker = field(default_factory=SeqTracker)

    def line(self) -> str:
        """`consumer: 12 records (A: 5, B: 7), 1 duplicate dropped, 0 seq gaps, 0 non-JSON`."""
        devices = ", ".join(f"{device}: {count}" for device, count in sorted(self.per_device.items()))
        parts = [f"{self.records} records" + (f" ({devices})" if devices else ""),
                 f"{self.duplicates} duplicates dropped",
                 f"{self.seq.gaps} seq gaps ({self.seq.missing} missing)",
                 f"{self.seq.out_of_order} out of order",
                 f"{self.non_json} non-JSON"]
        if self.filtered:
            parts.append(f"{self.filtered} filtered out")
        return "consumer: " + ", ".join(parts)


COLOURS = {"green": "32", "grey": "90", "yellow": "33", "red": "31", "cyan": "36", "bold": "1",
           "magenta": "35"}
STATUS_COLOURS = {"Active": "green", "Inactive": "grey"}
TYPE_COLOURS = {"info": "cyan", "warning": "yellow", "error": "red",
                "connected": "green", "disconnected": "red"}
PRESENCE_TYPES = ("connected", "disconnected")  # the type header of a webos.presence record


def _paint(text: str, colour: str | None, enabled: bool) -> str:
    if not enabled or colour is None:
        return text
    return f"\x1b[{COLOURS[colour]}m{text}\x1b[0m"


def format_time(timestamp_ms: int | None) -> str:
    """HH:MM:SS.mmm local time of a Kafka timestamp, or dashes when there is none."""
    if timestamp_ms is None:
        return "--:--:--.---"
    moment = datetime.datetime.fromtimestamp(timestamp_ms / 1000)
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def format_pretty(record: Record, colour: bool = False, note: str | None = None) -> str:
    """One line for people: time, device, type, partition@offset, seq, position, status, command."""
    device = record.device or "?"
    message_type = record.message_type or "-"
    parts = [format_time(record.timestamp),
             _paint(f"{device:<12}", "bold", colour),
             _paint(f"{message_type:<7}", TYPE_COLOURS.get(message_type), colour),
             _paint(f"p{record.partition}@{record.offset}", "grey", colour)]
    if not record.is_json:
        parts.append(_paint("non-JSON", "magenta", colour) + " " + repr(record.raw_text))
    elif message_type in PRESENCE_TYPES and isinstance(record.payload, dict):
        payload = record.payload
        parts.append(f"on {payload.get('node') or '?'} (client id {payload.get('client_id') or '?'})")
        if payload.get("reason"):
            parts.append(f"reason: {payload['reason']}")
    elif isinstance(record.payload, dict):
        payload = record.payload
        if record.seq is not None:
            parts.append(f"seq={record.seq}")
        if "x" in payload or "y" in payload:
            parts.append(f"({payload.get('x')}, {payload.get('y')})")
        if record.status:
            parts.append(_paint(record.status, STATUS_COLOURS.get(record.status, "yellow"), colour))
        if payload.get("command"):
            parts.append(str(payload["command"]))
        known = {"Producer", "command", "id", "x", "y", "status", "seq", "msg_id", "ts"}
        extra = {name: value for name, value in payload.items() if name not in known}
        if extra:
            parts.append(json.dumps(extra, ensure_ascii=False))
    else:
        parts.append(json.dumps(record.payload, ensure_ascii=False))
    if note:
        parts.append(_paint(f"[{note}]", "yellow", colour))
    return " ".join(parts)


def format_json(record: Record) -> str:
    """One JSON line for scripts."""
    return json.dumps(record.to_json_dict(), ensure_ascii=False, separators=(",", ":"))
