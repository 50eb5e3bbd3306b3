"""Bridge throughput against its two baselines, and its peak RSS.

1. baseline A: a bare pika consumer draining a pre-filled queue with batched acks (no Kafka);
2. baseline B: a bare confluent-kafka producer writing the same payloads (no RabbitMQ);
3. the bridge (`python -m bridge`, default settings) draining the same pre-filled queue into Kafka.
WEBOS_BENCH_MESSAGES (default 200000) sets the queue size, WEBOS_BENCH_ROUNDS (default 3) how
often the three run. Latency through the bridge is bench/e2e_latency.py's.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import pika
import psutil
import requests
from confluent_kafka import Producer

from bench.common import metric, pyplot, repo_path, save_figure, start_bridge, write_figures
from bridge.options import BridgeOptions
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from common.config import Settings

DEFAULT_MESSAGES = 200_000
COMMAND = ".venv/bin/python -m bench bridge_throughput  (WEBOS_BENCH_MESSAGES, WEBOS_BENCH_ROUNDS " \
          "to change sizes)"


def _say(text: str) -> None:
    print(f"[bridge_throughput] {text}", flush=True)


BENCH_DEVICE = "BENCH0-000000"  # the device the payloads name: the same bytes in every run


def payloads(count: int, device: str = BENCH_DEVICE) -> list[bytes]:
    """Device-like JSON bodies as DESIGN.md describes them; the same bytes on every call, so
    baseline A, baseline B and the bridge handle identical payloads."""
    start = 1_767_225_600_000  # a fixed ts (ms) keeps every body the same length run to run
    return [json.dumps({"Producer": device, "command": "position", "id": device,
                        "x": seq % 97, "y": seq % 89, "status": "Active", "seq": seq,
                        "msg_id": uuid.UUID(int=seq).hex, "ts": start + seq}).encode()
            for seq in range(count)]


def broker_processes(settings: Settings) -> list[psutil.Process]:
    """The RabbitMQ and Kafka processes listening on the ports in `settings`."""
    ports = {settings.amqp_port, int(settings.kafka_bootstrap.rsplit(":", 1)[1])}
    pids = {conn.pid for conn in psutil.net_connections(kind="tcp")
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port in ports
            and conn.pid}
    return [psutil.Process(pid) for pid in sorted(pids)]


def cpu_seconds(processes) -> dict[str, float]:
    """User plus system CPU seconds used so far by each of `processes`, by name (beam.smp is
    RabbitMQ, java is Kafka), and their "total"; gone ones count 0."""
    seconds = {"total": 0.0}
    for process in processes:
        try:
            times = process.cpu_times()
            name = process.name()
        except psutil.Error:
            continue
        seconds[name] = seconds.get(name, 0.0) + times.user + times.system
        seconds["total"] += times.user + times.system
    return seconds


def _per_message(after: dict, before: dict, count: float) -> dict:
    """CPU microseconds per message of each broker between two cpu_seconds() readings."""
    return {name: round((after[name] - before.get(name, 0.0)) / count * 1e6, 1) for name in after}


def fill_queue(settings: Settings, device: str, bodies: list[bytes]) -> None:
    """Publish `bodies` as persistent messages for `device` as admin; wait until RabbitMQ has them."""
    started = time.monotonic()
    count = len(bodies)
    with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
        channel = connection.channel()
        queue = topology.declare_device(channel, device, settings.cluster)
        key = naming.routing_key(device, "info")
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for n, body in enumerate(bodies, 1):
            channel.basic_publish(naming.TOPIC_EXCHANGE, key, body, properties)
            if n % 20_000 == 0:
                connection.process_data_events(0)
                _say(f"  published {n}/{count}")
        while channel.queue_declare(queue, passive=True).method.message_count < count:
            connection.process_data_events(0.2)
    _say(f"  {queue} holds {count} messages ({time.monotonic() - started:.1f} s to fill)")


def baseline_pika(settings: Settings, device: str, count: int, prefetch: int) -> dict:
    """Baseline A: drain the queue with a bare pika consumer, one multiple-ack per batch.

    Same connection parameters as the bridge's, one window for the channel (global qos), and
    the bridge's collector settings (the bench's own start-up objects frozen out of it)."""
    brokers = broker_processes(settings)
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, *threshold[1:])
    try:
        return _drain_with_pika(settings, device, count, prefetch, brokers)
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _drain_with_pika(settings: Settings, device: str, count: int, prefetch: int,
                     brokers: list) -> dict:
    queue = naming.device_queue(device)
    state = {"n": 0, "last": 0, "first": None}

    def on_message(channel, method, properties, body):
        if state["first"] is None:
            state["first"] = time.perf_counter()
        state["n"] += 1
        state["last"] = method.delivery_tag

    with pika.BlockingConnection(endpoints.amqp_parameters(
            settings, settings.bridge_user, settings.bridge_password,
            heartbeat=30, blocked_connection_timeout=60)) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=prefetch, global_qos=True)
        channel.basic_consume(queue, on_message, auto_ack=False)
        acked = 0
        cpu_first = None
        while acked < count:
            connection.process_data_events(time_limit=0.001)
            if state["last"] > acked:
                if cpu_first is None:
                    cpu_first = time.process_time()
                    broker_first = cpu_seconds(brokers)
                channel.basic_ack(state["last"], multiple=True)
                acked = state["last"]
        elapsed = time.perf_counter() - state["first"]
        cpu = time.process_time() - cpu_first
        broker_cpu = _per_message(cpu_seconds(brokers), broker_first, count)
    return {"msgs_per_s": count / elapsed, "cpu_us_per_msg": round(cpu / count * 1e6, 1),
            **_split(broker_cpu)}


def baseline_kafka(settings: Settings, device: str, bodies: list[bytes],
                   options: BridgeOptions) -> dict:
    """Baseline B: a bare producer (the bridge's producer settings) writing the same records the
    bridge writes: same payloads, key and six headers."""
    count = len(bodies)
    queue = naming.device_queue(device)
    key = naming.routing_key(device, "info")
    fixed = [("routing_key", key), ("mqtt_topic", key.replace(".", "/")), ("device", device),
             ("type", "info"), ("queue", queue)]
    msg_ids = [json.loads(body)["msg_id"] for body in bodies]
    producer = Producer(options.producer_config(settings))
    producer.list_topics(timeout=10)
    delivered = [0]

    def on_delivery(error, record):
        if error is None:
            delivered[0] += 1

    key = device.encode()
    brokers = broker_processes(settings)
    started = time.perf_counter()
    cpu_started = psutil.Process().cpu_times()
    broker_started = cpu_seconds(brokers)
    for body, msg_id in zip(bodies, msg_ids):
        while True:
            try:
                producer.produce(settings.kafka_topic, body, key,
                                 headers=[*fixed, ("msg_id", msg_id)], on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    cpu = psutil.Process().cpu_times()
    broker_cpu = _per_message(cpu_seconds(brokers), broker_started, count)
    if delivered[0] != count:
        raise RuntimeError(f"baseline B: only {delivered[0]} of {count} records confirmed")
    used = cpu.user + cpu.system - cpu_started.user - cpu_started.system
    return {"msgs_per_s": count / elapsed, "cpu_us_per_msg": round(used / count * 1e6, 1),
            **_split(broker_cpu)}


def bridge_drain(settings: Settings, device: str, count: int, log_path: Path) -> dict:
    """The bridge draining the pre-filled queue: msgs/s between first and last ack, peak RSS."""
    bridge, url = start_bridge(settings, [naming.device_queue(device)], log_path)
    rss = psutil.Process(bridge.pid)
    brokers = broker_processes(settings)
    peak = 0
    first = None
    last = None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            peak = max(peak, rss.memory_info().rss)
            bridge.check_running()
            try:
                acked = metric(requests.get(url + "/metrics", timeout=2).text,
                                "webos_bridge_acked_total")
            except requests.RequestException:
                acked = 0
            now = time.perf_counter()
            if acked and first is None:
                first = (now, acked)
                cpu_first = rss.cpu_times()
                broker_first = cpu_seconds(brokers)
            if acked >= count:
                last = (now, acked)
                cpu = rss.cpu_times()
                broker_cpu = cpu_seconds(brokers)
                text = requests.get(url + "/metrics", timeout=2).text
                latency_sum = metric(text, "webos_bridge_delivery_latency_seconds_sum")
                latency_count = metric(text, "webos_bridge_delivery_latency_seconds_count")
                break
            time.sleep(0.05)  # sampling period of the RSS and counters, not a wait for an event
        if last is None:
            raise RuntimeError(f"the bridge acked {acked} of {count} in time; see {log_path}")
    finally:
        code = bridge.stop(60)
    if last[1] == first[1]:
        # Everything was acked before the first sample: nothing between two readings to time.
        raise RuntimeError(f"the bridge acked all {count} messages within one 50 ms sample: too "
                           "few to time, raise WEBOS_BENCH_MESSAGES (default 200,000)")
    rate = (last[1] - first[1]) / (last[0] - first[0])
    return {"msgs_per_s": rate, "peak_rss_mb": peak / 2**20, "exit_code": code,
            "cpu_us_per_msg": round((cpu.user + cpu.system - cpu_first.user - cpu_first.system)
                                    / (last[1] - first[1]) * 1e6, 1),
            **_split(_per_message(broker_cpu, broker_first, last[1] - first[1])),
            "kafka_ack_mean_ms": round(latency_sum / max(latency_count, 1) * 1000, 2)}


def _split(per_message: dict) -> dict:
    """Broker CPU per message: the total, and each broker's."""
    return {"broker_cpu_us_per_msg": per_message.pop("total"), "broker_cpu_us": per_message}


def plot(result: dict, path: Path) -> None:
    """Throughput bars and CPU per message in one PNG."""
    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["A: bare pika\nconsumer", "B: bare Kafka\nproducer", "bridge"]
    values = [result["baseline_a_msgs_per_s"], result["baseline_b_msgs_per_s"],
              result["bridge_msgs_per_s"]]
    bars = left.bar(names, values, color=["#8aa", "#aa8", "#48c"])
    left.bar_label(bars, labels=[f"{v:,.0f}" for v in values])
    left.set_ylabel("messages / s")
    left.set_title(f"{result['messages']:,} messages, best of {result['rounds']}: "
                   f"bridge / min(A, B) = {result['ratio']:.2f} "
                   f"(medians {result['ratio_of_medians']:.2f})", fontsize=10)
    # CPU per message, medians: what each costs the machine (client process, then both brokers).
    keys = ["baseline_a", "baseline_b", "bridge"]
    client = [result[key]["cpu_us_per_msg"]["median"] for key in keys]
    brokers = [result[key]["broker_cpu_us_per_msg"]["median"] for key in keys]
    right.bar(names, client, color="#48c", label="client process")
    right.bar(names, brokers, bottom=client, color="#aaa", label="RabbitMQ + Kafka")
    right.set_ylabel("CPU µs per message (median)")
    right.set_title("CPU per message", fontsize=10)
    right.legend()
    save_figure(figure, path)


def _summary(runs: list[dict]) -> dict:
    """Best, median and every value of each figure over the rounds of one contender."""
    out = {}
    for figure, best in (("msgs_per_s", max), ("cpu_us_per_msg", min),
                         ("broker_cpu_us_per_msg", min)):
        values = [run_[figure] for run_ in runs]
        out[figure] = {"best": round(best(values), 1), "median": round(statistics.median(values), 1),
                       "all": [round(value, 1) for value in values]}
    return out


def run(settings: Settings, out_dir) -> dict:
    """All three throughput runs, WEBOS_BENCH_ROUNDS rounds (default 3) of A, B and the bridge
    on the same payloads, because other work on the machine makes single runs noisy; a PNG plot
    in out_dir.

    Ratios are given best-of-N and median-of-N. CPU per message is steadier than msg/s on a
    loaded machine: the bridge's process CPU (its thread and librdkafka's) and the two brokers'
    CPU per message are reported for each contender; `cpu_ratio` = total CPU per message of A
    over that of the bridge (what msg/s would give on a machine the three fully share).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = int(os.environ.get("WEBOS_BENCH_MESSAGES", DEFAULT_MESSAGES))
    rounds = int(os.environ.get("WEBOS_BENCH_ROUNDS", 3))
    options = BridgeOptions()
    log_path = Path(tempfile.mkdtemp(prefix="webos-bench-bridge-")) / "bridge.log"
    _say(f"bridge output goes to {log_path}")
    result = {"messages": count, "rounds": rounds, "prefetch": options.prefetch,
              "linger_ms": options.linger_ms, "batch_size": options.batch_size,
              "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
              "load_average_per_round": []}
    bodies = payloads(count)
    runs = {"a": [], "b": [], "bridge": []}
    devices = [f"BENCH{n}-{uuid.uuid4().hex[:6]}" for n in range(2 * rounds)]
    topology.declare_devices(settings, devices)
    try:
        for round_ in range(rounds):
            result["load_average_per_round"].append([round(x, 1) for x in os.getloadavg()])
            queue_a, queue_bridge = devices[2 * round_], devices[2 * round_ + 1]
            _say(f"round {round_ + 1}/{rounds} (load average {os.getloadavg()[0]:.1f}): "
                 f"baseline A, bare pika consumer, {count} messages")
            fill_queue(settings, queue_a, bodies)
            runs["a"].append(baseline_pika(settings, queue_a, count, options.prefetch))
            _say(f"  {runs['a'][-1]}")
            _say(f"round {round_ + 1}/{rounds}: baseline B, bare confluent-kafka producer")
            runs["b"].append(baseline_kafka(settings, queue_bridge, bodies, options))
            _say(f"  {runs['b'][-1]}")
            _say(f"round {round_ + 1}/{rounds}: python -m bridge with its defaults")
            fill_queue(settings, queue_bridge, bodies)
            runs["bridge"].append(bridge_drain(settings, queue_bridge, count, log_path))
            _say(f"  {runs['bridge'][-1]}")
        result["load_average_at_end"] = [round(x, 1) for x in os.getloadavg()]
    finally:
        with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
            channel = connection.channel()
            for device in devices:
                topology.delete_device(channel, device)
    for name, key in (("a", "baseline_a"), ("b", "baseline_b"), ("bridge", "bridge")):
        summary = _summary(runs[name])
        result[key] = summary
        result[f"{key}_msgs_per_s"] = round(summary["msgs_per_s"]["best"])
    best = {name: result[key]["msgs_per_s"]["best"] for name, key in
            (("a", "baseline_a"), ("b", "baseline_b"), ("bridge", "bridge"))}
    medians = {name: result[key]["msgs_per_s"]["median"] for name, key in
               (("a", "baseline_a"), ("b", "baseline_b"), ("bridge", "bridge"))}
    result["ratio"] = round(best["bridge"] / min(best["a"], best["b"]), 3)
    result["ratio_of_medians"] = round(medians["bridge"] / min(medians["a"], medians["b"]), 3)
    # Each round's own ratio: A, B and the bridge of one round ran minutes apart, under
    # about the same load.
    result["ratio_per_round"] = [
        round(bridge["msgs_per_s"] / min(a["msgs_per_s"], b["msgs_per_s"]), 3)
        for a, b, bridge in zip(runs["a"], runs["b"], runs["bridge"])]

    def total_cpu(name):
        return statistics.median(run_["cpu_us_per_msg"] + run_["broker_cpu_us_per_msg"]
                                 for run_ in runs[name])

    result["total_cpu_us_per_msg_median"] = {name: round(total_cpu(name), 1) for name in runs}
    result["cpu_ratio"] = round(total_cpu("a") / total_cpu("bridge"), 3)
    result["bridge_peak_rss_mb"] = round(max(run_["peak_rss_mb"] for run_ in runs["bridge"]), 1)
    result["bridge_kafka_ack_mean_ms_all"] = [run_["kafka_ack_mean_ms"] for run_ in runs["bridge"]]
    result["bridge_exit_codes"] = [run_["exit_code"] for run_ in runs["bridge"]]
    _say(f"best of {rounds}: A {best['a']:,.0f} msg/s, B {best['b']:,.0f} msg/s, bridge "
         f"{best['bridge']:,.0f} msg/s; ratio {result['ratio']:.2f} (of medians "
         f"{result['ratio_of_medians']:.2f}, per round {result['ratio_per_round']}; target >= "
         f"0.75); CPU per message (client + brokers, median) A "
         f"{result['total_cpu_us_per_msg_median']['a']} us, bridge "
         f"{result['total_cpu_us_per_msg_median']['bridge']} us, ratio {result['cpu_ratio']:.2f}; "
         f"bridge peak RSS {result['bridge_peak_rss_mb']} MB")
    image = out_dir / "bridge_throughput.png"
    plot(result, image)
    result["plot"] = repo_path(image)
    figures = write_figures(out_dir, "bridge_throughput", COMMAND, result)
    _say(f"plot written to {image}, figures to {figures}")
    return result
