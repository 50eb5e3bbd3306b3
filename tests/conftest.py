"""Session-wide real brokers for the suite.

WEBOS_TEST_BROKERS chooses them:
- `local` (the default): local processes started by the same code as `make run`, on free ports
  with their own node name and data dir: a test run never touches a running stack;
- `containers`: RabbitMQ and Kafka from the images `make images` builds, started by
  testcontainers on podman's Docker API (tests/support/container_brokers.py); `make test` runs
  the pipeline and bridge tests (marker `pipeline`) this way too;
- `env`: the brokers the WEBOS_* environment (and `.env`) names, for example a running `make run`
  stack or `docker-compose up`.
Their logs are copied to test-artifacts/broker-logs/ when a test fails.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import uuid
from pathlib import Path

import pika
import pytest

from rabbitmq import topology
from rabbitmq import endpoints
from common.config import REPO_ROOT, Settings, load_settings
from common.pki import PKI
from stack.process import free_port
from stack.kafka_server import (AUTHORIZER, LocalKafka, SecureListener, TopicAcls,
                                ensure_pipeline_topics, ensure_topic)
from stack.local import start_fresh_brokers
from stack.rabbitmq_server import LocalRabbitMQ
from tests.browser import browser, page  # noqa: F401  (fixtures)

ARTIFACTS = REPO_ROOT / "test-artifacts"
LOGGER = logging.getLogger(__name__)
# A suite started in the background by a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every process it starts (an ignored signal survives exec): the tests
# that stop `make run` with Ctrl-C would then wait in vain. Handled here, SIGINT is back to its
# default in each child.
signal.signal(signal.SIGINT, signal.default_int_handler)


class _Brokers:
    """The brokers of one test session and a way to stop them."""

    def __init__(self, tmp_root: Path):
        self.tmp_root = tmp_root
        self.stoppers = []
        self.logs: list[Path] = []
        self.rabbitmq: LocalRabbitMQ | None = None
        self.kafka: LocalKafka | None = None

    def local(self) -> Settings:
        settings, self.rabbitmq, self.kafka = start_fresh_brokers(
            self.tmp_root, node_name=f"webos-test-{os.getpid()}")
        for broker in (self.rabbitmq, self.kafka):
            self.stoppers.append(broker.stop)
            self.logs.append(broker.log_path)
        return settings

    def containers(self) -> Settings:
        from tests.support import container_brokers

        settings, stoppers = container_brokers.start(self.tmp_root)
        self.stoppers += stoppers
        return settings

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            stop()


@pytest.fixture(scope="session")
def brokers(tmp_path_factory, request):
    """Start (or find) one RabbitMQ and one Kafka for the whole session."""
    handle = _Brokers(tmp_path_factory.mktemp("brokers"))
    mode = os.environ.get("WEBOS_TEST_BROKERS", "local")
    try:
        if mode == "env":
            settings = load_settings()
        elif mode == "containers":
            settings = handle.containers()
        else:
            settings = handle.local()
        topology.apply(settings)
        ensure_pipeline_topics(settings)
    except BaseException:
        handle.stop()
        raise
    handle.settings = settings
    yield handle
    handle.stop()
    if request.session.testsfailed and handle.logs:
        target = ARTIFACTS / "broker-logs"
        target.mkdir(parents=True, exist_ok=True)
        for log in handle.logs:
            if log.exists():
                shutil.copy(log, target / log.name)


@pytest.fixture(scope="session")
def settings(brokers) -> Settings:
    """Connection settings (ports, users, passwords) of the session's brokers."""
    return brokers.settings


@pytest.fixture
def admin_channel(settings):
    """A pika channel as webos-admin, closed after the test."""
    connection = pika.BlockingConnection(endpoints.admin_parameters(settings))
    yield connection.channel()
    connection.close()


@pytest.fixture
def new_device(settings, admin_channel):
    """A device id unique to this test, with its queue, certificate and broker user; all
    removed after."""
    created = []

    def make(prefix: str = "T") -> str:
        device = f"{prefix}{uuid.uuid4().hex[:10]}"
        topology.declare_device(admin_channel, device, settings.cluster)
        topology.enrol_devices(settings, [device])
        created.append(device)
        return device

    yield make
    for device in created:
        topology.delete_device(admin_channel, device)
        topology.remove_enrolment(settings, device)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Folder for screenshots and other files a reader of the test run may want."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def kafka_topic(settings):
    """A Kafka topic only this test writes to."""
    topic = f"test.{uuid.uuid4().hex[:10]}"
    ensure_topic(settings.kafka_bootstrap, topic, 3)
    return topic


@pytest.fixture
def authorizing_kafka(tmp_path, settings):
    """A Kafka of its own that checks ACLs, with a SASL_SSL listener: the bridge's SCRAM user
    (also the relay's) may use every topic and group until a test denies it something."""
    listener = SecureListener(port=free_port(), pki=PKI(settings.pki_path),
                              users={"webos-bridge": secrets.token_urlsafe(12)})
    kafka = LocalKafka(tmp_path / "kafka", port=free_port(), controller_port=free_port(),
                       secure=listener, overrides=AUTHORIZER)
    kafka.start()
    try:
        kafka.wait_ready()
        acls = TopicAcls(kafka.bootstrap, "webos-bridge")
        acls.grant_all()
        yield kafka, listener, acls
    finally:
        kafka.stop()
