"""Fresh RabbitMQ and Kafka on free ports, for test sessions and benchmarks (never the default ports)."""
from __future__ import annotations

import secrets
from pathlib import Path

from common.config import RABBITMQ_PORT_STEP, RABBITMQ_PORTS, Settings
from stack.kafka_server import LocalKafka
from stack.process import free_port
from stack.rabbitmq_server import LocalRabbitMQ, local_nodes, wait_cluster


def fresh_settings(base_dir: Path, **overrides) -> Settings:
    """Settings for brokers of their own under `base_dir`: free ports (the plain ones too, used
    when plain_listeners is set; every node's, for rabbitmq_nodes > 1), random passwords, a
    certificate authority of their own."""
    nodes = overrides.get("rabbitmq_nodes", 1)
    node_offsets = [RABBITMQ_PORT_STEP * k for k in range(1, nodes)]
    ports = {port: free_port(*node_offsets) for port in RABBITMQ_PORTS}
    return Settings(**{**ports, "kafka_bootstrap": f"127.0.0.1:{free_port()}",
                       "admin_password": secrets.token_urlsafe(12),
                       "bridge_password": secrets.token_urlsafe(12),
                       "pki_dir": str(Path(base_dir) / "pki"), **overrides})


def start_rabbitmq(settings: Settings, base_dir: Path, node_name: str) -> list[LocalRabbitMQ]:
    """Start the RabbitMQ node(s) of `settings` under `base_dir` (free distribution ports), wait
    until they answer (and form one cluster); stopped again if they do not."""
    nodes = local_nodes(settings, base_dir, dist_ports=[free_port() for _ in
                                                         range(settings.rabbitmq_nodes)],
                        node_name=node_name)
    try:
        for node in nodes:
            node.start()
        wait_cluster(nodes)
    except BaseException:
        for node in reversed(nodes):
            node.stop()
        raise
    return nodes


def start_fresh_brokers(base_dir: Path, node_name: str, **overrides) -> tuple[Settings, LocalRabbitMQ, LocalKafka]:
    """Start both brokers (fresh_settings) under `base_dir`, wait until they answer."""
    settings = fresh_settings(base_dir, **overrides)
    kafka_port, controller = int(settings.kafka_bootstrap.rpartition(":")[2]), free_port()
    kafka = LocalKafka(Path(base_dir) / "kafka", port=kafka_port, controller_port=controller)
    kafka.start()
    try:
        [rabbitmq] = start_rabbitmq(settings, base_dir, node_name)
        kafka.wait_ready()
    except BaseException:
        kafka.stop()
        raise
    return settings, rabbitmq, kafka
