"""The bridge's pure logic, no broker: routes, poison detection, ack batching, metrics, CLI."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from bridge.__main__ import build_parser
from bridge.discovery import QueueDiscovery, count_active, select_queues
from bridge.options import PRIORITIES, BridgeOptions, share_priority
from bridge.metrics import BridgeStats, LatencyHistogram, StatsCollector, parse_samples
from bridge.delivery import (AckTracker, RouteCache, TemplateError, check_template, inspect_body,
                            message_headers, route_for)
from rabbitmq import naming
from rabbitmq.naming import NOT_JSON, NOT_OBJECT, TOO_LARGE
from common.config import Settings, load_settings


def test_route_carries_device_key_and_headers():
    route = route_for("webos.events", "webos.3DF92-192", "webos.3DF92-192.warning")
    assert route.topic == "webos.events"
    assert route.key == b"3DF92-192"
    assert dict(route.headers) == {"routing_key": b"webos.3DF92-192.warning",
                                   "mqtt_topic": b"webos/3DF92-192/warning",
                                   "device": b"3DF92-192", "type": b"warning",
                                   "queue": b"webos.3DF92-192"}


def test_mqtt5_properties_become_prefixed_headers_that_cannot_pose_as_the_bridges():
    amqp_headers = {"device": "spoof", "site": "hall 3", "x-reply-to-topic": "webos.A.reply",
                    "count": 3, "raw": b"\xff\x00"}

    headers = message_headers(amqp_headers, "application/json")

    assert headers == [("content_type", b"application/json"), ("user.device", b"spoof"),
                       ("user.site", b"hall 3"), ("user.x-reply-to-topic", b"webos.A.reply"),
                       ("user.count", b"3"), ("user.raw", b"\xff\x00")]
    route = RouteCache("webos.events").get("webos.A", "webos.A.info")
    assert not {name for name, _ in headers} & {name for name, _ in route.headers}
    assert message_headers(None, None) == []  # MQTT 3.1.1: nothing added


def test_route_template_placeholders():
    route = route_for("dev.{device}.{type}.{queue}.{routing_key}", "webos.D1", "webos.D1.error")
    assert route.topic == "dev.D1.error.webos.D1.webos.D1.error"


def test_broadcast_copy_is_keyed_by_the_queue_device():
    route = route_for("t", "webos.D1", "emergency")
    assert route.key == b"D1"
    assert dict(route.headers)["type"] == b"unknown"


@pytest.mark.parametrize("template", ["webos.{nope}", "webos.{device", "{0}", ""])
def test_bad_templates_are_refused(template):
    with pytest.raises(TemplateError):
        check_template(template)


def test_route_cache_is_bounded():
    cache = RouteCache("t", limit=3)
    for n in range(10):
        cache.get("webos.D1", f"webos.D1.t{n}")
    assert len(cache._routes) <= 3
    assert cache.get("webos.D1", "webos.D1.info") is cache.get("webos.D1", "webos.D1.info")


@pytest.mark.parametrize("body, reason", [
    (b"not json at all", NOT_JSON),
    (b"\xff\xfe\x00", NOT_JSON),
    (b"", NOT_JSON),
    (b"[1, 2]", NOT_OBJECT),
    (b"\"a string\"", NOT_OBJECT),
    (b"42", NOT_OBJECT),
    (b"null", NOT_OBJECT),
    (b"{" + b" " * 200 + b"}", TOO_LARGE),
    (b'{"a": 1} trailing', NOT_JSON),
    (b'{"a": 1}{"b": 2}', NOT_JSON),
    (b'{"a": ', NOT_JSON),
    (b'{"a": NaNa}', NOT_JSON),
    ('{"a": "é"}'.encode("latin-1"), NOT_JSON),
])
def test_poison_bodies_get_a_reason(body, reason):
    got, detail, _ = inspect_body(body, max_bytes=100)
    assert got == reason
    assert detail


@pytest.mark.parametrize("body, msg_id", [
    (json.dumps({"id": "D1", "msg_id": "abc", "seq": 1}).encode(), "abc"),
    (b'{"msg_id": 5}', ""),
    (b'  {"msg_id": "x"}\n', "x"),
    (b'{"msg_id": "x"}  \r\n', "x"),
    ('{"name": "é", "msg_id": "ü"}'.encode(), "ü"),
    (b"{}", ""),
])
def test_good_bodies_pass_with_their_msg_id(body, msg_id):
    assert inspect_body(body, 1000) == (None, None, msg_id)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=8),
       st.sampled_from(["", " ", "\n", "x"]))
def test_fast_path_agrees_with_json_loads(document, suffix):
    body = (json.dumps(document) + suffix).encode()
    try:
        expected_ok = isinstance(json.loads(body), dict)
    except ValueError:
        expected_ok = False
    assert (inspect_body(body, 10**6)[0] is None) == expected_ok


def test_acks_wait_for_the_oldest_unconfirmed_tag():
    tracker = AckTracker()
    for tag in range(1, 6):
        tracker.add(tag)
    tracker.confirm(2)
    tracker.confirm(3)
    assert tracker.take_ackable() == (0, 0)  # 1 is not confirmed: acking 3 with multiple would ack it
    tracker.confirm(1)
    assert tracker.take_ackable() == (3, 3)
    assert tracker.in_flight == 2
    tracker.confirm(5)
    assert tracker.take_ackable() == (0, 0)
    tracker.confirm(4)
    assert tracker.take_ackable() == (5, 2)
    assert tracker.in_flight == 0


def test_nacked_tags_are_skipped_not_acked():
    tracker = AckTracker()
    for tag in (1, 2, 3):
        tracker.add(tag)
    tracker.confirm(1)
    tracker.nacked(2)
    tracker.confirm(3)
    assert tracker.take_ackable() == (3, 2)
    assert tracker.in_flight == 0


def test_nack_at_the_end_acks_only_confirmed():
    tracker = AckTracker()
    for tag in (1, 2):
        tracker.add(tag)
    tracker.confirm(1)
    tracker.nacked(2)
    assert tracker.take_ackable() == (1, 1)
    assert tracker.in_flight == 0


def test_acks_wait_for_a_full_batch():
    tracker = AckTracker(batch=3, interval=10.0)
    for tag in range(1, 5):
        tracker.add(tag)
    tracker.confirm(1)
    tracker.confirm(2)
    assert tracker.ack_due(now=0.0) == (0, 0)
    assert tracker.in_flight == 4  # confirmed, but not acked yet
    tracker.confirm(3)
    assert tracker.ack_due(now=0.1) == (3, 3)
    assert tracker.in_flight == 1
    assert tracker.ack_due(now=0.2) == (0, 0)  # nothing new: no second ack of the same tags


def test_acks_wait_at_most_the_interval_from_the_oldest_confirmed_tag():
    tracker = AckTracker(batch=100, interval=0.02)
    for tag in range(1, 4):
        tracker.add(tag)
    tracker.confirm(1)
    assert tracker.ack_due(now=10.0) == (0, 0)
    tracker.confirm(2)
    assert tracker.ack_due(now=10.015) == (0, 0)  # a newer tag does not restart the clock
    assert tracker.ack_due(now=10.021) == (2, 2)
    tracker.confirm(3)
    assert tracker.ack_due(now=10.03) == (0, 0)  # the clock starts again with the next batch
    assert tracker.ack_due(now=10.05) == (3, 1)


def test_forced_ack_sends_what_is_confirmed_and_only_that():
    tracker = AckTracker(batch=100, interval=10.0)
    assert tracker.ack_due(now=0.0, force=True) == (0, 0)
    for tag in range(1, 5):
        tracker.add(tag)
    tracker.confirm(1)
    tracker.confirm(3)  # 2 is still with Kafka
    assert tracker.ack_due(now=0.0) == (0, 0)
    assert tracker.ack_due(now=0.0, force=True) == (1, 1)
    assert tracker.in_flight == 3


def test_a_nack_inside_a_batch_is_not_counted_as_acked():
    tracker = AckTracker(batch=100, interval=10.0)
    for tag in (1, 2, 3):
        tracker.add(tag)
    tracker.confirm(1)
    assert tracker.ack_due(now=0.0) == (0, 0)
    tracker.nacked(2)
    tracker.confirm(3)
    assert tracker.ack_due(now=0.0, force=True) == (3, 2)
    assert tracker.in_flight == 0


@given(st.permutations(range(1, 31)), st.lists(st.booleans(), min_size=30, max_size=30),
       st.lists(st.sampled_from([0.0, 0.005, 0.03]), min_size=30, max_size=30),
       st.integers(1, 8))
def test_batched_acks_ack_exactly_the_confirmed_tags(order, nacks, steps, batch):
    tracker = AckTracker(batch=batch, interval=0.02)
    unacked_on_broker = set(range(1, 31))
    for tag in sorted(unacked_on_broker):
        tracker.add(tag)
    confirmed, acked, now = set(), [], 0.0

    def send_ack(tag, count):  # what basic_ack(tag, multiple=True) does on the broker
        covered = {t for t in unacked_on_broker if t <= tag}
        assert covered <= confirmed and len(covered) == count and tag in covered
        unacked_on_broker.difference_update(covered)
        acked.extend(covered)

    for tag, nack, step in zip(order, nacks, steps):
        if nack:
            unacked_on_broker.discard(tag)  # the nack goes out at once
            tracker.nacked(tag)
        else:
            confirmed.add(tag)
            tracker.confirm(tag)
        now += step
        due = tracker.ack_due(now)
        if due != (0, 0):
            send_ack(*due)
    due = tracker.ack_due(now, force=True)
    if due != (0, 0):
        send_ack(*due)
    assert sorted(acked) == sorted(confirmed)
    assert unacked_on_broker == set() and tracker.in_flight == 0


def test_select_queues_keeps_device_queues_only():
    names = ["webos.D1", "webos.D2", "webos.dead", "webos.unrouted", "other", "webos.a.b"]
    assert select_queues(names, None) == {"webos.D1", "webos.D2"}
    assert select_queues(names, re.compile(r"D2$")) == {"webos.D2"}


def test_metrics_text_has_every_counter():
    stats = BridgeStats()
    stats.consumed, stats.produced, stats.acked, stats.in_flight = 5, 4, 3, 2
    stats.dead_lettered["not-json"] += 1
    stats.latency.observe(0.003)
    stats.latency.observe(0.5)
    registry = CollectorRegistry()
    registry.register(StatsCollector(stats))
    text = generate_latest(registry).decode()
    for line in ("webos_bridge_consumed_total 5.0", "webos_bridge_produced_total 4.0",
                 "webos_bridge_acked_total 3.0", "webos_bridge_refused_total 0.0",
                 'webos_bridge_dead_lettered_total{reason="not-json"} 1.0',
                 "webos_bridge_in_flight 2.0",
                 'webos_bridge_delivery_latency_seconds_bucket{le="0.005"} 1.0',
                 'webos_bridge_delivery_latency_seconds_bucket{le="+Inf"} 2.0',
                 "webos_bridge_delivery_latency_seconds_count 2.0"):
        assert line in text, line
    samples = parse_samples(text)  # what tests and benchmarks read the text back as
    assert (samples["webos_bridge_acked_total"], samples["webos_bridge_in_flight"]) == (3, 2)
    assert samples['webos_bridge_dead_lettered_total{reason="not-json"}'] == 1
    # the reasons nothing was parked for yet are there at 0, so the first one is an increase
    assert samples['webos_bridge_dead_lettered_total{reason="too-large"}'] == 0
    assert samples['webos_bridge_dead_lettered_total{reason="kafka-rejected"}'] == 0
    assert samples['webos_bridge_delivery_latency_seconds_bucket{le="+Inf"}'] == 2


def test_histogram_counts_a_value_on_a_bound_in_that_bucket():
    histogram = LatencyHistogram((0.1, 1.0))
    histogram.observe(0.1)
    histogram.observe(2.0)
    assert histogram.cumulative() == [("0.1", 1), ("1.0", 1), ("+Inf", 2)]


def test_flags_override_environment_defaults():
    settings = load_settings({"WEBOS_BRIDGE_PREFETCH": "77"}, dotenv_path=None,
                             kafka_topic="from.settings", bridge_metrics_port=9999,
                             bind_host="127.0.0.9")
    parser = build_parser(settings)
    args = parser.parse_args([])
    assert (args.prefetch, args.topic_template, args.metrics_port, args.metrics_host) == \
        (77, "from.settings", 9999, "127.0.0.9")
    args = parser.parse_args(["--prefetch", "5", "--queues", "webos.a, webos.b",
                              "--topic-template", "x.{device}", "--metrics-port", "0"])
    assert (args.prefetch, args.queues, args.topic_template, args.metrics_port) == \
        (5, ("webos.a", "webos.b"), "x.{device}", 0)


@pytest.mark.parametrize("argv", [
    ["--prefetch", "0"], ["--prefetch", "many"], ["--queue-pattern", "("],
    ["--topic-template", "t.{nope}"], ["--metrics-port", "70000"], ["--linger-ms", "-1"],
    ["--kafka-config", "novalue"], ["--queues", "webos.a", "--queue-pattern", "a"],
])
def test_bad_flags_exit_2_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser(Settings()).parse_args(argv)
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_share_priorities_spread_the_queues_evenly_and_stay_put_when_an_instance_joins():
    queues = [f"webos.D{n}" for n in range(3000)]

    def owners(instances):
        return {q: max(instances, key=lambda i: share_priority(i, q)) for q in queues}

    two = owners(["host:9108", "host:9109"])
    three = owners(["host:9108", "host:9109", "host:9110"])
    shares = Counter(three.values())
    assert all(800 <= count <= 1200 for count in shares.values()), shares
    # Rendezvous hashing: the newcomer takes queues from both; no queue moves between the old two.
    moved = [q for q in queues if two[q] != three[q]]
    assert all(three[q] == "host:9110" for q in moved)
    assert share_priority("host:9108", queues[0]) == share_priority("host:9108", queues[0])
    assert all(0 <= share_priority("x", q) < PRIORITIES for q in queues)


def test_an_instance_is_active_where_its_consumer_has_the_highest_priority():
    def consumer(instance, queue, priority):
        return {"consumer_tag": f"webos-bridge {instance} {queue}",
                "arguments": {"x-priority": priority}}
    listed = [consumer("a:1", "webos.D1", 10), consumer("b:2", "webos.D1", 20),
              consumer("a:1", "webos.D2", 30), consumer("b:2", "webos.D2", 5),
              consumer("a:1", "webos.D3", 1), {"consumer_tag": "amq.ctag-x", "arguments": {}}]
    assert count_active(listed, "webos-bridge a:1 ") == 2
    assert count_active(listed, "webos-bridge b:2 ") == 1
    # Classic queues (single node): the first consumer stays active, as the API flags it.
    flagged = [{**consumer("a:1", "webos.D1", 10), "active": True},
               {**consumer("b:2", "webos.D1", 20), "active": False}]
    assert count_active(flagged, "webos-bridge a:1 ", by_priority=False) == 1
    assert count_active(flagged, "webos-bridge b:2 ", by_priority=False) == 0


def test_queue_events_change_the_known_queues_and_win_over_a_listing_in_flight():
    discovery = QueueDiscovery(Settings(), re.compile(r"^webos\.K"))
    assert discovery.on_event("webos.K1", True) and discovery.queues == {"webos.K1"}
    assert not discovery.on_event("webos.K1", True)        # already known
    assert not discovery.on_event("webos.other", True)     # not matching the pattern
    assert not discovery.on_event("webos.dead", True)      # not a device queue

    class Listing:  # a listing that started before the events below and ends after them
        def get(self, url, params, timeout):
            discovery.on_event("webos.K3", True)
            discovery.on_event("webos.K1", False)
            return type("Answer", (), {"raise_for_status": lambda self: None,
                                       "json": lambda self: [{"name": "webos.K1"},
                                                             {"name": "webos.K2"}]})()
    discovery._list(Listing())
    assert discovery.queues == {"webos.K2", "webos.K3"}


def test_dead_listing_describes_bridge_parked_and_broker_dead_lettered_messages():
    import datetime as dt
    import io

    import pika

    from bridge.dead_letters import describe
    from bridge.dead_letters_cli import print_table

    parked = describe(pika.BasicProperties(timestamp=1796180000, headers={
        "x-webos-dead-reason": "not-json", "x-webos-dead-detail": "value is not JSON",
        "x-webos-queue": "webos.D1", "x-webos-routing-key": "webos.D1.info"}), b"\x00 junk")
    limit = describe(pika.BasicProperties(headers={
        "x-first-death-reason": b"delivery_limit", "x-first-death-queue": b"webos.D2",
        "x-death": [{"time": dt.datetime(2026, 12, 2, 6, 0, tzinfo=dt.timezone.utc),
                     "routing-keys": [b"webos.D2.error"]}]}), b"{}")
    assert parked == {"device": "D1", "queue": "webos.D1", "reason": "not-json",
                      "detail": "value is not JSON", "exchange": "", "routing_key": "webos.D1.info",
                      "redrives": 0, "history": [], "size": 6,
                      "parked_at": "2026-12-02T02:53:20+00:00"}
    assert (limit["device"], limit["reason"], limit["routing_key"], limit["parked_at"]) == \
        ("D2", "delivery_limit", "webos.D2.error", "2026-12-02T06:00:00+00:00")
    out = io.StringIO()
    print_table(5, [parked, limit], out)
    lines = out.getvalue().splitlines()
    assert lines[0] == "5 message(s) in webos.dead; the first 2:"
    assert lines[1].split() == ["PARKED_AT", "DEVICE", "REASON", "REDRIVES", "SIZE", "DETAIL"]
    assert "not-json" in lines[2] and "delivery_limit" in lines[3]


def test_a_redriven_message_leaves_its_parking_in_its_history_and_counts_up():
    import pika

    from bridge.dead_letters import describe, redriven_properties

    properties = pika.BasicProperties(content_type="application/json", timestamp=1796180000,
                                      headers={"x-webos-dead-reason": "too-large",
                                               "x-webos-dead-detail": "2 MB",
                                               "x-webos-queue": "webos.D1",
                                               "x-webos-routing-key": "webos.D1.info",
                                               "x-webos-exchange": "webos.topic",
                                               "x-first-death-reason": "delivery_limit",
                                               "unit": "celsius"})
    row = describe(properties, b"{}")
    first = redriven_properties(properties, row)
    assert first.headers["x-webos-redrives"] == 1
    assert first.headers["unit"] == "celsius" and first.content_type == "application/json"
    assert not any(name.startswith(("x-webos-dead-reason", "x-webos-queue", "x-first-death"))
                   for name in first.headers)
    # Parked again by the bridge (which keeps the headers it got), then redriven again.
    again = pika.BasicProperties(headers={**first.headers, "x-webos-dead-reason": "not-json",
                                          "x-webos-queue": "webos.D1",
                                          "x-webos-routing-key": "webos.D1.info"})
    second = redriven_properties(again, describe(again, b"{}"))
    assert second.headers["x-webos-redrives"] == 2
    assert [entry["reason"] for entry in json.loads(second.headers["x-webos-dead-history"])] == [
        "too-large", "not-json"]


def test_dead_selection_takes_any_of_the_reasons_and_any_of_the_devices():
    from bridge.dead_letters import Selection

    rows = [{"reason": reason, "device": device}
            for reason in ("not-json", "too-large") for device in ("D1", "D2")]
    chosen = Selection(frozenset({"too-large"}), frozenset({"D1", "D2"}))
    assert [row for row in rows if chosen.matches(row)] == rows[2:]
    assert all(Selection(everything=True).matches(row) for row in rows)
    assert [row["device"] for row in rows if Selection(devices=frozenset({"D2"})).matches(row)] \
        == ["D2", "D2"]
    assert str(chosen) == "reason too-large, device D1 or D2"


# Headers of connection events as RabbitMQ 4.0.5's event exchange sent them (trimmed).
MQTT_CONNECTED = {"client_properties": ['{client_id,longstr,<<"4HHC2-392">>}'],
                  "node": "webos@localhost", "protocol": "{'MQTT',{3,1,1}}", "ssl": True,
                  "timestamp_in_ms": 1796194853300, "user": "4HHC2-392", "vhost": "/"}


def test_a_device_mqtt_connection_event_becomes_a_presence_record():
    from bridge.presence import presence_record

    device, value = presence_record("connection.created", MQTT_CONNECTED)
    assert device == "4HHC2-392"
    assert json.loads(value) == {"type": "connected", "device": "4HHC2-392",
                                 "client_id": "4HHC2-392", "node": "webos@localhost",
                                 "ts": 1796194853300}
    closed = {**MQTT_CONNECTED, "reason": b"keepalive timeout"}
    assert json.loads(presence_record("connection.closed", closed)[1])["reason"] == \
        "keepalive timeout"


@pytest.mark.parametrize("event, headers", [
    ("connection.created", {**MQTT_CONNECTED, "protocol": "{0,9,1}", "user": "4HHC2-392"}),
    ("connection.created", {**MQTT_CONNECTED, "user": "webos-bridge"}),
    ("channel.created", MQTT_CONNECTED),
    ("connection.created", None),
])
def test_other_connections_are_not_presence(event, headers):
    from bridge.presence import presence_record

    assert presence_record(event, headers) is None


def test_shared_queue_names_are_no_device_ids():
    for name in ("dead", "unrouted", "presence"):
        assert not naming.is_valid_device_id(name)
        assert naming.device_of_queue(f"webos.{name}") is None


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's DefaultPartitioner, librdkafka's murmur2_random)."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) - len(data) % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i:i + 4], "little") * m & 0xFFFFFFFF
        k = (k ^ k >> 24) * m & 0xFFFFFFFF
        h = (h * m & 0xFFFFFFFF) ^ k
    tail = data[whole:]
    if tail:
        h = (h ^ int.from_bytes(tail, "little")) * m & 0xFFFFFFFF
    h = (h ^ h >> 13) * m & 0xFFFFFFFF
    return h ^ h >> 15


def murmur2_partition(key: str, partitions: int) -> int:
    """Where murmur2_random puts `key` among `partitions` (Java's toPositive, then modulo)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def test_murmur2_here_is_librdkafkas():
    from confluent_kafka import Producer

    options = BridgeOptions(linger_ms=0)
    config = {**options.producer_config(Settings()), "test.mock.num.brokers": 1, "log_level": 3}
    producer = Producer(config)
    keys = ["3DF92-192", "4HHC2-392"] + [f"device-{n}" for n in range(30)]
    partitions = {}
    for key in keys:
        producer.produce("webos.events", b"{}", key.encode(), on_delivery=lambda error, record:
                         partitions.__setitem__(record.key().decode(), record.partition()))
    assert producer.flush(10) == 0
    count = len(producer.list_topics("webos.events", timeout=5).topics["webos.events"].partitions)
    assert partitions == {key: murmur2_partition(key, count) for key in keys}


def test_the_default_devices_land_on_partitions_of_their_own():
    assert Settings().kafka_partitions == 6
    assert {murmur2_partition(device, 6) for device in ("3DF92-192", "4HHC2-392")} == {1, 4}


def test_kafka_config_flags_override_the_producer_defaults():
    options = BridgeOptions(kafka_config=(("partitioner", "consistent_random"),))
    assert BridgeOptions().producer_config(Settings())["partitioner"] == "murmur2_random"
    assert options.producer_config(Settings())["partitioner"] == "consistent_random"


def test_every_bridge_flag_with_a_setting_defaults_to_it():
    settings = load_settings({"WEBOS_BRIDGE_DISCOVERY_INTERVAL": "7",
                              "WEBOS_BRIDGE_FLUSH_TIMEOUT": "2.5"}, dotenv_path=None)
    args = build_parser(settings).parse_args([])
    assert (args.discovery_interval, args.flush_timeout) == (7.0, 2.5)
    assert (BridgeOptions().discovery_interval, BridgeOptions().flush_timeout) == \
        (Settings.bridge_discovery_interval, Settings.bridge_flush_timeout)


class FakeTime:
    """A clock that moves only when slept on or served: TurnPacer's clock, sleep and AMQP wait."""

    def __init__(self):
        self.now, self.slept, self.served = 100.0, [], []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds

    def serve(self, arrival_after: float):
        """An AMQP wait where the next delivery comes `arrival_after` s from now."""
        def wait(time_limit: float) -> None:
            self.served.append(time_limit)
            self.now += min(time_limit, arrival_after)
        return wait


def test_the_pacer_serves_the_first_delivery_at_once_when_nothing_is_in_flight():
    from bridge.pacing import IDLE_WAIT, TurnPacer

    fake = FakeTime()
    pacer = TurnPacer(clock=fake.clock, sleep=fake.sleep)
    pacer.wait(fake.serve(0.010), in_flight=False)
    assert fake.served == [IDLE_WAIT]  # a wait that the delivery ends, 10 ms in
    assert fake.slept == []
    assert fake.now == pytest.approx(100.010)


def test_the_pacer_takes_a_turn_per_beat_while_records_are_in_flight():
    """One message a millisecond: turns come every TURN_INTERVAL and take what arrived
    meanwhile, without waking for each."""
    from bridge.pacing import TURN_INTERVAL, TurnPacer

    fake = FakeTime()
    pacer = TurnPacer(clock=fake.clock, sleep=fake.sleep)
    pacer.wait(fake.serve(0.001), in_flight=False)
    turns = []
    for _ in range(3):
        pacer.took(backlog=False)
        pacer.wait(fake.serve(0.001), in_flight=True)
        turns.append(fake.now)
    assert fake.served[1:] == [0, 0, 0]  # takes what is there, waits for nothing more
    assert [b - a for a, b in zip(turns, turns[1:])] == pytest.approx([TURN_INTERVAL] * 2)


def test_the_pacer_does_not_pause_under_a_backlog():
    from bridge.pacing import TurnPacer

    fake = FakeTime()
    pacer = TurnPacer(clock=fake.clock, sleep=fake.sleep)
    pacer.wait(fake.serve(0.0), in_flight=False)
    pacer.took(backlog=True)
    pacer.wait(fake.serve(0.0), in_flight=True)
    assert fake.slept == []  # more waits in the socket: no pause
