"""The benchmarks' arithmetic, without brokers: memory and CPU per connection and per message
(bench/publisher_scale.py), why an end-to-end round was slow (bench/slow_rounds.py), and the
summary table's new rows (bench/__main__.py)."""
from __future__ import annotations

import struct

import pytest

from bench import summary
from bench.__main__ import summary_table
from bench import common
from bench.common import jvm_seconds, parse_perfdata
from bench.slow_rounds import (bursts, diagnose, histogram_buckets, histogram_quantile_ms,
                               slow_split, timing_pattern)
from bench import publisher_scale
from bench.publisher_scale import cpu_us_per_message, memory_per_connection, raise_file_limit


def reading(rss: int | None, allocated: int, connection_other: int,
            connection_readers: int = 0, api: bool = True) -> dict:
    """A broker_memory reading: RSS from the OS, a breakdown shaped like RabbitMQ 4.0's
    GET /api/nodes/<node>/memory (or None, when the API did not answer)."""
    breakdown = {"connection_readers": connection_readers, "connection_writers": 0,
                 "connection_channels": 0, "connection_other": connection_other,
                 "queue_procs": 5_000_000, "binary": allocated // 2, "strategy": "rss",
                 "total": {"erlang": allocated, "rss": rss, "allocated": allocated}}
    return {"rss": rss, "breakdown": breakdown if api else None}


def test_memory_per_connection_divides_each_growth_by_the_connections():
    before = reading(rss=100 * 2**20, allocated=80 * 2**20, connection_other=100_000)
    after = reading(rss=130 * 2**20, allocated=4080 * 2**20, connection_other=3_172_000,
                    connection_readers=1_024_000)
    assert memory_per_connection(before, after, 1000) == {
        "rss_kib": 30.7, "connection_processes_kib": 4.0, "erlang_allocated_kib": 4096.0}


def test_memory_per_connection_keeps_the_rss_when_the_api_did_not_answer():
    before = reading(rss=100 * 2**20, allocated=1, connection_other=1)
    after = reading(rss=110 * 2**20, allocated=1, connection_other=1, api=False)
    assert memory_per_connection(before, after, 512) == {
        "rss_kib": 20.0, "connection_processes_kib": None, "erlang_allocated_kib": None}


@pytest.mark.parametrize("before, after, connections", [
    (reading(None, 1, 1, api=False), reading(2, 2, 2), 10),
    (reading(1, 1, 1), reading(None, 2, 2, api=False), 10),
    (reading(1, 1, 1), reading(2, 2, 2), 0),
], ids=["nothing-before", "nothing-after", "nobody-connected"])
def test_memory_per_connection_is_unknown_without_both_readings_or_connections(before, after,
                                                                                connections):
    assert set(memory_per_connection(before, after, connections).values()) == {None}


class FakeLimits:
    """resource.getrlimit/setrlimit for RLIMIT_NOFILE; a non-root process cannot raise `hard`."""

    RLIM_INFINITY = -1
    RLIMIT_NOFILE = 7

    def __init__(self, soft: int, hard: int, root: bool):
        self.limits, self.root = (soft, hard), root

    def getrlimit(self, which):
        return self.limits

    def setrlimit(self, which, limits):
        if limits[1] > self.limits[1] and not self.root:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


@pytest.mark.parametrize("soft, hard, root, needed, expected", [
    (1024, 4096, False, 2000, (2000, 4096)),     # within the hard limit
    (1024, 4096, False, 21024, (4096, 4096)),    # as far as the hard limit goes
    (1024, 4096, True, 21024, (21024, 21024)),   # root raises both
    (50000, 50000, False, 21024, (50000, 50000)),  # already enough: left alone
], ids=["soft", "capped-by-hard", "root", "enough"])
def test_raise_file_limit(monkeypatch, soft, hard, root, needed, expected):
    limits = FakeLimits(soft, hard, root)
    monkeypatch.setattr(publisher_scale, "resource", limits)
    assert raise_file_limit(needed) == expected[0]
    assert limits.limits == expected


def test_cpu_per_message_in_microseconds_and_none_without_messages():
    assert cpu_us_per_message(1.5, 30_000) == 50.0
    assert cpu_us_per_message(1.5, 0) is None


