"""The consumer's pure logic, no broker: decoding, filters, de-duplication, seq gaps, formats, fan-out."""
import io
import json
import logging

import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition

from consumer import cli
from consumer.kafka_group import PartitionLag, format_lag_table
from consumer.live_feed import Client, LiveFeed
from consumer.records import (DedupeWindow, Record, RecordFilter, SeqTracker, Summary,
                              format_json, format_pretty, type_from_headers)
from consumer.web import create_app
from common.config import Settings


def record(value, key="3DF92-192", headers=None, partition=0, offset=0) -> Record:
    if isinstance(value, dict):
        value = json.dumps(value).encode()
    return Record.build("webos.events", partition, offset, 1763800000123, key, headers or {}, value)


def payload(seq=1, status="Active", msg_id="m1", device="3DF92-192", **extra) -> dict:
    return {"Producer": device, "command": "position", "id": device, "x": 3, "y": 4,
            "status": status, "seq": seq, "msg_id": msg_id, "ts": 1763800000123, **extra}


@pytest.mark.parametrize("value", [b"", b"plain text", b"\xff\xfe\x00", b'{"open": ', b"{'single': 1}"])
def test_non_json_values_are_kept_raw(value):
    decoded = record(value)
    assert not decoded.is_json and decoded.payload is None
    line = json.loads(format_json(decoded))
    assert line["payload"] is None and line["error"] == "value is not JSON"
    assert line["raw"] == value.decode("utf-8", errors="replace")
    assert "non-JSON" in format_pretty(decoded)


@pytest.mark.parametrize("value, expected", [(b"42", 42), (b"[1, 2]", [1, 2]), (b'"text"', "text")])
def test_json_that_is_not_an_object_is_json_without_device_fields(value, expected):
    decoded = record(value)
    assert decoded.is_json and decoded.payload == expected
    assert decoded.seq is None and decoded.msg_id is None and decoded.status is None
    assert decoded.device == "3DF92-192"


@pytest.mark.parametrize("headers, expected", [
    ({"type": "warning", "routing_key": "webos.D.error"}, "warning"),
    ({"routing_key": "webos.D-1.error"}, "error"),
    ({"mqtt_topic": "webos/D/info"}, "info"),
    ({"routing_key": "not.a.webos.key"}, None),
    ({}, None),
])
def test_type_comes_from_type_header_else_routing_key(headers, expected):
    assert type_from_headers(headers) == expected


def test_device_and_msg_id_fall_back_to_headers_and_payload():
    assert record(payload(), key=None, headers={"device": "H"}).device == "H"
    assert record(payload(device="P"), key=None).device == "P"
    assert record(b"x", key=None, headers={"msg_id": "h1"}).msg_id == "h1"
    assert record(payload(msg_id="p1"), headers={"msg_id": "h1"}).msg_id == "p1"


@pytest.mark.parametrize("devices, types, key, headers, shown", [
    ((), (), "A", {}, True),
    (("A",), (), "A", {}, True),
    (("A",), (), "B", {}, False),
    (("A",), (), None, {"device": "A"}, True),
    (("A", "B"), (), "B", {}, True),
    ((), ("error",), "A", {"type": "error"}, True),
    ((), ("error",), "A", {"routing_key": "webos.A.error"}, True),
    ((), ("error",), "A", {"type": "info"}, False),
    ((), ("error",), "A", {}, False),
    (("A",), ("info",), "A", {"type": "error"}, False),
])
def test_filter(devices, types, key, headers, shown):
    assert RecordFilter.of(devices, types).matches(record(payload(), key=key, headers=headers)) is shown


def test_dedupe_window_drops_repeats_and_forgets_the_oldest():
    window = DedupeWindow(3)
    assert [window.seen(i) for i in ("a", "b", "a", "c", "d")] == [False, False, True, False, False]
    assert len(window) == 3
    # "a" was seen again after "b", so "b" is the oldest and was evicted by "d"
    assert window.seen("b") is False
    assert window.seen("d") is True


def test_dedupe_is_per_device_so_every_copy_of_a_broadcast_is_kept():
    printer = cli.StreamPrinter(None, io.StringIO(), RecordFilter.of(), output_format="json",
                                dedupe=DedupeWindow())
    copies = [record(payload(msg_id="b1", device=device), key=device)
              for device in ("3DF92-192", "4HHC2-392")]

    for each in [*copies, copies[0]]:
        printer.handle(each)

    assert (printer.summary.records, printer.summary.duplicates) == (2, 1)


def test_dedupe_window_must_hold_something():
    with pytest.raises(ValueError):
        DedupeWindow(0)


