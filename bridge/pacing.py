"""When the forwarding loop takes its next turn: at once for the first delivery while nothing is
in flight, on a steady beat while records are.

Each wake-up of the loop's thread costs far more than the delivery it wakes for (pika's whole
read path, then the turn's produce, poll and settle): at 1,000 msg/s a turn per delivery cost
the bridge 310 µs of CPU per message, a turn every 4 ms 146-182 µs (docs/performance.md, "The
bridge at a steady rate"). Pure: the loop hands it the AMQP wait and the clock.
"""
from __future__ import annotations

import time
from typing import Callable

# s between two turns while records are in flight; a delivery waits at most this long for its
# turn. 2 ms measured 285 µs per message at 1,000 msg/s, 8 ms 157 µs.
TURN_INTERVAL = 0.004
IDLE_WAIT = 0.05  # s: longest wait when nothing is in flight (also bounds stop/discovery latency)


class TurnPacer:
    """Waits for the loop's next turn (`wait`); `took` says whether more waits right away."""

    def __init__(self, interval: float = TURN_INTERVAL, idle_wait: float = IDLE_WAIT,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.interval, self.idle_wait = interval, idle_wait
        self.clock, self.sleep = clock, sleep
        self.next_turn = 0.0  # when the next turn comes while records are in flight

    def wait(self, serve: Callable[[float], None], in_flight: bool) -> None:
        """Until this turn may take deliveries: `serve(seconds)` serves the AMQP connection for
        up to that long and returns at the first delivery (pika's `process_data_events`)."""
        if in_flight:
            pause = self.next_turn - self.clock()
            if pause > 0:
                self.sleep(pause)
            serve(0)  # what arrived meanwhile
        else:
            serve(self.idle_wait)  # the first delivery ends the wait: a lone one is not held back
        self.next_turn = self.clock() + self.interval

    def took(self, backlog: bool) -> None:
        """`backlog`: this turn left deliveries waiting in the socket; the next comes at once."""
        if backlog:
            self.next_turn = 0.0
