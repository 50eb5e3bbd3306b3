"""The bridge's own knobs, and how bridge instances share the device queues."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from common.config import Settings

# Consumer priorities of single active consumer: the range each instance's priorities are drawn from.
PRIORITIES = 1000


@dataclass(frozen=True)
class BridgeOptions:
    """The bridge's own knobs (broker addresses and users come from Settings)."""

    # Their defaults are the settings table's (common/config.py says why each is what it is).
    queues: tuple[str, ...] = Settings.bridge_queues
    queue_pattern: str | None = Settings.bridge_queue_pattern or None
    topic_template: str = Settings.kafka_topic
    prefetch: int = Settings.bridge_prefetch
    linger_ms: float = Settings.bridge_linger_ms
    batch_size: int = Settings.bridge_batch_size
    max_message_bytes: int = Settings.bridge_max_message_bytes
    discovery_interval: float = Settings.bridge_discovery_interval
    # This bridge among several: its consumer tags start with it, and it picks its priorities.
    instance: str = ""
    # Forward webos.presence (devices' connects and disconnects) to Settings.presence_topic.
    presence: bool = True
    flush_timeout: float = Settings.bridge_flush_timeout
    retry_max_seconds: float = Settings.bridge_retry_max_seconds
    kafka_config: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def producer_config(self, settings: Settings, max_message_bytes: int | None = None) -> dict:
        """librdkafka configuration: durable (acks=all, idempotent), batched, records and batches
        at most `max_message_bytes` (default: the option), whatever --kafka-config says."""
        limit = max_message_bytes or self.max_message_bytes
        config = {**settings.kafka_client(), "acks": "all",
                  "enable.idempotence": True, "linger.ms": self.linger_ms,
                  "batch.size": self.batch_size, "client.id": "webos-bridge",
                  # The Java client's partitioner: a key lands where Kafka Connect or a Java
                  # producer would put it. librdkafka's default (consistent_random, CRC32) put
                  # both default devices on partition 0 of 6; murmur2 puts them on 1 and 4.
                  "partitioner": "murmur2_random",
                  # A broker that hangs (SIGSTOP: its sockets open, no answer) held its
                  # partitions' records for librdkafka's default 60 s before they went to the new
                  # leader. tests/test_kafka_cluster.py, a 20 s stream hung a third in: all in
                  # Kafka 61.4 s after the hang with 60 s, 21.8 s with 10 s. By 10 s the
                  # controller has fenced it (broker.session.timeout.ms, 9 s); the idempotent
                  # producer resends in order, without duplicates.
                  "socket.timeout.ms": 10_000,
                  # A record waits in librdkafka until Kafka takes it, however long Kafka is away
                  # (RabbitMQ keeps the backlog behind it; --prefetch bounds what waits here).
                  # With the default (300 s) a longer outage timed records out, and not in their
                  # order (those already sent fail after those still queued), so a device's
                  # records came back through the back-off out of order: make outage, Kafka down
                  # 10 min, 6,430 out of order over 479 of 500 devices, 0 missing.
                  "message.timeout.ms": 0,
                  **dict(self.kafka_config)}
        config["message.max.bytes"] = limit
        config["batch.size"] = min(int(config["batch.size"]), limit)
        return config


def share_priority(instance: str, queue: str) -> int:
    """This instance's consumer priority on `queue` (0..PRIORITIES-1), the same every time.

    Every bridge instance consumes every device queue; single active consumer delivers to the
    consumer of highest priority (RabbitMQ 4 quorum queues), so each queue goes to the instance
    whose hash of (instance, queue) is highest: rendezvous hashing. Each instance is thus active
    on an even share with no coordination; an instance that joins takes over a share (RabbitMQ
    switches once the old consumer's in-flight messages are settled, so order is kept), and the
    queues of one that dies go to the instances with the next priority.
    """
    digest = hashlib.blake2b(f"{instance}\0{queue}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % PRIORITIES
