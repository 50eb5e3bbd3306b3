"""Fresh RabbitMQ and Kafka on free ports, for test sessions and benchmarks (never the default ports)."""
from __future__ import annotations

import secrets
from pathlib import Path

from common.config import Settings
from stack.kafka_server import LocalKafka
from stack.process import free_port
from stack.rabbitmq_server import LocalRabbitMQ


def fresh_settings(base_dir: Path, **overrides) -> Settings:
    """Settings for brokers of their own under `base_dir`: free ports (the plain ones too, used
    when plain_listeners is set), random passwords, a certificate authority of their own."""
    ports = dict(zip(("amqp_port", "mqtt_port", "management_port", "amqp_plain_port",
                      "mqtt_plain_port", "management_plain_port"), (free_port() for _ in range(6))))
    return Settings(**{**ports, "kafka_bootstrap": f"127.0.0.1:{free_port()}",
                       "admin_password": secrets.token_urlsafe(12),
                       "bridge_password": secrets.token_urlsafe(12),
                       "pki_dir": str(Path(base_dir) / "pki"), **overrides})


def start_fresh_brokers(base_dir: Path, node_name: str, **overrides) -> tuple[Settings, LocalRabbitMQ, LocalKafka]:
    """Start both brokers (fresh_settings) under `base_dir`, wait until they answer."""
    settings = fresh_settings(base_dir, **overrides)
    kafka_port, controller = int(settings.kafka_bootstrap.rpartition(":")[2]), free_port()
    rabbitmq = LocalRabbitMQ(Path(base_dir) / "rabbitmq", settings, node_name=node_name,
                             dist_port=free_port())
    kafka = LocalKafka(Path(base_dir) / "kafka", port=kafka_port, controller_port=controller)
    started = []
    try:
        for broker in (rabbitmq, kafka):
            broker.start()
            started.append(broker)
        for broker in started:
            broker.wait_ready()
    except BaseException:
        for broker in reversed(started):
            broker.stop()
        raise
    return settings, rabbitmq, kafka
