"""Session-wide real brokers for the suite.

Brokers are chosen in this order:
1. `WEBOS_TEST_BROKERS=env`: the brokers the WEBOS_* environment (and `.env`) names, for example a
   running `make run` stack or `docker compose up`.
2. testcontainers, when a Docker engine answers.
3. Local processes started by the same code as `make run`, on free ports with their own node name
   and data dir (the default here): a test run never touches a running stack.
Their logs are copied to test-artifacts/broker-logs/ when a test fails.
"""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import uuid
from pathlib import Path

import pika
import pytest

from rabbitmq import topology
from rabbitmq import endpoints
from common.config import REPO_ROOT, Settings, load_settings
from common.pki import PKI
from stack.kafka_server import LocalKafka, ensure_pipeline_topics, ensure_topic
from stack.local import start_fresh_brokers
from stack.rabbitmq_server import LocalRabbitMQ
from tests.browser import browser, page  # noqa: F401  (fixtures)

ARTIFACTS = REPO_ROOT / "test-artifacts"
LOGGER = logging.getLogger(__name__)


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # no client library, no socket, no engine: all mean "no Docker"
        return False


def compose_image(service: str) -> str:
    """The image docker-compose.yml runs for `service`: the containers here use the same one."""
    import yaml

    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][service]["image"]


def compose_command(service: str) -> list[str]:
    """The command docker-compose.yml gives `service`."""
    import yaml

    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][service]["command"]


def _test_credentials() -> dict[str, str]:
    return {name: secrets.token_urlsafe(12) for name in ("admin_password", "bridge_password")}


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
        from testcontainers.core.container import DockerContainer
        from testcontainers.kafka import KafkaContainer

        credentials = _test_credentials()
        pki = PKI(self.tmp_root / "pki")
        pki.ensure()
        rabbit = (DockerContainer(compose_image("rabbitmq"))
                  .with_env("RABBITMQ_DEFAULT_USER", "webos-admin")
                  .with_env("RABBITMQ_DEFAULT_PASS", credentials["admin_password"])
                  .with_volume_mapping(str(REPO_ROOT / "rabbitmq" / "rabbitmq.conf"),
                                       "/etc/rabbitmq/rabbitmq.conf", "ro")
                  .with_volume_mapping(str(REPO_ROOT / "rabbitmq" / "enabled_plugins"),
                                       "/etc/rabbitmq/enabled_plugins", "ro")
                  .with_volume_mapping(str(pki.directory), "/pki", "ro")
                  # As docker compose does: the broker's key copied where rabbitmq.conf names it,
                  # owned by the image's rabbitmq user.
                  .with_command(compose_command("rabbitmq"))
                  .with_exposed_ports(5671, 8883, 15671))
        rabbit.start()
        self.stoppers.append(rabbit.stop)
        kafka = KafkaContainer().with_kraft()
        kafka.start()
        self.stoppers.append(kafka.stop)
        settings = Settings(rabbitmq_host=rabbit.get_container_host_ip(), pki_dir=str(pki.directory),
                            amqp_port=int(rabbit.get_exposed_port(5671)),
                            mqtt_port=int(rabbit.get_exposed_port(8883)),
                            management_port=int(rabbit.get_exposed_port(15671)),
                            kafka_bootstrap=kafka.get_bootstrap_server(), **credentials)
        probe = LocalRabbitMQ(self.tmp_root / "probe", settings)
        probe.wait_ready(timeout=120)
        return settings

    def stop(self) -> None:
        for stop in reversed(self.stoppers):
            stop()


@pytest.fixture(scope="session")
def brokers(tmp_path_factory, request):
    """Start (or find) one RabbitMQ and one Kafka for the whole session."""
    handle = _Brokers(tmp_path_factory.mktemp("brokers"))
    mode = os.environ.get("WEBOS_TEST_BROKERS", "auto")
    try:
        if mode == "env":
            settings = load_settings()
        elif mode == "auto" and _docker_answers():
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
