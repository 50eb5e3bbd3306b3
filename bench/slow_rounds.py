"""Why an end-to-end round was slow: pure functions of what the round measured (its latencies,
when each message was sent, the sampled CPU of each process and Kafka's JVM, the bridge's
delivery histogram), unit-tested without brokers (tests/test_bench_unit.py). The round that
measures those is bench/e2e_latency.py's."""
from __future__ import annotations

import statistics

from prometheus_client.parser import text_string_to_metric_families

from bench.common import JVM_COUNTERS, SAMPLE_PERIOD

SLOW_MS = 20.0  # a message slower than this is slow; a round whose p99 is above it gets a cause
EPISODE_GAP = 0.5  # seconds without a slow message that end one burst of them
WARM_UP_SPAN = 2.0  # slow messages in the first seconds of a round point at warm-up
SATURATED = 90.0  # % of all cores busy: the machine had no CPU to spare


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """(upper bound in s, cumulative count) of the Prometheus histogram `name` in /metrics text."""
    return sorted((float(sample.labels["le"]), sample.value)
                  for family in text_string_to_metric_families(text) if family.name == name
                  for sample in family.samples if sample.name == name + "_bucket")


def histogram_quantile_ms(before: list[tuple[float, float]], after: list[tuple[float, float]],
                          share: float) -> float | None:
    """Upper bound (ms) of the bucket holding the `share` quantile of what one histogram counted
    between two readings; None when it counted nothing."""
    counted_before = dict(before)
    counts = [(bound, count - counted_before.get(bound, 0.0)) for bound, count in after]
    if not counts or counts[-1][1] <= 0:
        return None
    finite = [bound for bound, _ in counts if bound != float("inf")]
    for bound, running in counts:
        if running >= share * counts[-1][1]:
            return round(1000 * (bound if bound != float("inf") else finite[-1]), 1)
    return None


def slow_split(latency_ms: list[float], to_bridge_ms: list[float],
               slow_ms: float = SLOW_MS) -> dict:
    """Of the messages slower than `slow_ms`: how many, and how their time splits at the bridge's
    produce call (share before it; medians of each half)."""
    slow = [(total, min(max(before, 0.0), total))
            for total, before in zip(latency_ms, to_bridge_ms) if total > slow_ms]
    if not slow:
        return {"slow_messages": 0, "before_produce_share": None,
                "before_produce_ms_p50": None, "after_produce_ms_p50": None}
    return {"slow_messages": len(slow),
            "before_produce_share": round(sum(b for _, b in slow) / sum(t for t, _ in slow), 2),
            "before_produce_ms_p50": round(statistics.median(b for _, b in slow), 1),
            "after_produce_ms_p50": round(statistics.median(t - b for t, b in slow), 1)}


def bursts(offsets_s: list[float], gap_s: float = EPISODE_GAP) -> list[dict]:
    """Runs of send times (s into the round) less than `gap_s` apart: when slow messages came."""
    found: list[dict] = []
    for offset in sorted(offsets_s):
        if found and offset - found[-1]["end_s"] < gap_s:
            found[-1]["end_s"] = offset
            found[-1]["messages"] += 1
        else:
            found.append({"start_s": offset, "end_s": offset, "messages": 1})
    return [{**burst, "start_s": round(burst["start_s"], 3), "end_s": round(burst["end_s"], 3)}
            for burst in found]


def timing_pattern(offsets_s: list[float], window_s: float) -> str:
    """When in the round the slow messages were sent, in a few words."""
    if not offsets_s:
        return "no slow message"
    found = bursts(offsets_s)
    early = sum(offset < WARM_UP_SPAN for offset in offsets_s) / len(offsets_s)
    if early >= 0.8:
        return f"warm-up ({early:.0%} in the first {WARM_UP_SPAN:.0f} s)"
    covered = sum(burst["end_s"] - burst["start_s"] for burst in found)
    if covered >= 0.5 * window_s:
        return "throughout the round" + (f" ({len(found)} bursts)" if len(found) > 1 else "")
    if len(found) == 1:
        burst = found[0]
        return (f"one burst at {burst['start_s']:.1f} s "
                f"({1000 * (burst['end_s'] - burst['start_s']):.0f} ms of sends)")
    starts = [burst["start_s"] for burst in found]
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    mean = statistics.mean(intervals)
    if len(found) >= 3 and max(intervals) - min(intervals) <= 0.3 * mean:
        return f"periodic, every {mean:.1f} s ({len(found)} bursts)"
    if len(found) <= 4:
        return f"{len(found)} bursts, at {', '.join(f'{start:.1f}' for start in starts)} s"
    return f"spread over the round ({len(found)} bursts)"