METRICS = """# HELP webos_bridge_delivery_latency_seconds produce -> delivery report
# TYPE webos_bridge_delivery_latency_seconds histogram
webos_bridge_delivery_latency_seconds_bucket{le="0.001"} %d
webos_bridge_delivery_latency_seconds_bucket{le="0.005"} %d
webos_bridge_delivery_latency_seconds_bucket{le="0.05"} %d
webos_bridge_delivery_latency_seconds_bucket{le="+Inf"} %d
webos_bridge_delivery_latency_seconds_count %d
webos_bridge_acked_total 5.0
"""


def test_histogram_quantile_counts_only_what_came_between_two_readings():
    name = "webos_bridge_delivery_latency_seconds"
    before = histogram_buckets(METRICS % (10, 10, 10, 10, 10), name)
    after = histogram_buckets(METRICS % (10, 990, 1000, 1000, 1000), name)
    assert after[0] == (0.001, 10.0) and after[-1] == (float("inf"), 1000.0)
    # 990 records between the readings: 980 within 5 ms, 10 within 50 ms.
    assert histogram_quantile_ms(before, after, 0.5) == 5.0
    assert histogram_quantile_ms(before, after, 0.999) == 50.0
    assert histogram_quantile_ms(after, after, 0.5) is None


def test_histogram_quantile_in_the_open_bucket_is_the_last_bound():
    after = [(0.01, 0.0), (0.1, 0.0), (float("inf"), 5.0)]
    assert histogram_quantile_ms([], after, 0.99) == 100.0


def test_slow_split_shares_the_slow_messages_time_at_the_produce_call():
    latency = [5.0, 30.0, 50.0, 100.0]
    before_produce = [1.0, 25.0, 45.0, 90.0]
    assert slow_split(latency, before_produce) == {
        "slow_messages": 3, "before_produce_share": 0.89, "before_produce_ms_p50": 45.0,
        "after_produce_ms_p50": 5.0}


def test_slow_split_clamps_the_millisecond_create_time():
    # CreateTime is whole ms: the half before it can come out below 0 or above the whole trip.
    assert slow_split([25.0, 25.0], [-0.4, 25.6])["before_produce_share"] == 0.5
    assert slow_split([1.0], [0.5])["slow_messages"] == 0


def test_bursts_group_send_times_closer_than_the_gap():
    assert bursts([3.0, 0.1, 0.2, 3.3, 9.0]) == [
        {"start_s": 0.1, "end_s": 0.2, "messages": 2},
        {"start_s": 3.0, "end_s": 3.3, "messages": 2},
        {"start_s": 9.0, "end_s": 9.0, "messages": 1}]


def spaced(*starts, count=20, step=0.005):
    """Send times of `count` slow messages from each start, one every `step` s."""
    return [start + i * step for start in starts for i in range(count)]


@pytest.mark.parametrize("offsets, expected", [
    ([], "no slow message"),
    (spaced(0.0, 1.2), "warm-up (100% in the first 2 s)"),
    (spaced(7.2), "one burst at 7.2 s (95 ms of sends)"),
    (spaced(1.0 + 2.5, 6.0, 8.5, 11.0), "periodic, every 2.5 s (4 bursts)"),
    (spaced(3.0, 4.0, 9.5), "3 bursts, at 3.0, 4.0, 9.5 s"),
    ([0.1 * i for i in range(1, 118)], "throughout the round"),
    ([0.7 * i for i in range(1, 18)], "periodic, every 0.7 s (17 bursts)"),
    (spaced(2.1, 3.0, 5.1, 6.0, 9.0, 11.8), "spread over the round (6 bursts)"),
], ids=["none", "warm-up", "one-burst", "periodic", "few-bursts", "throughout", "periodic-single",
        "spread"])
def test_timing_pattern_says_when_the_slow_messages_were_sent(offsets, expected):
    assert timing_pattern(offsets, window_s=12.0) == expected


