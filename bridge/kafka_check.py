"""What the bridge asks Kafka before it starts: is its topic there, how big may a batch be, is the
presence topic there."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from bridge.options import BridgeOptions
from bridge.reconnect import ConfigurationError
from common.config import Settings
from rabbitmq import naming

LOGGER = logging.getLogger(__name__)
# Room for the record's headers and batch framing inside a topic's max.message.bytes.
RECORD_OVERHEAD = 1024


@dataclass(frozen=True)
class KafkaCheck:
    """Kafka's answers: the largest payload to send (bigger ones are parked too-large), and
    whether device presence can be forwarded (its topic exists)."""

    max_message_bytes: int
    presence: bool


def check_kafka(settings: Settings, options: BridgeOptions) -> KafkaCheck:
    """Ask Kafka; ConfigurationError when the fixed topic is missing. Only warns when Kafka does
    not answer yet (messages wait in RabbitMQ meanwhile). The topic's max.message.bytes caps what
    the bridge sends: Kafka refuses a whole batch that is bigger, good records with it."""
    template = options.topic_template
    admin = AdminClient(settings.kafka_client(logger=logging.getLogger("bridge.kafka")))
    try:
        metadata = admin.list_topics(timeout=10)
    except KafkaException as error:
        LOGGER.warning("Kafka at %s does not answer yet (%s); messages wait in RabbitMQ",
                       settings.kafka_bootstrap, error)
        return KafkaCheck(options.max_message_bytes, options.presence)
    presence = options.presence and settings.presence_topic in metadata.topics
    if options.presence and not presence:
        LOGGER.warning("Kafka topic %s does not exist: device presence is not forwarded "
                       "(create it: python -m stack up does)", settings.presence_topic)
    if "{" in template:
        return KafkaCheck(options.max_message_bytes, presence)
    if template not in metadata.topics:
        raise ConfigurationError(
            f"Kafka topic {template!r} does not exist at {settings.kafka_bootstrap} and topics "
            "are not created automatically: create it (python -m stack up does for "
            "webos.events) or pass another --topic-template")
    limit = _topic_limit(admin, template)
    if limit is None or limit >= options.max_message_bytes:
        return KafkaCheck(options.max_message_bytes, presence)
    LOGGER.info("topic %s takes at most %d bytes per batch: payloads above %d go to %s",
                template, limit, limit - RECORD_OVERHEAD, naming.DEAD_QUEUE)
    return KafkaCheck(limit - RECORD_OVERHEAD, presence)


def _topic_limit(admin: AdminClient, topic: str) -> int | None:
    try:
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        configs = admin.describe_configs([resource])[resource].result(10)
        return int(configs["max.message.bytes"].value)
    except (KafkaException, KeyError, ValueError) as error:
        LOGGER.warning("cannot read max.message.bytes of %s (%s)", topic, error)
        return None
