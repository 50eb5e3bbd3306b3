"""End-to-end latency, MQTT publish -> RabbitMQ -> `python -m bridge` -> Kafka consume, at fixed
offered loads, with the peak memory and CPU of the bridge, RabbitMQ and Kafka during each run
(and of this process, `bench_clients`: the MQTT devices and the Kafka reader, sharing one GIL).

For each rate (WEBOS_BENCH_RATES, default 100,1000,2000 msg/s) WEBOS_BENCH_E2E_DEVICES devices
(default 4, one MQTT client each, QoS 1, round robin) publish into their own queues; a fresh bridge
forwards them to a fresh topic; a reader assigned to every partition takes the time each record
arrives. A Kafka JVM that has just started spends a core on its JIT compiler for a minute or two,
and steady state is what the targets are about: so WEBOS_BENCH_E2E_FIRST_WARMUP (default 40) s at
1,000 msg/s go first, untimed, and the first WEBOS_BENCH_E2E_WARMUP (default 10) s of each run are
not timed either. The next WEBOS_BENCH_E2E_SECONDS (default 12) s are. Each rate runs
WEBOS_BENCH_E2E_ROUNDS (default 3) times; medians are reported, every round is kept.

Latency = arrival - `t_ns` in the payload (the wall clock just before `publish`); the record's
CreateTime (the bridge's produce call, in whole ms, so either half may be off by up to 1 ms) cuts
it in two. `publish` only queues inside paho, so a load generator that cannot keep up shows as
latency before the bridge: `generator_unacked_at_end` (published but not yet acknowledged by
RabbitMQ when the timed loop ends) tells that case apart.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pika
import psutil
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from bench.__main__ import machine
from bench.bridge_throughput import queue_depth, start_bridge
from rabbitmq import topology
from stack.config import REPO_ROOT, Settings
from stack.kafka_server import ensure_topic

DEFAULT_RATES = (100, 1000, 2000)
WARMUP_RATE = 1000  # msg/s of the one untimed warm-up before the first rate (Kafka's JIT compiler)
COMMAND = (".venv/bin/python -m bench e2e_latency  (WEBOS_BENCH_RATES=100,1000,2000, "
           "WEBOS_BENCH_E2E_FIRST_WARMUP=40, WEBOS_BENCH_E2E_ROUNDS=3, WEBOS_BENCH_E2E_WARMUP=10, "
           "WEBOS_BENCH_E2E_SECONDS=12, "
           "WEBOS_BENCH_E2E_DEVICES=4)")
SAMPLE_PERIOD = 0.5  # seconds between resource samples
DRAIN_TIMEOUT = 60.0  # seconds to wait for the last records after the publishers stop


def _say(text: str) -> None:
    print(f"[e2e_latency] {text}", flush=True)


def rates() -> list[int]:
    """Offered loads to run, from WEBOS_BENCH_RATES (default 100,1000,2000)."""
    raw = os.environ.get("WEBOS_BENCH_RATES")
    return [int(part) for part in raw.split(",") if part.strip()] if raw else list(DEFAULT_RATES)


def listening_process(port: int) -> psutil.Process | None:
    """The process that listens on TCP `port` on this machine, if visible."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (connection.status == psutil.CONN_LISTEN and connection.laddr
                    and connection.laddr.port == port and connection.pid):
                return psutil.Process(connection.pid)
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return None