def test_seq_tracker_counts_gaps_missing_and_out_of_order_per_device():
    tracker = SeqTracker()
    notes = [tracker.observe(device, seq) for device, seq in
             [("A", 1), ("B", 7), ("A", 2), ("A", 5), ("B", 8), ("A", 5), ("A", 3), ("A", 6),
              ("A", None), (None, 3)]]
    assert notes == [None, None, None, "gap", None, "out-of-order", "out-of-order", None, None, None]
    assert (tracker.gaps, tracker.missing, tracker.out_of_order) == (1, 2, 2)


def test_summary_line_names_every_count():
    summary = Summary(records=3, duplicates=2, non_json=1, filtered=4)
    summary.per_device.update({"B": 1, "A": 2})
    summary.seq.observe("A", 1)
    summary.seq.observe("A", 4)
    assert summary.line() == ("consumer: 3 records (A: 2, B: 1), 2 duplicates dropped, "
                              "1 seq gaps (2 missing), 0 out of order, 1 non-JSON, 4 filtered out")


def test_pretty_line_is_plain_without_colour_and_coloured_with_it():
    decoded = record(payload(status="Inactive"), headers={"type": "error"}, partition=2, offset=17)
    plain = format_pretty(decoded)
    assert "\x1b[" not in plain
    for part in ("3DF92-192", "error", "p2@17", "seq=1", "(3, 4)", "Inactive", "position"):
        assert part in plain
    coloured = format_pretty(decoded, colour=True)
    assert "\x1b[90mInactive" in coloured and "\x1b[31merror" in coloured


def test_json_line_has_key_partition_offset_headers_and_payload():
    decoded = record(payload(), headers={"type": "info", "msg_id": "m1"}, partition=4, offset=9)
    assert json.loads(format_json(decoded)) == {
        "topic": "webos.events", "key": "3DF92-192", "partition": 4, "offset": 9,
        "timestamp": 1763800000123, "headers": {"type": "info", "msg_id": "m1"},
        "payload": payload()}


def test_partition_lag_counts_everything_retained_when_nothing_committed():
    assert PartitionLag(0, None, 5, 12).lag == 7
    assert PartitionLag(1, 10, 5, 12).lag == 2
    table = format_lag_table("g", "t", [PartitionLag(0, None, 5, 12), PartitionLag(1, 10, 5, 12)])
    assert table.splitlines()[-1].split() == ["total", "24", "9"]


@pytest.mark.parametrize("argv", [["--count", "0"], ["--timeout", "-1"], ["--timeout", "0"],
                                  ["--format", "xml"], ["--dedupe-window", "0"], ["--bogus"],
                                  ["--quiet", "--verbose"]])
def test_bad_arguments_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert "usage: python -m consumer" in capsys.readouterr().err


class AssigningConsumer:
    """What on_assign asks of a confluent Consumer: nothing committed, partitions 0-2 of 0..10."""

    def __init__(self):
        self.assigned = []

    def committed(self, partitions, timeout=None):
        return [TopicPartition(p.topic, p.partition, OFFSET_INVALID) for p in partitions]

    def get_watermark_offsets(self, partition, timeout=None):
        return 0, 10

    def assign(self, partitions):
        self.assigned = partitions

    def store_offsets(self, offsets):
        pass


@pytest.mark.parametrize("verbose", [False, True])
def test_joining_logs_one_line_and_the_partitions_only_with_verbose(verbose, caplog):
    cli.configure_logging(cli.build_parser().parse_args(["-v"] if verbose else []))
    printer = cli.StreamPrinter(AssigningConsumer(), io.StringIO(), RecordFilter.of([], []))
    try:
        with caplog.at_level(logging.INFO):  # the root's level, as in a run
            caplog.handler.setLevel(logging.DEBUG)  # only the loggers' own levels filter
            printer.on_assign(printer.consumer,
                              [TopicPartition("webos.events", p) for p in range(3)])
            printer.on_revoke(printer.consumer, [])
    finally:
        logging.getLogger("consumer").setLevel(logging.NOTSET)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert info == ["assigned 3 partitions of webos.events"]
    if verbose:
        assert debug[0] == "start offsets: webos.events[0]@10, webos.events[1]@10, webos.events[2]@10"
        assert debug[1] == "revoked 0 partitions"
    else:
        assert debug == []


def test_slow_client_is_closed_instead_of_blocking_the_feed():
    client = Client(max_queue=2)
    assert client.offer(("record", 1)) and client.offer(("record", 2))
    assert client.offer(("record", 3)) is False
    assert client.closed and client.events.get_nowait() is None


