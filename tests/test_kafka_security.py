"""The bridge and the consumer against a Kafka listener with TLS and SASL/SCRAM (SASL_SSL)."""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
import uuid

import pytest

from common.config import REPO_ROOT
from common.pki import PKI
from rabbitmq import naming
from stack.kafka_server import LocalKafka, SecureListener, ensure_topic
from stack.process import free_port
from tests.helpers import MqttDevice
from tests.support.bridge import BridgeProcess


@pytest.fixture
def secure_kafka(tmp_path, settings):
    """A Kafka of its own with a SASL_SSL listener (the broker certificate of the stack's
    authority) and two SCRAM users, beside its plain listener for the test's own setup."""
    listener = SecureListener(port=free_port(), pki=PKI(settings.pki_path),
                              users={"webos-bridge": secrets.token_urlsafe(12),
                                     "webos-reader": secrets.token_urlsafe(12)})
    kafka = LocalKafka(tmp_path / "kafka", port=free_port(), controller_port=free_port(),
                       secure=listener)
    kafka.start()
    try:
        kafka.wait_ready()
        yield kafka, listener
    finally:
        kafka.stop()


def consume_cli(settings, topic: str, timeout: int = 30, **env) -> subprocess.CompletedProcess:
    """`python -m consumer` for one record from the start of `topic` (idle at most `timeout` s)."""
    return subprocess.run(
        [sys.executable, "-m", "consumer", "--topic", topic, "--from-beginning", "--count", "1",
         "--timeout", str(timeout), "--format", "json"],
        cwd=REPO_ROOT, env={**os.environ, **settings.to_env(), **env}, capture_output=True,
        text=True, timeout=90)


def test_bridge_and_consumer_work_over_sasl_ssl_and_a_wrong_password_is_refused(
        settings, secure_kafka, new_device, tmp_path):
    kafka, listener = secure_kafka
    topic = f"test.sasl.{uuid.uuid4().hex[:8]}"
    ensure_topic(kafka.bootstrap, topic, 3)  # over the plain listener: setup only
    device = new_device("SASL")
    as_bridge = dataclasses.replace(settings, **listener.client("webos-bridge"))
    assert as_bridge.kafka_client()["security.protocol"] == "SASL_SSL"
    bridge = BridgeProcess(as_bridge, tmp_path, "--queues", naming.device_queue(device),
                           "--topic-template", topic)
    client = MqttDevice(settings, device)
    try:
        bridge.wait_consuming(1)
        marker = uuid.uuid4().hex
        assert client.publish(naming.mqtt_topic(device, "info"),
                              json.dumps({"id": device, "marker": marker}).encode())
        as_reader = dataclasses.replace(settings, **listener.client("webos-reader"))
        read = consume_cli(as_reader, topic)
        assert read.returncode == 0, read.stderr
        [record] = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
        assert record["key"] == device and record["payload"]["marker"] == marker
    finally:
        client.close()
        assert bridge.stop() == 0, bridge.output
    # The same listener with a wrong password: nothing is read, and the consumer stops at once
    # (exit 1) saying why.
    refused = consume_cli(as_reader, topic, timeout=8, WEBOS_KAFKA_SASL_PASSWORD="wrong",
                          WEBOS_KAFKA_SSL_CA_LOCATION=str(listener.pki.ca_cert))
    assert refused.returncode == 1 and marker not in refused.stdout
    assert "Authentication failed" in refused.stderr, refused.stderr[-2000:]
