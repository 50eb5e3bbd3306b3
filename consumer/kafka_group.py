"""The Kafka side shared by the CLI and the live view: consumer configuration and group lag."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from confluent_kafka import OFFSET_INVALID, Consumer, KafkaError, KafkaException, TopicPartition

LOGGER = logging.getLogger(__name__)
LIVE_VIEW_GROUP = "webos-live-view"
# librdkafka's logical offset "N records before the end" (RD_KAFKA_OFFSET_TAIL).
OFFSET_TAIL_BASE = -2000


def offset_tail(count: int) -> int:
    """The logical offset that starts `count` records before the end of a partition."""
    return OFFSET_TAIL_BASE - count


def default_group() -> str:
    """A fresh group for a one-off CLI run (nothing to resume, nobody else's offsets)."""
    return f"webos-cli-{uuid.uuid4().hex[:8]}"


def commit_and_close(consumer: Consumer) -> None:
    """Commit the offsets stored so far, then leave the group (nothing stored: nothing to say)."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as error:
        if error.args[0].code() != KafkaError._NO_OFFSET:
            LOGGER.warning("final commit failed: %s", error)
    finally:
        consumer.close()


def consumer_config(kafka: dict, group: str, from_beginning: bool = False, **extra) -> dict:
    """`kafka` (Settings.kafka_client(): servers and security) for a group member. Offsets are
    stored by hand after a record is handled; auto-commit commits what is stored."""
    config = {
        **kafka,
        "group.id": group,
        "enable.auto.offset.store": False,
        "enable.auto.commit": True,
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "logger": logging.getLogger("consumer.librdkafka"),
    }
    config.update(extra)
    return config


@dataclass(frozen=True)
class PartitionLag:
    """One partition of a group's lag: what the group committed, where the log ends."""

    partition: int
    committed: int | None
    low: int
    high: int

    @property
    def lag(self) -> int:
        """Records not yet committed by the group (all retained ones when it committed nothing)."""
        start = self.committed if self.committed is not None else self.low
        return max(0, self.high - start)

    def to_dict(self) -> dict:
        return {"partition": self.partition, "committed": self.committed, "low": self.low,
                "high": self.high, "lag": self.lag}


def partitions_of(consumer: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    """The partition numbers of `topic`; raises KafkaException when the topic is unknown."""
    metadata = consumer.list_topics(topic, timeout=timeout)
    topic_metadata = metadata.topics.get(topic)
    if topic_metadata is None or topic_metadata.error is not None:
        error = topic_metadata.error if topic_metadata is not None else "not found"
        raise KafkaException(f"topic {topic!r}: {error}")
    return sorted(topic_metadata.partitions)


def group_lag(consumer: Consumer, topic: str, partitions: list[int] | None = None,
              timeout: float = 10.0) -> list[PartitionLag]:
    """Lag per partition of the group `consumer` was configured with (it need not subscribe)."""
    if partitions is None:
        partitions = partitions_of(consumer, topic, timeout)
    committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout)
    lags = []
    for position in committed:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, position.partition),
                                                   timeout=timeout)
        offset = position.offset if position.offset != OFFSET_INVALID and position.offset >= 0 else None
        lags.append(PartitionLag(position.partition, offset, low, high))
    return sorted(lags, key=lambda lag: lag.partition)


def lag_for_group(kafka: dict, group: str, topic: str, timeout: float = 10.0) -> list[PartitionLag]:
    """Open a consumer in `group` without joining it, read its lag, close it (`kafka`:
    Settings.kafka_client())."""
    consumer = Consumer({**kafka, "group.id": group,
                         "enable.auto.commit": False,
                         "logger": logging.getLogger("consumer.librdkafka")})
    try:
        return group_lag(consumer, topic, timeout=timeout)
    finally:
        consumer.close()


def format_lag_table(group: str, topic: str, lags: list[PartitionLag]) -> str:
    """The `--lag` table: one row per partition and a total."""
    rows = [f"group {group}, topic {topic}",
            f"{'partition':>9} {'committed':>10} {'end':>10} {'lag':>8}"]
    for lag in lags:
        committed = "-" if lag.committed is None else str(lag.committed)
        rows.append(f"{lag.partition:>9} {committed:>10} {lag.high:>10} {lag.lag:>8}")
    rows.append(f"{'total':>9} {'':>10} {sum(l.high for l in lags):>10} "
                f"{sum(l.lag for l in lags):>8}")
    return "\n".join(rows)
