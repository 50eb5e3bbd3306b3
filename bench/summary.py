"""The headline figures of one `make bench` run (issue 22's table), each read from that run's
results, None where the benchmark that measures it did not run or failed."""
from __future__ import annotations

# key: (what it is, the aim); the README's Performance section shows them against these.
AIMS = {
    "devices_5000_tls_on_time": ("share of messages within 100 ms of their schedule, 5,000 TLS devices", ">= 0.99"),
    "devices_10000_tls_acked_ratio": ("acked / offered msg/s, 10,000 TLS devices", ">= 0.99"),
    "devices_10000_tls_on_time": ("share on time, 10,000 TLS devices", ">= 0.95"),
    "devices_10000_tls_connect_s": ("s until 10,000 TLS devices are connected", "<= 30"),
    "rabbitmq_cpu_us_per_msg": ("RabbitMQ CPU µs per acked MQTT message, 5,000 TLS devices", "<= 100"),
    "rabbitmq_kib_per_tls_connection": ("RabbitMQ KiB per MQTT/TLS connection, 10,000 devices", "<= 40"),
    "publisher_cpu_us_per_msg": ("simulator CPU µs per message, 5,000 TLS devices", "<= 60"),
    "bridge_raw_pika_ratio": ("bridge / min(raw pika, raw producer) msg/s, median of rounds", ">= 0.9"),
    "bridge_cpu_us_per_msg_at_1000": ("bridge CPU µs per message at 1,000 msg/s", "<= 60"),
    "e2e_p99_ms_at_1000": ("MQTT -> Kafka p99 ms at 1,000 msg/s", "<= 20"),
}


def _scale_run(results: dict, devices: int) -> dict:
    runs = (results.get("publisher_scale") or {}).get("results", [])
    return next((r for r in runs if r.get("devices") == devices and r.get("transport") == "tls"), {})


def _latency_run(results: dict, rate: int) -> dict:
    runs = (results.get("e2e_latency") or {}).get("runs", [])
    return next((r for r in runs if r.get("rate_target") == rate), {})


def summary(results: dict) -> dict:
    """Every key of AIMS with this run's figure (None: not measured in this run)."""
    at_5000, at_10000 = _scale_run(results, 5000), _scale_run(results, 10000)
    at_1000 = _latency_run(results, 1000)
    acked, offered = at_10000.get("acked_per_s"), at_10000.get("expected_per_s")
    bridge_pct = ((at_1000.get("resources") or {}).get("bridge") or {}).get("cpu_mean_pct")
    achieved = at_1000.get("rate_achieved")
    return {
        "devices_5000_tls_on_time": at_5000.get("on_time_share"),
        "devices_10000_tls_acked_ratio": round(acked / offered, 3) if acked is not None and offered else None,
        "devices_10000_tls_on_time": at_10000.get("on_time_share"),
        "devices_10000_tls_connect_s": at_10000.get("connect_seconds"),
        "rabbitmq_cpu_us_per_msg": at_5000.get("rabbitmq_cpu_us_per_ack"),
        "rabbitmq_kib_per_tls_connection": at_10000.get("rabbitmq_memory_per_connection_kib"),
        "publisher_cpu_us_per_msg": at_5000.get("publisher_cpu_us_per_message"),
        "bridge_raw_pika_ratio": (results.get("bridge_throughput") or {}).get("ratio_of_medians"),
        "bridge_cpu_us_per_msg_at_1000": (round(bridge_pct / 100 / achieved * 1e6, 1)
                                          if bridge_pct is not None and achieved else None),
        "e2e_p99_ms_at_1000": at_1000.get("p99_ms"),
    }


def summary_rows(figures: dict) -> list[str]:
    """The summary as Markdown table rows: figure, this run, aim."""
    rows = ["| headline | key | this run | aim |", "| --- | --- | --- | --- |"]
    for key, (what, aim) in AIMS.items():
        value = figures.get(key)
        rows.append(f"| {what} | `{key}` | {'not measured' if value is None else value} | {aim} |")
    return rows