def test_diagnose_blames_the_half_before_produce_on_a_saturated_machine():
    offsets = [i * 0.001 for i in range(12_000)]  # 12 s at 1,000 msg/s
    latency = [80.0 if 7.0 <= t < 7.2 else 4.0 for t in offsets]
    to_bridge = [70.0 if value > 20 else 1.0 for value in latency]
    # Samples at 7.0, 7.5 and 8.0 s overlap the burst (7.0-7.2 s) or the period after it.
    series = {"rabbitmq": [(6.5, 50.0), (7.0, 60.0), (7.5, 140.0), (8.0, 55.0), (8.5, 10.0)],
              "machine": [(6.5, 60.0), (7.0, 95.0), (7.5, 99.0), (8.0, 92.0), (8.5, 20.0)],
              "others": [(6.5, 10.0), (7.0, 40.0), (7.5, 45.0), (8.0, 50.0), (8.5, 0.0)],
              "jvm_paused": [(6.5, 0.0), (7.0, 0.0), (7.5, 0.002), (8.0, 0.0), (8.5, 0.5)]}
    result = diagnose(latency, to_bridge, offsets, 12.0, series, kafka_ack_p99_ms=5.0)
    assert result["slow_messages"] == 200
    assert result["cpu_mean_in_bursts_pct"] == {"rabbitmq": 85.0, "machine": 95.3, "others": 45.0}
    assert result["cpu_peak_in_bursts_pct"] == {"rabbitmq": 140.0, "machine": 99.0, "others": 50.0}
    assert result["kafka_jvm_paused_in_bursts_ms"] == 2.0
    assert result["cause"] == (
        "before the bridge's produce (88%: paho, RabbitMQ, bridge consume); one burst at 7.0 s "
        "(199 ms of sends); machine saturated (95 % busy, other processes 45 % of a core)")


def test_diagnose_names_kafka_acks_its_jit_compiler_and_pauses_after_produce():
    offsets = [i * 0.001 for i in range(12_000)]
    latency = [60.0 if 4.0 <= t < 4.05 else 4.0 for t in offsets]
    to_bridge = [2.0 if value > 20 else 1.0 for value in latency]
    series = {"machine": [(4.0, 40.0), (4.5, 44.0)], "jvm_paused": [(4.0, 0.0), (4.5, 0.05)],
              "jvm_compiling": [(4.0, 0.1), (4.5, 0.2)]}
    result = diagnose(latency, to_bridge, offsets, 12.0, series, kafka_ack_p99_ms=50.0)
    assert result["cause"] == ("after produce, Kafka's acks (p99 <= 50 ms); one burst at 4.0 s "
                               "(49 ms of sends); machine not saturated (42 % busy); "
                               "Kafka's JIT compiler busy (0.3 s); Kafka's JVM paused 50 ms")
    assert (result["kafka_jvm_paused_in_bursts_ms"], result["kafka_jvm_compiling_in_bursts_ms"]) \
        == (50.0, 300.0)


@pytest.mark.parametrize("kafka_ack_p99_ms, where", [
    (5.0, "after Kafka's ack (fetch, reader)"),
    (None, "after the bridge's produce"),
], ids=["acks-fast", "acks-unknown"])
def test_diagnose_after_produce_without_slow_acks(kafka_ack_p99_ms, where):
    result = diagnose([40.0] * 10, [1.0] * 10, [5.0 + i * 0.01 for i in range(10)], 12.0, {},
                      kafka_ack_p99_ms)
    assert result["cause"] == f"{where}; one burst at 5.0 s (90 ms of sends)"


def test_diagnose_has_no_cause_without_slow_messages():
    result = diagnose([3.0, 4.0], [1.0, 1.0], [0.0, 0.001], 12.0, {}, None)
    assert result["cause"] is None and result["slow_messages"] == 0