class ResourceSampler:
    """Samples RSS and CPU of named processes (each with its children, except those named in
    `alone`) every SAMPLE_PERIOD s."""

    def __init__(self, processes: dict[str, psutil.Process | None], alone=()):
        self.processes = {name: p for name, p in processes.items() if p is not None}
        self.alone = set(alone)
        self.peak_rss = {name: 0 for name in self.processes}
        self.peak_cpu = {name: 0.0 for name in self.processes}
        self.start_rss: dict[str, int] = {}
        self.cpu_start: dict[str, float] = {}
        self.cpu_end: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def _tree(self, name: str) -> list[psutil.Process]:
        process = self.processes[name]
        if name in self.alone:
            return [process]
        try:
            return [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _measure(self, name: str) -> tuple[int, float]:
        rss, cpu = 0, 0.0
        for member in self._tree(name):
            try:
                rss += member.memory_info().rss
                times = member.cpu_times()
                cpu += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return rss, cpu

    def start(self) -> None:
        self.started = time.monotonic()
        for name in self.processes:
            self.start_rss[name], self.cpu_start[name] = self._measure(name)
        self.thread.start()

    def run(self) -> None:
        last = {name: (time.monotonic(), self.cpu_start[name]) for name in self.processes}
        while not self.stop_event.wait(SAMPLE_PERIOD):
            for name in self.processes:
                rss, cpu = self._measure(name)
                now = time.monotonic()
                self.peak_rss[name] = max(self.peak_rss[name], rss)
                then, cpu_then = last[name]
                self.peak_cpu[name] = max(self.peak_cpu[name], (cpu - cpu_then) / (now - then) * 100)
                last[name] = (now, cpu)

    def stop(self) -> dict:
        """Stop sampling; per process: RSS at start, peak and end (MB), mean and peak CPU (% of
        one core)."""
        self.stop_event.set()
        self.thread.join(5)
        elapsed = time.monotonic() - self.started
        figures = {}
        for name in self.processes:
            rss, cpu = self._measure(name)
            figures[name] = {
                "start_rss_mb": round(self.start_rss[name] / 2**20, 1),
                "peak_rss_mb": round(max(self.peak_rss[name], rss) / 2**20, 1),
                "end_rss_mb": round(rss / 2**20, 1),
                "cpu_mean_pct": round((cpu - self.cpu_start[name]) / elapsed * 100, 1),
                "cpu_peak_pct": round(self.peak_cpu[name], 1)}
        return figures


class ArrivalReader:
    """Every partition of `topic` from the beginning, in a thread: latency of each timed record."""

    def __init__(self, settings: Settings, topic: str):
        partitions = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}) \
            .list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap,
                                  "group.id": f"bench-e2e-{uuid.uuid4().hex[:6]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 5,
                                  "fetch.error.backoff.ms": 10})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self.latencies_ms: list[float] = []
        # The same trip cut at the record's CreateTime (the bridge's produce call, ms resolution):
        # MQTT publish -> bridge produce, and bridge produce -> arrival here.
        self.to_bridge_ms: list[float] = []
        self.after_bridge_ms: list[float] = []
        self.warm_devices: set[str] = set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            while not self.done.is_set():
                record = self.consumer.poll(0.05)
                if record is None or record.error():
                    continue
                received = time.time_ns()
                value = record.value()
                # t_ns is the payload's last field: slicing it out keeps this thread, which
                # shares the GIL with the publishing loop, cheap at thousands of records/s.
                at = value.rfind(b'"t_ns": ')
                if at < 0:
                    self.warm_devices.add(json.loads(value).get("id"))
                else:
                    sent = int(value[at + 8:-1])
                    produced_ms = record.timestamp()[1]
                    self.latencies_ms.append((received - sent) / 1e6)
                    self.to_bridge_ms.append(produced_ms - sent / 1e6)
                    self.after_bridge_ms.append(received / 1e6 - produced_ms)
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(10)


