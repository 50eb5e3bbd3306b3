"""`python -m bridge`: forward the RabbitMQ device queues to Kafka (see `--help`)."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import re
import socket
import sys

from bridge.forwarder import Forwarder
from bridge.options import BridgeOptions
from bridge.reconnect import ConfigurationError
from bridge.metrics import BridgeStats, MetricsServer
from bridge.delivery import TemplateError, check_template
from common.config import Settings, env_name, load_settings, positive_int, run, stop_on_signals

LOGGER = logging.getLogger("bridge")
SETTINGS_FIELDS = {setting.name: setting for setting in dataclasses.fields(Settings)}

DESCRIPTION = """\
Consume the RabbitMQ device queues (webos.<device>) as webos-bridge and produce each message to
Kafka (acks=all, idempotent): key = device id, value = the payload bytes unchanged, headers
routing_key, mqtt_topic, device, type, queue, msg_id. A delivery is acked only after Kafka
confirmed its record. Messages that are not a JSON object or that Kafka cannot take are parked in
webos.dead with the header x-webos-dead-reason. Broker addresses and credentials come from
WEBOS_* variables (environment or .env, see common/config.py), Kafka's TLS and SASL from
WEBOS_KAFKA_SECURITY_PROTOCOL, _SASL_MECHANISM, _SASL_USERNAME, _SASL_PASSWORD and
_SSL_CA_LOCATION (librdkafka's security.protocol, sasl.*, ssl.ca.location); the bridge's own
knobs from the WEBOS_BRIDGE_* variables named below; flags override both.
"""

EPILOG = """\
exit codes: 0 after SIGTERM/SIGINT (consumers cancelled, Kafka flushed, confirmed deliveries
acked); 2 on a configuration error (wrong password, missing queue or topic, bad flag), with a
message that says what to fix; 1 on an unexpected failure.
endpoints: GET /metrics (Prometheus text), GET /healthz (200 while connected to RabbitMQ).
parked messages: `python -m bridge dead list [--format json]` prints what sits in webos.dead
without taking it out; `dead redrive --reason R | --device D | --all` puts messages back on their
route once the cause is fixed; `dead purge ...` removes them (see `python -m bridge dead --help`).
"""


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port")
    return value


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression: {error}")
    return text


def _template(text: str) -> str:
    try:
        return check_template(text)
    except TemplateError as error:
        raise argparse.ArgumentTypeError(str(error))


def _queue_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    """The command line; its defaults are `settings` (WEBOS_* variables, .env, then the table)."""
    parser = argparse.ArgumentParser(prog="python -m bridge", description=DESCRIPTION,
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_source_arguments(parser, settings)
    _add_kafka_arguments(parser, settings)
    _add_service_arguments(parser, settings)
    return parser


def _from_setting(parser, flag: str, settings: Settings, name: str, help: str,
                  default_text: str = "%(default)s", **kwargs) -> None:
    """A flag whose default is the setting `name`; its help ends with the setting's variable."""
    parser.add_argument(flag, default=getattr(settings, name), **kwargs,
                        help=f"{help} [{env_name(SETTINGS_FIELDS[name])}; default: {default_text}]")


def _add_source_arguments(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Which queues, and which Kafka topic each message goes to."""
    which = parser.add_mutually_exclusive_group()
    _from_setting(
        which, "--queues", settings, "bridge_queues", type=_queue_list, metavar="Q1,Q2",
        help="consume exactly these queues (comma-separated); the bridge stops with exit code 2 "
        "if one is missing at start", default_text="every device queue webos.<device>: new ones "
        "are picked up as RabbitMQ announces them on its event exchange, and a full listing "
        "through the management API every --discovery-interval seconds catches anything missed")
    which.add_argument(
        "--queue-pattern", type=_regex, default=settings.bridge_queue_pattern or None, metavar="REGEX",
        help="consume the device queues whose name matches this regular expression (re.search), "
        "including ones created later [WEBOS_BRIDGE_QUEUE_PATTERN; default: all device queues]")
    parser.add_argument(
        "--topic-template", type=_template,
        default=_template(settings.bridge_topic_template or settings.kafka_topic), metavar="TEMPLATE",
        help="Kafka topic for each message; placeholders {device} {type} {queue} {routing_key} "
        "[WEBOS_BRIDGE_TOPIC_TEMPLATE, else WEBOS_KAFKA_TOPIC; default: %(default)s]. "
        "Topics are not created automatically")


def _add_kafka_arguments(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """What is in flight, and how records are batched into Kafka."""
    _from_setting(parser, "--prefetch", settings, "bridge_prefetch", type=positive_int,
                  help="most deliveries in flight (RabbitMQ basic.qos): bounds memory and what "
                  "is redelivered after a crash; the rest waits in RabbitMQ")
    _from_setting(parser, "--linger-ms", settings, "bridge_linger_ms", type=_non_negative_float,
                  help="how long the Kafka producer waits to fill a batch (librdkafka "
                  "linger.ms): longer means fewer, bigger Kafka requests, and up to that much "
                  "more latency")
    _from_setting(parser, "--batch-size", settings, "bridge_batch_size", type=positive_int,
                  help="largest Kafka batch in bytes per partition (librdkafka batch.size)")
    _from_setting(parser, "--max-message-bytes", settings, "bridge_max_message_bytes",
                  type=positive_int, help="payloads bigger than this go to webos.dead with "
                  "reason too-large; keep it at or below the topic's max.message.bytes "
                  "(librdkafka message.max.bytes)")
    _from_setting(parser, "--flush-timeout", settings, "bridge_flush_timeout",
                  type=_non_negative_float, metavar="SECONDS", help="on SIGTERM/SIGINT, how long "
                  "to wait for Kafka to confirm what is in flight; the rest stays unacked and is "
                  "delivered again")
    _from_setting(parser, "--retry-max-seconds", settings, "bridge_retry_max_seconds",
                  type=_non_negative_float, metavar="SECONDS", help="longest back-off of a "
                  "device queue whose records Kafka refuses for a reason that may pass (topic "
                  "authorization, topic gone, timeouts): its deliveries are held and produced "
                  "again after 1 s, 2 s, ... up to this, jittered; other devices go on")
    parser.add_argument(
        "--kafka-config", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
        help="extra librdkafka producer property, repeatable (e.g. compression.type=lz4); "
        "acks=all, enable.idempotence=true and partitioner=murmur2_random are the defaults "
        "and should stay")


def _add_service_arguments(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Metrics, this instance among several, discovery, presence, logging."""
    _from_setting(parser, "--metrics-port", settings, "bridge_metrics_port", type=_port,
                  help="port of /metrics and /healthz on --metrics-host; 0 turns them off")
    _from_setting(parser, "--metrics-host", settings, "bind_host",
                  help="address /metrics and /healthz listen on")
    _from_setting(parser, "--instance", settings, "bridge_instance", metavar="NAME",
                  help="this bridge's name among several: every instance consumes every device "
                  "queue and is the active consumer of an even share of them, standing by for "
                  "the others; its consumer tags carry it",
                  default_text="<host name>:<metrics port>")
    _from_setting(parser, "--discovery-interval", settings, "bridge_discovery_interval",
                  type=_non_negative_float, metavar="SECONDS", help="how often the full queue "
                  "list is fetched from the management API while queue events arrive (every 2 s "
                  "while they do not: the rabbitmq_event_exchange plugin off)")
    parser.add_argument(
        "--no-presence", dest="presence", action="store_false",
        help=f"do not forward devices' MQTT connects and disconnects (queue webos.presence, fed "
        f"by RabbitMQ's event exchange) to the Kafka topic {settings.presence_topic} "
        "[WEBOS_PRESENCE_TOPIC names it]; one bridge instance at a time forwards them")
    parser.add_argument(
        "--log-level", default=settings.log_level.upper(),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="[WEBOS_LOG_LEVEL; default: %(default)s]")


def options_from(args) -> BridgeOptions:
    """The bridge's options from its parsed command line."""
    return BridgeOptions(
        queues=args.queues, queue_pattern=args.queue_pattern, topic_template=args.topic_template,
        prefetch=args.prefetch, linger_ms=args.linger_ms, batch_size=args.batch_size,
        max_message_bytes=args.max_message_bytes, discovery_interval=args.discovery_interval,
        flush_timeout=args.flush_timeout, retry_max_seconds=args.retry_max_seconds,
        kafka_config=tuple(args.kafka_config),
        presence=args.presence,
        instance=args.instance or f"{socket.gethostname()}:{args.metrics_port or os.getpid()}")


def configure_logging(level: str) -> None:
    """Log lines on stderr; pika's own only where the bridge does not report the same better."""
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    # A channel the broker closes (a passive declare of a deleted queue) is reported by the bridge.
    logging.getLogger("pika.channel").setLevel(logging.ERROR)
    # It logs a traceback for a refused login that the bridge reports as a configuration error.
    logging.getLogger("pika.adapters.blocking_connection").setLevel(logging.CRITICAL)
    # The management API closes a kept-alive connection now and then; the session retries such a
    # call once on a new connection (rabbitmq/endpoints.py), and urllib3 warned of each retry.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # librdkafka's informational lines (a refused topic's "partition count changed from 1 to 0"
    # on every metadata refresh) only under --log-level DEBUG; its warnings and errors always.
    if logging.getLevelName(level) > logging.DEBUG:
        logging.getLogger("bridge.kafka").setLevel(logging.WARNING)


def main(argv=None) -> int:
    """Parse flags, serve /metrics, forward until SIGTERM/SIGINT; return the exit code.
    `python -m bridge dead ...` inspects webos.dead instead (bridge/dead_letters_cli.py), and
    `python -m bridge relay` runs the other direction (bridge/relay.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dead"]:
        from bridge import dead_letters_cli

        return dead_letters_cli.main(argv[1:])
    if argv[:1] == ["relay"]:
        from bridge import relay_cli

        return relay_cli.main(argv[1:])
    settings = load_settings()
    args = build_parser(settings).parse_args(argv)
    configure_logging(args.log_level)
    if not settings.bridge_password:
        LOGGER.error("configuration error: no password for %s: set WEBOS_BRIDGE_PASSWORD "
                     "(environment or .env; `python -m stack up` generates one)",
                     settings.bridge_user)
        return 2
    stop = stop_on_signals(LOGGER)
    stats = BridgeStats()
    server = None
    if args.metrics_port:
        try:
            server = MetricsServer(stats, args.metrics_host, args.metrics_port)
        except OSError as error:
            LOGGER.error("configuration error: cannot serve /metrics on %s:%s (%s): pick another "
                         "--metrics-port, or 0 to turn it off", args.metrics_host,
                         args.metrics_port, error)
            return 2
        LOGGER.info("metrics on %s/metrics, health on %s/healthz", server.url, server.url)
    # What start-up made lives as long as the process: keep the collector off it (gc.freeze), and
    # collect young objects less often. A delivery's objects die within a loop turn, so the
    # default threshold (700) made the collector walk the in-flight window ~5 times per 1,000
    # messages, about 1.5 us of CPU per message; 10,000 keeps cyclic garbage bounded all the same.
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    try:
        return Forwarder(settings, options_from(args), stop, stats).run()
    except ConfigurationError as error:
        LOGGER.error("configuration error: %s", error)
        return 2
    except Exception:
        LOGGER.exception("bridge failed")
        return 1
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    run(main)