def perfdata(counters: dict[str, int], little_endian: bool = True) -> bytes:
    """A HotSpot hsperfdata file holding `counters` as scalar longs (and one string entry)."""
    order = "<" if little_endian else ">"
    entries = b""
    items = [*counters.items(), ("java.property.java.version", None)]
    for name, value in items:
        raw_name = name.encode() + b"\0"
        name_at = 20
        data_at = (name_at + len(raw_name) + 7) // 8 * 8
        if value is None:  # a byte vector, skipped by the parser
            data, data_type, vector_length = b"17\0\0\0\0\0\0", ord("B"), 8
        else:
            data, data_type, vector_length = struct.pack(order + "q", value), ord("J"), 0
        length = data_at + len(data)
        header = struct.pack(order + "iiibbbbi", length, name_at, vector_length, data_type, 0, 0,
                             0, data_at)
        entries += (header + raw_name).ljust(data_at, b"\0") + data
    prologue = (b"\xca\xfe\xc0\xc0" + bytes([1 if little_endian else 0, 2, 0, 1])
                + struct.pack(order + "iiqii", 32 + len(entries), 0, 0, 32, len(items)))
    return prologue + entries


@pytest.mark.parametrize("little_endian", [True, False], ids=["little-endian", "big-endian"])
def test_parse_perfdata_reads_the_scalar_counters(little_endian):
    data = perfdata({"sun.rt.safepointTime": 3_000_000, "sun.os.hrt.frequency": 1_000_000_000},
                    little_endian)
    assert parse_perfdata(data) == {"sun.rt.safepointTime": 3_000_000,
                                    "sun.os.hrt.frequency": 1_000_000_000}


class FakeJvm:
    """What jvm_seconds asks of a psutil.Process."""

    pid = 4242

    def username(self) -> str:
        return "kafka"


def test_jvm_seconds_sums_pauses_and_compile_time_from_the_hsperfdata_file(tmp_path, monkeypatch):
    folder = tmp_path / "hsperfdata_kafka"
    folder.mkdir()
    (folder / "4242").write_bytes(perfdata({
        "sun.rt.safepointTime": 250_000_000, "sun.ci.standardTime": 3_000_000_000,
        "sun.ci.osrTime": 500_000_000, "sun.os.hrt.frequency": 1_000_000_000}))
    monkeypatch.setattr(common.tempfile, "gettempdir", lambda: str(tmp_path))
    assert jvm_seconds(FakeJvm()) == {"paused": 0.25, "compiling": 3.5}
    (folder / "4242").write_bytes(perfdata({"sun.os.hrt.frequency": 1_000_000_000}))
    assert jvm_seconds(FakeJvm()) is None  # another JVM's counter names: not measured
    assert jvm_seconds(None) is None


def test_parse_perfdata_refuses_another_file():
    with pytest.raises(ValueError):
        parse_perfdata(b"not a perf data file at all, no" + b"\0" * 8)


def test_summary_table_shows_the_new_figures():
    scale = {"devices": 5000, "on_time_share": 0.9912, "cpu_percent_of_one_core": 50.0,
             "rss_mib_added": 170.0, "connected": 5000, "connect_seconds": 14.2,
             "acked_per_s": 3301.0, "expected_per_s": 3333.3, "rabbitmq_cpu_us_per_ack": 310.5,
             "publisher_cpu_us_per_message": 150.2, "rabbitmq_memory_per_connection_kib": 30.1,
             "rabbitmq_connection_processes_per_connection_kib": 3.0}
    rounds = [{"p50_ms": 4.3, "p99_ms": 12.7, "max_ms": 50.0, "cause": None},
              {"p50_ms": 4.3, "p99_ms": 132.0, "max_ms": 180.0, "cause": "warm-up"}]
    e2e = {"rate_target": 1000, "rate_achieved": 1000, "p50_ms": 4.3, "p99_ms": 72.35,
           "max_ms": 180.0, "runs": rounds}
    rows = summary_table({"publisher_scale": {"results": [scale]}, "e2e_latency": {"runs": [e2e]}})
    assert "| end to end | 1000 msg/s, round 1/2: p50 / p99 / max ms | 4.3 / 12.7 / 50.0 |" in rows
    assert ("| end to end | 1000 msg/s, round 2/2: p50 / p99 / max ms | 4.3 / 132.0 / 180.0; "
            "p99 over 20 ms: warm-up |") in rows
    assert ("| publisher scale | 5000 devices: on time (within 100 ms), CPU % of a core, RSS added "
            "MiB | 99.1%, 50.0, 170.0 |") in rows
    assert ("| publisher scale | 5000 devices: CPU µs per message, RabbitMQ per ack / publisher "
            "per message | 310.5 / 150.2 |") in rows
    assert ("| publisher scale | 5000 devices: RabbitMQ memory per MQTT connection, KiB (RSS; "
            "connection processes) | 30.1; 3.0 |") in rows
    assert ("| publisher scale | 5000 devices: connected (s to connect), msg/s acked of expected | "
            "5000 (14.2 s), 3301.0 of 3333.3 |") in rows


