"""The consumer side as the tests drive it: topics of their own, records produced as the bridge
would, the live view as a child process."""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import requests
from confluent_kafka import Producer

from common.config import Settings
from stack.kafka_server import ensure_topic
from stack.process import AppProcess, free_port
from tests.helpers import wait_for


def new_topic(settings: Settings, prefix: str = "test.consumer") -> str:
    """A fresh 6-partition topic for one test."""
    topic = f"{prefix}.{uuid.uuid4().hex[:10]}"
    ensure_topic(settings.kafka_bootstrap, topic, 6)
    return topic


def device_record(device: str, seq: int, status: str = "Active", message_type: str = "info",
                  x: int | None = None, y: int | None = None, msg_id: str | None = None,
                  headers: dict | None = None):
    """(key, value, headers) as the bridge produces them for one device message."""
    msg_id = msg_id or uuid.uuid4().hex
    payload = {"Producer": device, "command": "position", "id": device,
               "x": seq % 7 if x is None else x, "y": seq % 5 if y is None else y,
               "status": status, "seq": seq, "msg_id": msg_id, "ts": int(time.time() * 1000)}
    if headers is None:
        headers = {"routing_key": f"webos.{device}.{message_type}",
                   "mqtt_topic": f"webos/{device}/{message_type}", "device": device,
                   "type": message_type, "queue": f"webos.{device}", "msg_id": msg_id}
    return device, json.dumps(payload).encode(), headers


def produce(settings: Settings, topic: str, records) -> None:
    """Produce (key, value, headers) records in order and wait until Kafka confirmed every one."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all",
                         "enable.idempotence": True, "linger.ms": 5})
    errors = []
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=list((headers or {}).items()),
                         on_delivery=lambda error, message: errors.append(error) if error else None)
    assert producer.flush(30) == 0, "records still unconfirmed after 30 s"
    assert not errors, errors


def consumer_env(settings: Settings) -> dict:
    env = dict(os.environ)
    env.update(settings.to_env())
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NO_COLOR", None)
    return env


class LiveView:
    """`python -m consumer serve` on a free port for one topic and a group of its own."""

    def __init__(self, settings: Settings, topic: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.group = f"test-live-{uuid.uuid4().hex[:8]}"
        # a file, not a pipe nobody reads: a full pipe would block the server's logging
        self.log = tempfile.NamedTemporaryFile(prefix="live-view-", suffix=".log")
        self.app = AppProcess(["consumer", "serve", "--port", str(self.port), "--topic", topic,
                               "--group", self.group], consumer_env(settings), Path(self.log.name))
        self.process = self.app.process
        wait_for(self._healthy, 30, message="the live view to answer /healthz", watch=[self.app])

    def output(self) -> str:
        return self.app.output()

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self) -> int:
        """SIGTERM; the exit status."""
        try:
            return self.app.stop(15)
        finally:
            self.log.close()
