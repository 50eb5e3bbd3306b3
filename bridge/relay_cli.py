"""`python -m bridge relay`: the relay's command line (bridge/relay.py is the relay)."""
from __future__ import annotations

import logging

from confluent_kafka import KafkaException

from bridge.relay import LOGGER, Relay

DESCRIPTION = """\
Relay commands from Kafka to the devices and their outcomes back (the bridge's other direction).
Reads Kafka webos.commands (key = device id or "broadcast", value {"command_id", "name", "args",
"ttl_s"}), publishes each to RabbitMQ's webos.topic with key webos.<device>.command (persistent,
mandatory, confirmed) and commits the offset after the broker confirmed. Writes to Kafka
webos.command-feedback (key = device id) "sent", then exactly one final record per command and
device: succeeded | failed | rejected (device refused, unknown device, invalid record, queue full)
| expired (its TTL ran out in the device's queue) | undeliverable (no device session). Keeps each
device's desired and reported state in the compacted Kafka topic webos.state. Broker addresses
and the webos-bridge password come from WEBOS_* variables (environment or .env).
"""


def main(argv=None) -> int:
    """`python -m bridge relay`: run the relay until SIGINT or SIGTERM."""
    import argparse

    from common.config import ConfigError, load_settings, stop_on_signals

    argparse.ArgumentParser(prog="python -m bridge relay", description=DESCRIPTION,
                            epilog="exit codes: 0 after SIGTERM/SIGINT; 2 when a Kafka topic is "
                            "missing or a password is wrong (the message says what to fix)."
                            ).parse_args(argv)
    settings = load_settings()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pika logs every returned (unroutable) command and every refused probe at WARNING; the relay
    # reports both as feedback and logs its own line.
    logging.getLogger("pika").setLevel(logging.ERROR)
    # librdkafka's informational lines (a refused topic's "partition count changed" on every
    # metadata refresh) only under WEBOS_LOG_LEVEL=DEBUG, as for the bridge.
    if logging.getLevelName(settings.log_level.upper()) > logging.DEBUG:
        logging.getLogger("bridge.kafka").setLevel(logging.WARNING)
    try:
        return Relay(settings, stop_on_signals(LOGGER)).run()
    except KafkaException as error:
        raise ConfigError(f"{error.args[0]}") from None