def during(series: list[tuple[float, float]], found: list[dict],
           period: float = SAMPLE_PERIOD) -> list[float]:
    """The values of a sampled series ((end of interval s, value) points) whose interval overlaps
    a burst or the sample period after it (a message sent then waits into it)."""
    return [value for at, value in series
            if any(at - period <= burst["end_s"] + period and at >= burst["start_s"]
                   for burst in found)]


def diagnose(latency_ms: list[float], to_bridge_ms: list[float], offsets_s: list[float],
             window_s: float, series: dict[str, list[tuple[float, float]]],
             kafka_ack_p99_ms: float | None, slow_ms: float = SLOW_MS) -> dict:
    """Where, when and beside what the slow messages of one round went: the figures and a short
    `cause` string. `series`: sampled per process (% of one core), and `machine` (% of all cores
    busy), `others` (% of one core), `jvm_paused` and `jvm_compiling` (seconds per sample)."""
    split = slow_split(latency_ms, to_bridge_ms, slow_ms)
    slow_offsets = [offset for offset, total in zip(offsets_s, latency_ms) if total > slow_ms]
    found = bursts(slow_offsets)
    when = timing_pattern(slow_offsets, window_s)
    in_bursts = {name: during(points, found) for name, points in series.items()}
    cpu = {name: values for name, values in in_bursts.items()
           if values and not name.startswith("jvm_")}
    mean = {name: round(statistics.mean(values), 1) for name, values in cpu.items()}
    jvm_ms = {name: round(1000 * sum(in_bursts[f"jvm_{name}"]), 1)
              if in_bursts.get(f"jvm_{name}") else None for name in JVM_COUNTERS}
    figures = {**split, "slow_ms": slow_ms, "when": when, "bursts": found[:20],
               "bursts_total": len(found), "cpu_mean_in_bursts_pct": mean,
               "cpu_peak_in_bursts_pct": {name: max(values) for name, values in cpu.items()},
               "kafka_ack_p99_ms": kafka_ack_p99_ms,
               "kafka_jvm_paused_in_bursts_ms": jvm_ms["paused"],
               "kafka_jvm_compiling_in_bursts_ms": jvm_ms["compiling"]}
    if not split["slow_messages"]:
        return {**figures, "cause": None}
    share = split["before_produce_share"]
    if share >= 0.67:
        where = f"before the bridge's produce ({share:.0%}: paho, RabbitMQ, bridge consume)"
    elif share <= 0.33:
        if kafka_ack_p99_ms is not None and kafka_ack_p99_ms > slow_ms:
            where = f"after produce, Kafka's acks (p99 <= {kafka_ack_p99_ms:.0f} ms)"
        else:
            where = "after Kafka's ack (fetch, reader)" if kafka_ack_p99_ms is not None \
                else "after the bridge's produce"
    else:
        where = f"both halves ({share:.0%} before produce)"
    parts = [where, when]
    if "machine" in mean:
        busy = mean["machine"]
        others = f", other processes {mean['others']:.0f} % of a core" if "others" in mean else ""
        parts.append(f"machine {'saturated' if busy >= SATURATED else 'not saturated'} "
                     f"({busy:.0f} % busy{others})")
    if (jvm_ms["compiling"] or 0) >= 100:
        parts.append(f"Kafka's JIT compiler busy ({jvm_ms['compiling'] / 1000:.1f} s)")
    if (jvm_ms["paused"] or 0) >= 10:
        parts.append(f"Kafka's JVM paused {jvm_ms['paused']:.0f} ms")
    return {**figures, "cause": "; ".join(parts)}
