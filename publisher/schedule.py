"""The simulator's schedule: which job each device has next, and when (a heap of due times).
Owned by the scheduler thread, like the devices it points to."""
from __future__ import annotations

import enum
import heapq
import itertools
from typing import Any, NamedTuple


class Job(enum.Enum):
    """What a device does when its entry falls due."""

    PUBLISH = "publish"  # its next position report (stale once its status changed since)
    MISC = "misc"        # paho's loop_misc: keepalive pings and timeouts
    CONNECT = "connect"  # a reconnect attempt, after back-off
    CONNACK = "connack"  # the deadline of a connect attempt (stale once the next one started)


class Due(NamedTuple):
    """One entry of the schedule."""

    due: float       # time.monotonic() seconds
    order: int       # entries due at the same time run in the order they were added
    job: Job
    link: Any        # the device's DeviceLink
    generation: int  # which one: PUBLISH, the device's status generation when it was
                     # scheduled (stale once changed); CONNACK, the device's connect attempt


class Schedule:
    """Due jobs, earliest first."""

    def __init__(self):
        self._heap: list[Due] = []
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, due: float, job: Job, link, generation: int = 0) -> None:
        """Run `job` for `link` at `due` (monotonic seconds) or as soon after as the loop can."""
        heapq.heappush(self._heap, Due(due, next(self._order), job, link, generation))

    def pop_due(self, now: float) -> Due | None:
        """The earliest entry due by `now`, taken off the schedule; None when nothing is due."""
        if self._heap and self._heap[0].due <= now:
            return heapq.heappop(self._heap)
        return None

    def seconds_to_next(self, now: float, longest: float) -> float:
        """How long the loop may wait for I/O before the next entry is due (at most `longest`)."""
        if not self._heap:
            return longest
        return min(longest, max(0.0, self._heap[0].due - now))
