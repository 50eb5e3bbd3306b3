"""`python -m consumer`: read the device stream from Kafka on a terminal or into a script."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.kafka_group import (LIVE_VIEW_GROUP, commit_and_close, consumer_config,
                                  default_group, format_lag_table, lag_for_group)
from consumer.records import (DEFAULT_DEDUPE_WINDOW, DedupeWindow, Record, RecordFilter, Summary,
                              format_json, format_pretty)
from common.config import load_settings, positive_int

LOGGER = logging.getLogger("consumer")
POLL_SECONDS = 0.2
# With --timeout, the idle clock starts once the group is joined; joining may take this long.
JOIN_TIMEOUT_SECONDS = 30.0

DESCRIPTION = """\
Read the device stream (Kafka topic webos.events unless --topic says otherwise) as a member of a
consumer group and print each record.

Records: key = device id, value = the device's JSON payload, headers routing_key, mqtt_topic,
device, type, queue, msg_id. Values that are not JSON are printed raw and counted, never fatal.

Offsets: each record's offset is stored only after it has been printed (or filtered out, or
dropped as a duplicate) and committed automatically; Ctrl-C or SIGTERM commit and close cleanly,
so a later run with the same --group resumes right after the last record printed.
A one-line summary goes to stderr on exit: records per device, duplicates dropped, gaps in seq,
non-JSON records. Connection settings come from WEBOS_* variables and .env (common/config.py);
for a Kafka with TLS or SASL set WEBOS_KAFKA_SECURITY_PROTOCOL, WEBOS_KAFKA_SASL_MECHANISM,
WEBOS_KAFKA_SASL_USERNAME, WEBOS_KAFKA_SASL_PASSWORD and WEBOS_KAFKA_SSL_CA_LOCATION (librdkafka's
security.protocol, sasl.mechanism, sasl.username, sasl.password, ssl.ca.location).

Use `python -m consumer serve` for the live web page.
"""

EPILOG = """\
examples:
  python -m consumer                                  new records, pretty, until Ctrl-C
  python -m consumer --from-beginning --format json --timeout 5 > records.jsonl
  python -m consumer --device 3DF92-192 --type warning --type error
  python -m consumer --group audit --dedupe           resume group "audit", drop repeats
  python -m consumer --lag --group audit              lag per partition, then exit
  python -m consumer --presence --from-beginning      who connected and disconnected, when