def test_the_summary_reads_each_headline_figure_from_its_benchmark_and_none_where_it_did_not_run():
    results = {
        "publisher_scale": {"results": [
            {"devices": 5000, "transport": "tls", "on_time_share": 0.663, "rabbitmq_cpu_us_per_ack": 399,
             "publisher_cpu_us_per_message": 186},
            {"devices": 5000, "transport": "plain", "on_time_share": 0.924},
            {"devices": 10000, "transport": "tls", "on_time_share": 0.708, "acked_per_s": 2707,
             "expected_per_s": 6666.7, "connect_seconds": 42.1,
             "rabbitmq_memory_per_connection_kib": 69}]},
        "bridge_throughput": {"ratio": 0.83, "ratio_of_medians": 0.81},
        "e2e_latency": {"runs": [
            {"rate_target": 100, "rate_achieved": 100, "p99_ms": 9.0},
            {"rate_target": 1000, "rate_achieved": 1000, "p99_ms": 12.7,
             "resources": {"bridge": {"cpu_mean_pct": 29.0}}}]},
    }
    figures = summary.summary(results)
    assert set(figures) == set(summary.AIMS)
    assert figures == {
        "devices_5000_tls_on_time": 0.663, "devices_10000_tls_acked_ratio": 0.406,
        "devices_10000_tls_on_time": 0.708, "devices_10000_tls_connect_s": 42.1,
        "rabbitmq_cpu_us_per_msg": 399, "rabbitmq_kib_per_tls_connection": 69,
        "publisher_cpu_us_per_msg": 186, "bridge_raw_pika_ratio": 0.81,
        "bridge_cpu_us_per_msg_at_1000": 290.0, "e2e_p99_ms_at_1000": 12.7}
    assert set(summary.summary({"bridge_throughput": {"error": "boom"}}).values()) == {None}


def test_context_switches_counts_every_thread_of_a_process():
    """bench.broker_cpu's wake-up count: a thread that sleeps repeatedly adds its switches."""
    import threading
    import time

    import psutil

    from bench.broker_cpu import context_switches

    me, slept, done = psutil.Process(), threading.Event(), threading.Event()

    def sleeper():
        for _ in range(50):
            time.sleep(0.001)  # each sleep gives the CPU up once at least
        slept.set()
        done.wait(10)  # alive while counted: an ended thread leaves /proc/<pid>/task

    before = context_switches(me)
    thread = threading.Thread(target=sleeper)
    thread.start()
    try:
        assert slept.wait(10)
        assert context_switches(me) - before >= 50
    finally:
        done.set()
        thread.join()


def test_thread_times_gives_each_thread_its_own_cpu():
    """bench.bridge_cpu's split by thread: a thread that computes is charged its CPU, by id, and
    a thread that waits meanwhile is not."""
    import os
    import threading
    import time

    from bench.common import thread_times

    me, ids, done = threading.get_native_id(), [], threading.Event()

    def spin():
        ids.append(threading.get_native_id())
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass  # CPU, not sleep: what thread_times must see
        done.wait(10)  # alive while read: an ended thread leaves /proc/<pid>/task

    before = thread_times(os.getpid())
    thread = threading.Thread(target=spin)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not ids or thread_times(os.getpid())[ids[0]][1] < 0.2:  # ticks: not exact
            assert time.monotonic() < deadline, "the spinning thread was never charged 0.2 s"
            time.sleep(0.05)  # polling the spinning thread's count
        after = thread_times(os.getpid())
        assert after[me][1] - before[me][1] < 0.15
    finally:
        done.set()
        thread.join()
