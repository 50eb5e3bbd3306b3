"""The bridge as the tests run it: a child process with its /metrics, and the device payloads
they send."""
from __future__ import annotations

import json
import os
import signal
import time
import uuid

import requests

from bridge.metrics import parse_samples
from common.config import Settings
from stack.process import AppProcess, free_port
from tests.helpers import wait_for


class BridgeProcess:
    """One `python -m bridge` child: its output in a file, its /metrics on a free port."""

    def __init__(self, settings: Settings, log_dir, *flags: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"bridge-{uuid.uuid4().hex[:6]}.log"
        self.app = AppProcess(["bridge", "--metrics-port", str(self.port), *flags],
                              {**os.environ, **settings.to_env(), **(env or {})}, self.log_path)
        self.process = self.app.process

    @property
    def output(self) -> str:
        return self.app.output()

    def metrics(self) -> dict[str, float]:
        """The Prometheus samples by name (labels kept in the name)."""
        try:
            text = requests.get(self.url + "/metrics", timeout=2).text
        except requests.RequestException:
            return {}
        return parse_samples(text)

    def metric(self, name: str) -> float:
        return self.metrics().get(name, 0.0)

    def wait_consuming(self, queues: int = 1, timeout: float = 30.0) -> None:
        """Until the bridge consumes at least `queues` queues."""
        wait_for(lambda: self.process.poll() is not None
                 or self.metric("webos_bridge_queues") >= queues, timeout,
                 message=f"the bridge to consume {queues} queue(s)")
        assert self.process.poll() is None, f"the bridge exited:\n{self.output}"

    def stop(self, signum=signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send `signum`, return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.app.kill()


def body(device: str, seq: int, **extra) -> bytes:
    return json.dumps({"Producer": device, "command": "position", "id": device, "x": seq,
                       "y": -seq, "status": "Active", "seq": seq, "msg_id": f"{device}-{seq}",
                       "ts": int(time.time() * 1000), **extra}).encode()