exit status: 0 after Ctrl-C/SIGTERM, --count or --timeout; 1 on a Kafka error; 2 on bad usage.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m consumer`."""
    parser = argparse.ArgumentParser(
        prog="python -m consumer", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topic", help="Kafka topic (default: WEBOS_KAFKA_TOPIC, webos.events)")
    parser.add_argument("--presence", action="store_true",
                        help="read the devices' presence instead: their MQTT connects and "
                             "disconnects (topic WEBOS_PRESENCE_TOPIC, webos.presence), each "
                             "with the node and client id, keyed by device")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers (default: WEBOS_KAFKA_BOOTSTRAP)")
    parser.add_argument("--group", help="consumer group; a run with the same group resumes where "
                        "the last one stopped (default: a fresh webos-cli-<random> group; "
                        f"with --lag: {LIVE_VIEW_GROUP}, the live page's group)")
    parser.add_argument("--from-beginning", action="store_true",
                        help="partitions the group never committed start at the oldest retained "
                        "record (default: at the end, i.e. only records produced after joining); "
                        "partitions with committed offsets always resume from them")
    parser.add_argument("--device", action="append", metavar="ID", default=[],
                        help="show only this device (record key or `device` header); repeatable")
    parser.add_argument("--type", action="append", metavar="TYPE", default=[], dest="types",
                        help="show only this message type (info, warning, error: the `type` "
                        "header or the routing key's last part); repeatable")
    parser.add_argument("--format", choices=("pretty", "json"), default="pretty",
                        help="pretty: one line per record for people (coloured on a terminal); "
                        "json: one JSON object per line with topic, key, partition, offset, "
                        "timestamp, headers, payload (and raw + error for non-JSON values)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colour pretty output: auto = when stdout is a terminal and "
                        "NO_COLOR is unset")
    parser.add_argument("--count", type=positive_int, metavar="N",
                        help="exit (status 0) after printing N records")
    parser.add_argument("--timeout", type=_positive_float, metavar="S",
                        help="exit (status 0) after S seconds with no record to print, counted "
                        f"from joining the group (status 1 if it cannot join within "
                        f"{JOIN_TIMEOUT_SECONDS:.0f} s)")
    parser.add_argument("--dedupe", action="store_true",
                        help="drop records whose device already had their msg_id (payload "
                        "msg_id, else the msg_id header) among the last --dedupe-window ids")
    parser.add_argument("--dedupe-window", type=positive_int, default=DEFAULT_DEDUPE_WINDOW,
                        metavar="N", help=f"ids remembered by --dedupe (default {DEFAULT_DEDUPE_WINDOW})")
    parser.add_argument("--lag", action="store_true",
                        help="print the group's lag per partition (committed offset vs end of "
                        "log) and exit")
    chatter = parser.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true",
                         help="no summary line, only warnings")
    chatter.add_argument("-v", "--verbose", action="store_true",
                         help="also log the group's partitions with their start offsets, "
                         "revocations and dropped duplicates")
    return parser


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


class StreamPrinter:
    """Consumes the topic and prints records until stopped, a count is reached or it goes idle."""

    def __init__(self, consumer: Consumer, output, record_filter: RecordFilter,
                 output_format: str = "pretty", colour: bool = False,
                 dedupe: DedupeWindow | None = None, count: int | None = None,
                 idle_timeout: float | None = None, from_beginning: bool = False):
        self.consumer = consumer
        self.output = output
        self.record_filter = record_filter
        self.output_format = output_format
        self.colour = colour
        self.dedupe = dedupe
        self.count = count
        self.idle_timeout = idle_timeout
        self.from_beginning = from_beginning
        self.joined = False
        self.summary = Summary()
        self.stop = threading.Event()
        self.last_activity = time.monotonic()

    def on_assign(self, consumer, partitions) -> None:
        """Pin where each partition starts, then start the idle clock.

        A partition the group never committed starts at the oldest record (--from-beginning) or
        at the end of the log, and that start is stored at once: a later run of the same group
        resumes there even if this run printed nothing from that partition. (Left to
        auto.offset.reset, a "latest" partition would be re-resolved to the end next time and
        whatever arrived in between would be skipped.) Once this returns, every record produced
        from now on will be seen.
        """
        try:
            positions = consumer.committed(partitions, timeout=10)
            starts = []
            for position in positions:
                if position.offset < 0:
                    low, high = consumer.get_watermark_offsets(position, timeout=10)
                    position.offset = low if self.from_beginning else high
                    starts.append(TopicPartition(position.topic, position.partition,
                                                 position.offset))
            consumer.assign(positions)
            if starts:
                consumer.store_offsets(offsets=starts)
        except KafkaException as error:
            LOGGER.warning("could not pin start offsets (%s); using auto.offset.reset", error)
            consumer.assign(partitions)
            positions = partitions
        self.joined = True
        self.last_activity = time.monotonic()
        # One line at INFO says the run has joined (from here on every new record is seen);
        # the offsets of each partition are for -v.
        LOGGER.info("assigned %d partitions of %s", len(positions),
                    ", ".join(sorted({p.topic for p in positions})))
        LOGGER.debug("start offsets: %s",
                     ", ".join(f"{p.topic}[{p.partition}]@{p.offset}" for p in positions))

    def on_revoke(self, consumer, partitions) -> None:
        LOGGER.debug("revoked %d partitions", len(partitions))

    def run(self) -> None:
        """Poll until stop, --count or --timeout; every handled record has its offset stored."""
        while not self.stop.is_set():
            if self.idle_timeout is not None:
                idle = time.monotonic() - self.last_activity
                if self.joined and idle >= self.idle_timeout:
                    LOGGER.info("no record for %.1f s: stopping", self.idle_timeout)
                    return
                if not self.joined and idle >= max(self.idle_timeout, JOIN_TIMEOUT_SECONDS):
                    raise KafkaException(f"could not join group within {idle:.0f} s")
            message = self.consumer.poll(POLL_SECONDS)
            if message is None:
                continue
            if message.error():
                self.on_error(message.error())
                continue
            self.handle(Record.from_message(message))
            self.consumer.store_offsets(message)
            if self.count is not None and self.summary.records >= self.count:
                return

    def on_error(self, error: KafkaError) -> None:
        """End of partition and transient errors are logged; fatal ones stop the run, and so
        do refused credentials (retrying them would only fail again)."""
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.fatal() or error.code() in (KafkaError.UNKNOWN_TOPIC_OR_PART,
                                             KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                             KafkaError.GROUP_AUTHORIZATION_FAILED,
                                             KafkaError._AUTHENTICATION,
                                             KafkaError.SASL_AUTHENTICATION_FAILED):
            raise KafkaException(error)
        LOGGER.warning("Kafka: %s", error)

    def handle(self, record: Record) -> None:
        """Filter, de-duplicate, check seq, print one record."""
        summary = self.summary
        if not self.record_filter.matches(record):
            summary.filtered += 1
            return
        msg_id = record.msg_id
        # Per device: a broadcast's copies (one per device queue) share their msg_id.
        if self.dedupe is not None and msg_id is not None \
                and self.dedupe.seen((record.device, msg_id)):
            summary.duplicates += 1
            LOGGER.debug("duplicate msg_id %s at %s[%d]@%d dropped", msg_id, record.topic,
                         record.partition, record.offset)
            return
        self.last_activity = time.monotonic()
        summary.records += 1
        summary.per_device[record.device or "?"] += 1
        if not record.is_json:
            summary.non_json += 1
        note = {"gap": "seq gap", "out-of-order": "seq out of order"}.get(
            summary.seq.observe(record.device, record.seq))
        if self.output_format == "json":
            line = format_json(record)
        else:
            line = format_pretty(record, colour=self.colour, note=note)
        self.output.write(line + "\n")
        self.output.flush()


def _use_colour(choice: str, stream) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    return stream.isatty() and not os.environ.get("NO_COLOR")


def run_lag(args, settings) -> int:
    """`--lag`: print the lag table (or one JSON object) and exit."""
    group = args.group or LIVE_VIEW_GROUP
    lags = lag_for_group(settings.kafka_client(), group, args.topic)
    if args.format == "json":
        print(json.dumps({"group": group, "topic": args.topic,
                          "partitions": [lag.to_dict() for lag in lags],
                          "total": sum(lag.lag for lag in lags)}))
    else:
        print(format_lag_table(group, args.topic, lags))
    return 0


def configure_logging(args) -> None:
    """Warnings always; with --quiet nothing else, with -v also this package's debug lines
    (not every library's)."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose:
        logging.getLogger("consumer").setLevel(logging.DEBUG)


def main(argv=None) -> int:
    """Entry point of the terminal consumer; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args)
    settings = load_settings()
    if args.bootstrap:
        settings = load_settings(kafka_bootstrap=args.bootstrap)
    if args.presence and args.topic:
        parser.error("--presence reads the presence topic: leave out --topic")
    args.topic = args.topic or (settings.presence_topic if args.presence else settings.kafka_topic)
    try:
        if args.lag:
            return run_lag(args, settings)
    except KafkaException as error:
        LOGGER.error("cannot read the lag of %s: %s", args.topic, error)
        return 1

    group = args.group or default_group()
    # Client-level errors (refused credentials among them) reach on_error too, from poll().
    consumer = Consumer(consumer_config(settings.kafka_client(), group, args.from_beginning,
                                        error_cb=lambda error: printer.on_error(error)))
    printer = StreamPrinter(
        consumer, sys.stdout, RecordFilter.of(args.device, args.types), args.format,
        colour=args.format == "pretty" and _use_colour(args.color, sys.stdout),
        dedupe=DedupeWindow(args.dedupe_window) if args.dedupe else None,
        count=args.count, idle_timeout=args.timeout, from_beginning=args.from_beginning)

    def on_signal(signum, frame):
        LOGGER.info("%s: stopping", signal.Signals(signum).name)
        printer.stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    status = 0
    LOGGER.debug("consuming %s as group %s from %s", args.topic, group, settings.kafka_bootstrap)
    try:
        consumer.subscribe([args.topic], on_assign=printer.on_assign, on_revoke=printer.on_revoke)
        printer.run()
    except KafkaException as error:
        LOGGER.error("Kafka error: %s", error)
        status = 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; offsets of printed records are kept.
        sys.stdout = open(os.devnull, "w")
    finally:
        commit_and_close(consumer)
        if not args.quiet:
            sys.stderr.write(printer.summary.line() + "\n")
    return status
