"""Calls from other threads (Flask's request threads, tests, benchmarks) into the scheduler
thread: each call is queued with a Future, and a socketpair wakes the loop's selector at once."""
from __future__ import annotations

import socket
from collections import deque
from concurrent.futures import Future


class Inbox:
    """Calls waiting for the scheduler thread, and the socket that wakes it for them."""

    def __init__(self):
        self._calls: deque = deque()
        self.wakeup, self._wake_write = socket.socketpair()  # the loop selects on `wakeup`
        self.wakeup.setblocking(False)
        self._wake_write.setblocking(False)

    def submit(self, function, *args) -> Future:
        """Queue `function(*args)` for the scheduler thread (any thread); its Future."""
        future: Future = Future()
        self._calls.append((function, args, future))
        self.wake()
        return future

    def wake(self) -> None:
        """Make the loop's select() return now (any thread)."""
        try:
            self._wake_write.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the buffer is full (a wake-up is pending anyway) or the loop is closed

    def take_wakeups(self) -> None:
        """Empty the wake-up socket (scheduler thread, when select() names it)."""
        try:
            while self.wakeup.recv(4096):
                pass
        except BlockingIOError:
            pass

    def run_calls(self) -> None:
        """Run every queued call, handing its result or exception to its Future."""
        while self._calls:
            function, args, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except Exception as error:  # handed to the caller, who answers 4xx/5xx
                future.set_exception(error)

    def refuse_calls(self, reason: str) -> None:
        """Fail every queued call with RuntimeError(reason) (the loop has stopped)."""
        while self._calls:
            _, _, future = self._calls.popleft()
            future.set_exception(RuntimeError(reason))

    def close(self) -> None:
        """Close both wake-up sockets."""
        self.wakeup.close()
        self._wake_write.close()
