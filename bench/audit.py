"""The audit: what a run of the pipeline must show, proven from what arrived in Kafka.

Pure functions of the published counts and the Kafka arrivals, unit-tested without brokers
(tests/test_audit_unit.py): per device published, arrived, missing (by `seq`), duplicated (by
`msg_id`) and out of order (a first arrival with a lower `seq` than one already seen). The run
that produces those figures, with its fault injection, and the `make bench` entry (a clean
audited run with its rates), is bench/pipeline_run.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

# ---------------------------------------------------------------------------------------------
# The audit itself: pure, unit-tested without brokers

@dataclass
class DeviceAudit:
    """What one device published and what of it Kafka holds."""

    device: str
    published: int          # the last seq the publisher gave out: seqs 1..published exist
    acked: int = 0          # messages RabbitMQ acknowledged (PUBACK), from GET /devices
    dropped: int = 0        # messages the publisher dropped itself (its queue was full)
    arrived: int = 0        # distinct seqs of 1..published found in Kafka
    records: int = 0        # Kafka records of this device, duplicates included
    missing: list[int] = field(default_factory=list)
    duplicated: int = 0     # records whose msg_id was seen before
    out_of_order: int = 0   # first arrivals with a seq lower than one already seen
    unexpected: int = 0     # records with a seq outside 1..published
    disorder: list[tuple[int, int]] = field(default_factory=list)  # first (seq, after seq) pairs

    @property
    def ok(self) -> bool:
        """Nothing missing, nothing out of order."""
        return not self.missing and not self.out_of_order


TOTALS = ("published", "acked", "dropped", "arrived", "records", "missing", "duplicated",
          "out_of_order", "unexpected")  # summed over the devices, in the report's order


def _device_sum(name: str, measure=None) -> property:
    """A property of the report: the devices' `name` (or `measure` of it) summed."""
    def total(report: "AuditReport") -> int:
        values = (getattr(device, name) for device in report.devices)
        return sum(map(measure, values) if measure else values)
    return property(total, doc=f"{name} summed over the devices")


@dataclass
class AuditReport:
    """Totals and per-device rows of one audited run; `ok` only with nothing missing or reordered."""

    topic: str
    devices: list[DeviceAudit]
    foreign: int = 0        # records that are not a device payload with seq/msg_id
    figures: dict = field(default_factory=dict)

    published = _device_sum("published")
    acked = _device_sum("acked")
    dropped = _device_sum("dropped")
    arrived = _device_sum("arrived")
    records = _device_sum("records")
    missing = _device_sum("missing", len)
    duplicated = _device_sum("duplicated")
    out_of_order = _device_sum("out_of_order")
    unexpected = _device_sum("unexpected")

    @property
    def ok(self) -> bool:
        """Zero missing and zero out of order (duplicates are allowed and reported)."""
        return all(d.ok for d in self.devices)

    def totals(self) -> dict:
        """The totals, JSON-ready."""
        return {"devices": len(self.devices), **{name: getattr(self, name) for name in TOTALS},
                "foreign": self.foreign, "ok": self.ok}

    def to_json(self) -> dict:
        """Totals, figures and the rows of devices that are not perfect (all rows if few)."""
        rows = [asdict(d) for d in self.devices
                if len(self.devices) <= 10 or not d.ok or d.duplicated or d.unexpected]
        for row in rows:
            row["missing"] = _ranges(row["missing"])
        return {"topic": self.topic, **self.totals(), "figures": self.figures, "devices": rows}

    def summary(self) -> str:
        """One paragraph a person reads when a test fails."""
        lines = [", ".join(f"{key} {value}" for key, value in self.totals().items())]
        for device in self.devices:
            if not device.ok or device.unexpected:
                lines.append(f"  {device.device}: published {device.published}, arrived "
                             f"{device.arrived}, missing {_ranges(device.missing)}, out of order "
                             f"{device.out_of_order} (first: seq, after: {device.disorder}), "
                             f"unexpected {device.unexpected}")
        if self.figures:
            lines.append(f"  figures: {self.figures}")
        return "\n".join(lines)


def _ranges(seqs: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3,7' (missing seqs of a long outage stay readable)."""
    parts, start, previous = [], None, None
    for seq in sorted(seqs):
        if start is None:
            start = previous = seq
        elif seq == previous + 1:
            previous = seq
        else:
            parts.append(f"{start}-{previous}" if previous != start else str(start))
            start = previous = seq
    if start is not None:
        parts.append(f"{start}-{previous}" if previous != start else str(start))
    return ",".join(parts)


def audit_device(device: str, published: int, arrivals, acked: int = 0,
                 dropped: int = 0) -> DeviceAudit:
    """Audit one device: `arrivals` are its (seq, msg_id) in Kafka order (one partition per key)."""
    row = DeviceAudit(device, published, acked=acked, dropped=dropped)
    seen_ids: set[str] = set()
    seen_seqs: set[int] = set()
    highest = 0
    for seq, msg_id in arrivals:
        row.records += 1
        if msg_id in seen_ids:
            row.duplicated += 1
            continue
        seen_ids.add(msg_id)
        if not 1 <= seq <= published:
            row.unexpected += 1
            continue
        if seq in seen_seqs:  # same seq, another msg_id: the publisher re-used a seq
            row.duplicated += 1
            continue
        if seq < highest:
            row.out_of_order += 1
            if len(row.disorder) < 5:
                row.disorder.append((seq, highest))
        highest = max(highest, seq)
        seen_seqs.add(seq)
    row.arrived = len(seen_seqs)
    if row.arrived < published:
        row.missing = [seq for seq in range(1, published + 1) if seq not in seen_seqs]
    return row


def audit_records(published: dict[str, dict | int], arrivals: dict[str, list],
                  topic: str = "", foreign: int = 0) -> AuditReport:
    """Audit every device in `published` (device -> last seq, or its GET /devices row)."""
    rows = []
    for device, counts in published.items():
        if isinstance(counts, int):
            counts = {"seq": counts}
        rows.append(audit_device(device, counts["seq"], arrivals.get(device, ()),
                                 counts.get("acked", 0), counts.get("dropped", 0)))
    return AuditReport(topic, rows, foreign=foreign)
