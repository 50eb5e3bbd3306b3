"""Back-off per device queue after Kafka refused its records for a reason that may pass (a topic
authorization failure, a topic gone, a broker that times out): pure state, no I/O.

The refused deliveries are held, unacked, by the settlement (bridge/settlement.py), with every
later delivery of that queue: RabbitMQ sends the queue no more once its prefetch window is full,
nothing is requeued (a quorum queue would count each requeue towards its delivery limit, and
serves requeued messages in the order they came back, not their own), and the other queues go on.
The held records are produced again, in delivery order, after a wait that doubles from `base` up
to `cap` seconds, with jitter (half fixed, half random) so that a thousand queues refused
together do not all come back in the same instant. The first record of that queue Kafka takes
ends its back-off.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


def refusal(error) -> str:
    """A KafkaError as the back-off keys it and the log shows it: "NAME: text" (should_log
    throttles per NAME)."""
    return f"{error.name()}: {error.str()}"


@dataclass
class Retrying:
    """One queue's back-off: how many refusals in a row, until when it waits, and why."""

    attempts: int
    until: float
    error: str


class QueueBackoff:
    """The queues in back-off, keyed by queue name; one owner (the forwarding loop's thread)."""

    def __init__(self, cap: float, base: float = 1.0, rng: random.Random | None = None,
                 log_interval: float = 60.0):
        self.cap = cap
        self.base = base
        self.rng = rng or random.Random()
        self.waiting: dict[str, Retrying] = {}  # held, to be produced again at `until`
        self.probing: dict[str, Retrying] = {}  # produced again, no record taken by Kafka yet
        self.log_interval = log_interval
        self.logged: dict[str, float] = {}  # refusal text -> when it was last logged

    def __contains__(self, queue: str) -> bool:
        """True while `queue` waits: its deliveries are held, not produced."""
        return queue in self.waiting

    def refused(self, queue: str, error: str, now: float) -> float | None:
        """Kafka refused a record of `queue`: start or lengthen its wait. Returns the wait in
        seconds, or None when the queue already waits (a later report of the same refusal)."""
        if queue in self.waiting:
            return None
        previous = self.probing.pop(queue, None)
        attempts = previous.attempts + 1 if previous else 1
        step = min(self.cap, self.base * 2 ** (attempts - 1))
        wait = step / 2 + self.rng.uniform(0, step / 2)
        self.waiting[queue] = Retrying(attempts, now + wait, error)
        return wait

    def due(self, now: float) -> list[str]:
        """The queues whose wait is over, now probing: produce their held records again."""
        ready = [queue for queue, state in self.waiting.items() if state.until <= now]
        for queue in ready:
            self.probing[queue] = self.waiting.pop(queue)
        return ready

    def next_due(self) -> float | None:
        """When the first wait ends, or None when no queue waits."""
        return min((state.until for state in self.waiting.values()), default=None)

    def taken(self, queue: str) -> None:
        """Kafka took a record of `queue`: its back-off is over."""
        self.probing.pop(queue, None)

    def errors(self) -> dict[str, int]:
        """Queues in back-off (waiting or probing) per error text, for the metrics and the log."""
        counts: dict[str, int] = {}
        for state in (*self.waiting.values(), *self.probing.values()):
            counts[state.error] = counts.get(state.error, 0) + 1
        return counts

    def should_log(self, error: str, now: float) -> bool:
        """True at most once per `log_interval` per kind of refusal (Kafka's error name, before
        the first colon: produce() and a delivery report word the same refusal differently): a
        refusal that lasts an hour is a few log lines, not one per record."""
        kind = error.split(":", 1)[0]
        if now - self.logged.get(kind, -self.log_interval) < self.log_interval:
            return False
        self.logged[kind] = now
        return True