def connect_devices(settings: Settings, devices: list[str],
                    acked: list[int]) -> list[mqtt.Client]:
    """One connected paho client per device (webos-device, QoS 1 window 1000), loops running;
    client i counts its PUBACKs in acked[i] (from its own loop thread only)."""
    clients = []
    for index, device in enumerate(devices):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"webos-{device}",
                             protocol=mqtt.MQTTv311)
        client.username_pw_set(settings.device_user, settings.device_password)
        client.max_inflight_messages_set(1000)
        client.on_publish = lambda *args, i=index: acked.__setitem__(i, acked[i] + 1)
        connected = threading.Event()
        client.on_connect = lambda *args, event=connected: event.set()
        client.connect(settings.rabbitmq_host, settings.mqtt_port)
        client.loop_start()
        clients.append(client)
        if not connected.wait(10):
            raise RuntimeError(f"MQTT connect of {device} failed")
    return clients


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of sorted `values` (nearest rank)."""
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 2)


def run_rate(settings: Settings, rate: int, seconds: float, warmup: float, device_count: int,
             log_path: Path, brokers: dict[str, psutil.Process | None]) -> dict:
    """One offered load: fresh devices, topic and bridge; latency percentiles and resources."""
    run_id = uuid.uuid4().hex[:6]
    devices = [f"E2E{rate}-{run_id}-{n}" for n in range(device_count)]
    topic = f"bench.e2e.{rate}.{run_id}"
    with pika.BlockingConnection(topology.admin_parameters(settings)) as connection:
        channel = connection.channel()
        for device in devices:
            topology.declare_device(channel, device)
    ensure_topic(settings.kafka_bootstrap, topic, settings.kafka_partitions)
    process, _ = start_bridge(settings, [topology.device_queue(d) for d in devices], log_path,
                              ["--topic-template", topic])
    reader = ArrivalReader(settings, topic)
    clients: list[mqtt.Client] = []
    warm_total, total = int(rate * warmup), int(rate * seconds)
    try:
        acked = [0] * device_count
        clients = connect_devices(settings, devices, acked)
        topics = [topology.mqtt_topic(device, "info") for device in devices]
        # Warm up until every device's first message made the whole trip (bridge consuming each
        # queue, reader fetching): otherwise the first records measure start-up, not the path.
        deadline = time.monotonic() + 60
        probes = 0
        while reader.warm_devices < set(devices):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"no warm-up record from every device in 60 s; see {log_path}")
            for client, device, mqtt_topic in zip(clients, devices, topics):
                if device not in reader.warm_devices:
                    client.publish(mqtt_topic, json.dumps({"id": device, "warmup": True}), qos=1)
                    probes += 1
            time.sleep(0.5)  # re-send period of the warm-up probes
        sampler = ResourceSampler({"bridge": psutil.Process(process.pid), **brokers,
                                   "bench_clients": psutil.Process()}, alone=["bench_clients"])
        _say(f"{rate} msg/s from {device_count} devices: {warm_total} messages to warm up "
             f"(untimed: Kafka's JIT compiler, caches), then {total} timed")
        start = time.perf_counter()
        next_report = start + 2
        peak_waiting = 0
        for seq in range(warm_total + total):
            if seq == warm_total:
                sampler.start()
                peak_waiting = 0  # the timed part's own
                timed_start = time.perf_counter()
            slot = start + seq / rate
            pause = slot - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # pacing the devices to the offered load
            index = seq % device_count
            device = devices[index]
            fields = {"Producer": device, "command": "position", "id": device, "x": seq % 7,
                      "y": seq % 5, "status": "Active", "seq": seq // device_count,
                      "msg_id": f"{run_id}-{seq}", "ts": int(time.time() * 1000)}
            if seq < warm_total:
                fields["warmup"] = True
            else:
                fields["t_ns"] = time.time_ns()  # last field: the reader slices it out
            clients[index].publish(topics[index], json.dumps(fields), qos=1)
            if time.perf_counter() >= next_report:
                next_report += 2
                waiting = sum(queue_depth(settings, topology.device_queue(d)) for d in devices)
                peak_waiting = max(peak_waiting, waiting)
                _say(f"  sent {seq + 1}/{warm_total + total}, in RabbitMQ {waiting} (management "
                     f"API, a few s old), timed arrivals {len(reader.latencies_ms)}")
        achieved = total / (time.perf_counter() - timed_start)
        # publish() only queues in paho: what RabbitMQ has not acknowledged when the loop ends
        # shows a load generator that fell behind (its delay then counts as latency).
        unacked = probes + warm_total + total - sum(acked)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while len(reader.latencies_ms) < total and time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the bridge exited with {process.returncode}; see {log_path}")
            time.sleep(0.1)  # polling the reader's count; it has its own thread
        resources = sampler.stop()
    finally:
        reader.stop()
        for client in clients:
            client.disconnect()
            client.loop_stop()
        process.terminate()
        process.wait(60)
        with pika.BlockingConnection(topology.admin_parameters(settings)) as connection:
            channel = connection.channel()
            for device in devices:
                topology.delete_device(channel, device)
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).delete_topics([topic])
    latencies = sorted(reader.latencies_ms)
    if not latencies:
        raise RuntimeError(f"no timed record arrived at {rate} msg/s; see {log_path}")
    to_bridge, after_bridge = sorted(reader.to_bridge_ms), sorted(reader.after_bridge_ms)
    return {"rate_target": rate, "rate_achieved": round(achieved), "devices": device_count,
            "warmup_messages": warm_total, "messages": total, "received": len(latencies),
            "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "p99_ms": percentile(latencies, 99), "p999_ms": percentile(latencies, 99.9),
            "max_ms": round(latencies[-1], 2),
            # Where the time goes, cut at the bridge's produce call (CreateTime, 1 ms resolution).
            "publish_to_produce_ms": {p: percentile(to_bridge, p) for p in (50, 99)},
            "produce_to_consume_ms": {p: percentile(after_bridge, p) for p in (50, 99)},
            "peak_rabbitmq_backlog": peak_waiting, "generator_unacked_at_end": unacked,
            "bridge_exit_code": process.returncode,
            "resources": resources}


def combine_rounds(runs: list[dict]) -> dict:
    """One rate's rounds: medians of p50 and p99 (one stall on a noisy machine moves a single
    run's p99 a lot), the worst max, every round's figures, the resources of the round whose p99
    is the median (the upper one of two)."""
    by_p99 = sorted(runs, key=lambda run_: run_["p99_ms"])
    typical = by_p99[len(by_p99) // 2]
    return {"rate_target": typical["rate_target"],
            "rate_achieved": min(run_["rate_achieved"] for run_ in runs),
            "devices": typical["devices"], "rounds": len(runs),
            "p50_ms": round(statistics.median(run_["p50_ms"] for run_ in runs), 2),
            "p99_ms": round(statistics.median(run_["p99_ms"] for run_ in runs), 2),
            "max_ms": max(run_["max_ms"] for run_ in runs),
            "p50_ms_per_round": [run_["p50_ms"] for run_ in runs],
            "p99_ms_per_round": [run_["p99_ms"] for run_ in runs],
            "generator_unacked_at_end": max(run_["generator_unacked_at_end"] for run_ in runs),
            "resources": typical["resources"], "runs": runs}


def plot(results: list[dict], path: Path) -> None:
    """Latency percentiles against offered load, and each process's mean CPU per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["rate_achieved"] for r in results]
    for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-"),
                              ("max_ms", "max", "^--")):
        left.plot(x, [r[key] for r in results], style, label=label)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("achieved rate, msg/s (log)")
    left.set_ylabel("MQTT publish -> Kafka consume, ms (log)")
    left.set_title("end-to-end latency through the bridge", fontsize=10)
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    names = sorted({name for r in results for name in r["resources"]})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        positions = [n + i * width for n in range(len(results))]
        right.bar(positions, [r["resources"].get(name, {}).get("cpu_mean_pct", 0) for r in results],
                  width, label=name)
    right.set_xticks([n + width * (len(names) - 1) / 2 for n in range(len(results))],
                     [f"{r['rate_target']:,}/s" for r in results])
    right.set_ylabel("mean CPU, % of one core")
    right.set_title("CPU per process during the run (2 cores = 200 %)", fontsize=10)
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(settings: Settings, out_dir) -> dict:
    """Every rate in WEBOS_BENCH_RATES; figures, a PNG and a JSON file in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = float(os.environ.get("WEBOS_BENCH_E2E_SECONDS", 12))
    warmup = float(os.environ.get("WEBOS_BENCH_E2E_WARMUP", 10))
    rounds = int(os.environ.get("WEBOS_BENCH_E2E_ROUNDS", 3))
    first_warmup = float(os.environ.get("WEBOS_BENCH_E2E_FIRST_WARMUP", 40))
    device_count = int(os.environ.get("WEBOS_BENCH_E2E_DEVICES", 4))
    log_path = Path(tempfile.mkdtemp(prefix="webos-bench-e2e-")) / "bridge.log"
    kafka_port = int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
    brokers = {"rabbitmq": listening_process(settings.amqp_port),
               "kafka": listening_process(kafka_port)}
    missing = [name for name, process in brokers.items() if process is None]
    _say(f"bridge output goes to {log_path}" +
         (f"; no local process found for {', '.join(missing)} (not measured)" if missing else ""))
    if rounds < 1 or min(rates()) * seconds < 1:
        raise ValueError("WEBOS_BENCH_E2E_ROUNDS must be at least 1 and every rate times "
                         "WEBOS_BENCH_E2E_SECONDS at least one message")
    if first_warmup > 0:
        _say(f"warming up: {WARMUP_RATE} msg/s for {first_warmup:.0f} s through a bridge, untimed")
        run_rate(settings, WARMUP_RATE, seconds=1, warmup=first_warmup, device_count=device_count,
                 log_path=log_path, brokers=brokers)
    results = []
    for rate in rates():
        runs = []
        for round_ in range(rounds):
            _say(f"{rate} msg/s, round {round_ + 1}/{rounds}")
            result = run_rate(settings, rate, seconds, warmup, device_count, log_path, brokers)
            runs.append(result)
            resources = ", ".join(f"{name} {r['cpu_mean_pct']}% CPU {r['peak_rss_mb']} MB"
                                  for name, r in result["resources"].items())
            _say(f"{rate} msg/s: achieved {result['rate_achieved']}, received "
                 f"{result['received']}/{result['messages']}, p50 {result['p50_ms']} ms, p99 "
                 f"{result['p99_ms']} ms, max {result['max_ms']} ms, not yet acknowledged by "
                 f"RabbitMQ at the end {result['generator_unacked_at_end']}; {resources}")
        results.append(combine_rounds(runs))
    image = out_dir / "e2e_latency.png"
    plot(results, image)
    summary = {"seconds_per_rate": seconds, "warmup_seconds_per_rate": warmup, "rounds": rounds,
               "devices": device_count,
               "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "runs": results,
               "plot": str(image.relative_to(REPO_ROOT) if image.is_relative_to(REPO_ROOT)
                           else image)}
    figures = out_dir / "e2e_latency.json"
    figures.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "machine": machine(), "command": COMMAND, **summary},
                                  indent=2) + "\n")
    _say(f"plot written to {image}, figures to {figures}")
    return summary
