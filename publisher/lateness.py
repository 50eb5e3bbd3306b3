"""Lateness: how far after its due time each scheduled message went out (and, with the same
counts, how long messages waited for their acknowledgement)."""
from __future__ import annotations

LATE_MS = 100  # a message published more than this after its due time counts as late


class Lateness:
    """Counts of scheduled publishes by lateness (1 ms buckets up to 10 s)."""

    BUCKETS = 10_000

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far (for example after a warm-up)."""
        self.counts = [0] * (self.BUCKETS + 1)
        self.total = 0
        self.on_time = 0
        self.worst_ms = 0.0

    def add(self, late_seconds: float) -> None:
        """Count one publish that went out `late_seconds` after its due time."""
        late_ms = max(0.0, late_seconds * 1000.0)
        self.total += 1
        if late_ms <= LATE_MS:
            self.on_time += 1
        self.worst_ms = max(self.worst_ms, late_ms)
        self.counts[min(int(late_ms), self.BUCKETS)] += 1

    def percentile(self, share: float) -> float:
        """The lateness (ms) under which `share` of the publishes went out."""
        if not self.total:
            return 0.0
        target, running = share * self.total, 0
        for bucket, count in enumerate(self.counts):
            running += count
            if running >= target:
                return float(bucket)
        return float(self.BUCKETS)

    def summary(self) -> dict:
        """Totals and percentiles, JSON-ready."""
        return {"scheduled": self.total,
                "on_time_share": (self.on_time / self.total) if self.total else None,
                "p50_ms": self.percentile(0.5), "p99_ms": self.percentile(0.99),
                "max_ms": round(self.worst_ms, 1)}
