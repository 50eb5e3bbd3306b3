"""Fresh RabbitMQ and Kafka on free ports, for test sessions and benchmarks (never the default ports)."""
from __future__ import annotations

import secrets
from pathlib import Path

from common.config import Settings
from stack.kafka_server import LocalKafka
from stack.process import free_port
from stack.rabbitmq_server import LocalRabbitMQ


def start_fresh_brokers(base_dir: Path, node_name: str) -> tuple[Settings, LocalRabbitMQ, LocalKafka]:
    """Start both brokers with random passwords under `base_dir`, wait until they answer."""
    amqp, mqtt, management, kafka_port, controller = (free_port() for _ in range(5))
    settings = Settings(amqp_port=amqp, mqtt_port=mqtt, management_port=management,
                        kafka_bootstrap=f"127.0.0.1:{kafka_port}",
                        admin_password=secrets.token_urlsafe(12),
                        device_password=secrets.token_urlsafe(12),
                        bridge_password=secrets.token_urlsafe(12))
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
