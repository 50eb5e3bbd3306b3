"""The suite's brokers in containers (WEBOS_TEST_BROKERS=containers): RabbitMQ and Kafka from the
images `make images` builds (stack/images.py), started by testcontainers on podman's Docker API,
configured as docker-compose.yml configures them, their ports published on 127.0.0.1 only."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from common.config import REPO_ROOT, Settings
from common.pki import PKI
from stack import images
from stack.local import fresh_settings
from stack.rabbitmq_server import LocalRabbitMQ


def _compose_service(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][name]


def start(base_dir: Path) -> tuple[Settings, list]:
    """Start both; (their settings, what to stop, in reverse order: the engine's API service when
    this call started it, then the containers)."""
    engine_started = images.start_engine()
    built = images.build_images()
    os.environ.update({"DOCKER_HOST": images.DOCKER_HOST, "TESTCONTAINERS_RYUK_DISABLED": "true"})
    from testcontainers.core.container import DockerContainer  # reads DOCKER_HOST

    settings = fresh_settings(base_dir)
    PKI(settings.pki_path).ensure()
    kafka_port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    rabbitmq = (DockerContainer(built["RABBITMQ_IMAGE"])
                .with_env("RABBITMQ_DEFAULT_USER", settings.admin_user)
                .with_env("RABBITMQ_DEFAULT_PASS", settings.admin_password)
                .with_volume_mapping(str(settings.pki_path), "/pki", "ro")
                # As docker compose does: its start script (the broker's key copied where
                # rabbitmq.conf names it), mounted from the repository.
                .with_volume_mapping(str(REPO_ROOT / "containers" / "rabbitmq-node.sh"),
                                     "/usr/local/lib/webos/rabbitmq-node.sh", "ro")
                .with_command(_compose_service("rabbitmq")["command"]))
    # On 127.0.0.1 only: testcontainers' with_bind_ports takes no host address, docker-py's
    # port map (which testcontainers hands `ports` to) takes (address, port).
    rabbitmq.ports.update({"5671": ("127.0.0.1", settings.amqp_port),
                           "8883": ("127.0.0.1", settings.mqtt_port),
                           "15671": ("127.0.0.1", settings.management_port)})
    kafka = DockerContainer(built["KAFKA_IMAGE"])
    kafka.ports["9092"] = ("127.0.0.1", kafka_port)
    for key, value in {"KAFKA_NODE_ID": "1", "KAFKA_PROCESS_ROLES": "broker,controller",
                       "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
                       "KAFKA_LISTENERS": "PLAINTEXT://:9092,CONTROLLER://:9093",
                       "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{kafka_port}",
                       "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                       "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
                       "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
                       "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
                       "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
                       "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
                       "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0"}.items():
        kafka.with_env(key, value)
    started = []
    try:
        for container in (rabbitmq, kafka):
            container.start()
            started.append(container)
        LocalRabbitMQ(base_dir / "probe", settings).wait_ready(timeout=120)
    except BaseException:
        for container in reversed(started):
            container.stop()
        raise
    # Stopped in reverse order: the containers first, then the engine.
    stoppers = [images.stop_engine] if engine_started else []
    return settings, stoppers + [container.stop for container in started]