def test_feed_updates_device_state_and_fans_out_to_subscribers():
    feed = LiveFeed({"bootstrap.servers": "127.0.0.1:1"}, "webos.events", max_client_queue=10)
    first, snapshot = feed.subscribe()
    assert snapshot["devices"] == [] and snapshot["log"] == []
    feed.handle(record(payload(seq=1)))
    feed.handle(record(payload(seq=3, status="Inactive")))
    feed.handle(record(b"garbage", key="4HHC2-392"))

    events = [first.events.get_nowait() for _ in range(3)]
    assert [event for event, _ in events] == ["record"] * 3
    assert events[1][1]["device"]["status"] == "Inactive"
    assert events[1][1]["record"]["note"] == "seq gap"
    late, snapshot = feed.subscribe()
    devices = {device["id"]: device for device in snapshot["devices"]}
    assert devices["3DF92-192"]["status"] == "Inactive" and devices["3DF92-192"]["count"] == 2
    assert devices["4HHC2-392"]["status"] is None
    assert snapshot["totals"] == {"records": 3, "non_json": 1}
    assert snapshot["log"][-1]["raw"] == "garbage"
    assert late.events.empty()


def test_feed_shows_a_device_online_then_offline_from_its_presence_records():
    feed = LiveFeed({"bootstrap.servers": "127.0.0.1:1"}, "webos.events", max_client_queue=10,
                    presence_topic="webos.presence")
    page, _ = feed.subscribe()
    for kind, ts in (("connected", 1796194853300), ("disconnected", 1796194856354)):
        feed.handle_presence(record(json.dumps({"type": kind, "device": "3DF92-192", "ts": ts}).encode(),
                                    headers={"type": kind}))
    events = [page.events.get_nowait() for _ in range(2)]
    assert [(event, data["device"]["online"]) for event, data in events] == [
        ("presence", True), ("presence", False)]
    device = feed.snapshot()["devices"][0]
    assert (device["online"], device["online_since"]) == (False, 1796194856354)
    assert feed.snapshot()["totals"]["records"] == 0  # presence is not a device message


def test_pretty_presence_line_names_the_node_and_client_id():
    line = format_pretty(record(json.dumps({"type": "disconnected", "device": "3DF92-192",
                                            "client_id": "3DF92-192", "node": "webos@localhost",
                                            "ts": 1}).encode(), headers={"type": "disconnected"}))
    assert "3DF92-192" in line and "disconnected" in line
    assert "on webos@localhost (client id 3DF92-192)" in line


def test_live_view_metrics_give_each_device_its_last_message_activity_and_presence():
    from prometheus_client.parser import text_string_to_metric_families

    app = create_app({"SETTINGS": Settings(), "START_FEED": False, "KAFKA_TOPIC": "t1"})
    feed = app.extensions["live_feed"]
    feed.handle(record(payload(seq=1, status="Active")))
    feed.handle_presence(record(json.dumps({"type": "disconnected", "device": "3DF92-192",
                                            "ts": 5}).encode(), headers={"type": "disconnected"}))
    feed.lag = [{"partition": 0, "committed": 3, "low": 0, "high": 10, "lag": 7}]
    text = app.test_client().get("/metrics").get_data(as_text=True)
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    device = (("device", "3DF92-192"),)
    assert samples[("webos_device_last_message_timestamp_seconds", device)] == 1763800000.123
    assert samples[("webos_device_active", device)] == 1
    assert samples[("webos_device_online", device)] == 0
    assert samples[("webos_consumer_group_lag", (("group", "webos-live-view"), ("partition", "0"),
                                                 ("topic", "t1")))] == 7
    assert samples[("webos_consumer_records_total", ())] == 1


def test_app_serves_the_page_and_state_without_starting_kafka():
    app = create_app({"SETTINGS": Settings(), "START_FEED": False, "KAFKA_TOPIC": "t1"})
    client = app.test_client()
    page = client.get("/")
    assert page.status_code == 200
    assert b'<svg id="map"' in page.data and b"live.js" in page.data and b"t1" in page.data
    assert client.get("/static/live.js").status_code == 200
    assert client.get("/api/state").get_json()["topic"] == "t1"
    assert client.get("/healthz").status_code == 503


def test_the_favicon_is_served_and_the_page_points_to_it():
    client = create_app({"SETTINGS": Settings(), "START_FEED": False}).test_client()
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200
    assert icon.mimetype == "image/svg+xml" and icon.data.startswith(b"<svg")
    assert b'rel="icon" type="image/svg+xml" href="/favicon.ico"' in client.get("/").data
