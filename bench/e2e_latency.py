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

Every round's p50/p99/max is printed and kept. A round whose p99 is above SLOW_MS (20 ms, the
1,000 msg/s target) gets a short `cause`, from what was measured in that round
(`diagnosis`, bench/slow_rounds.py): of the messages slower than SLOW_MS, which half of the trip took their time (before
the bridge's produce call: paho, RabbitMQ, the bridge's consume; after it: the producer's linger
and Kafka's ack, from the bridge's delivery-latency histogram, then the fetch); when in the round
they were sent (all in the first seconds: warm-up; bursts at regular intervals: periodic, such as
a garbage collector; one burst; spread over the round); how busy the machine was while they were
sent, and how much of that was processes other than these four; and how long Kafka's JVM stood
still in safepoints (its garbage collector's pauses among them) or compiled (its JIT compiler,
busy for a minute or two after Kafka starts), both read from its hsperfdata file.
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
import requests
from confluent_kafka.admin import AdminClient

from bench.common import (ResourceSampler, listening_process, pyplot, queue_depth, repo_path,
                          save_figure, start_bridge, write_figures)
from bench.slow_rounds import SLOW_MS, diagnose, histogram_buckets, histogram_quantile_ms
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from common.config import Settings
from common.pki import PKI, client_context
from stack.kafka_server import TopicReader, ensure_topic

DEFAULT_RATES = (100, 1000, 2000)
PLAIN_RATE = 1000  # also run over plain MQTT, for the cost of TLS
WARMUP_RATE = 1000  # msg/s of the one untimed warm-up before the first rate (Kafka's JIT compiler)
COMMAND = (".venv/bin/python -m bench e2e_latency  (WEBOS_BENCH_RATES=100,1000,2000, "
           "WEBOS_BENCH_E2E_FIRST_WARMUP=40, WEBOS_BENCH_E2E_ROUNDS=3, WEBOS_BENCH_E2E_WARMUP=10, "
           "WEBOS_BENCH_E2E_SECONDS=12, "
           "WEBOS_BENCH_E2E_DEVICES=4)")


DRAIN_TIMEOUT = 60.0  # seconds to wait for the last records after the publishers stop
DELIVERY_HISTOGRAM = "webos_bridge_delivery_latency_seconds"  # produce -> Kafka's ack, bridge side


def _say(text: str) -> None:
    print(f"[e2e_latency] {text}", flush=True)


def rates() -> list[int]:
    """Offered loads to run, from WEBOS_BENCH_RATES (default 100,1000,2000)."""
    raw = os.environ.get("WEBOS_BENCH_RATES")
    return [int(part) for part in raw.split(",") if part.strip()] if raw else list(DEFAULT_RATES)


class ArrivalReader(TopicReader):
    """Every partition of `topic` from the beginning, in a thread: latency of each timed record."""

    poll_seconds = 0.05

    def __init__(self, settings: Settings, topic: str):
        super().__init__(settings.kafka_bootstrap, topic,
                         config={"fetch.wait.max.ms": 5, "fetch.error.backoff.ms": 10})
        self.latencies_ms: list[float] = []
        # The same trip cut at the record's CreateTime (the bridge's produce call, ms resolution):
        # MQTT publish -> bridge produce, and bridge produce -> arrival here.
        self.to_bridge_ms: list[float] = []
        self.after_bridge_ms: list[float] = []
        self.sent_ns: list[int] = []  # when each timed record was published, in the same order
        self.warm_devices: set[str] = set()
        self.start()

    def on_record(self, record) -> None:
        if record.error():
            return
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
            self.sent_ns.append(sent)


def connect_devices(settings: Settings, devices: list[str], acked: list[int],
                    plain: bool = False) -> list[mqtt.Client]:
    """One connected paho client per device (MQTT over TLS with the device's own certificate,
    QoS 1 window 1000), loops running; client i counts its PUBACKs in acked[i] (from its own
    loop thread only). `plain`: MQTT without TLS, each device by its password (the baseline)."""
    clients = []
    pki = PKI(settings.pki_path)
    for index, device in enumerate(devices):
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                             protocol=mqtt.MQTTv311)
        if plain:
            client.username_pw_set(device, pki.device_password(device))
        else:
            client.tls_set_context(client_context(settings.ca_file, pki.ensure_device(device)))
        client.max_inflight_messages_set(1000)
        client.on_publish = lambda *args, i=index: acked.__setitem__(i, acked[i] + 1)
        connected = threading.Event()
        client.on_connect = lambda *args, event=connected: event.set()
        client.connect(settings.rabbitmq_host,
                       settings.mqtt_plain_port if plain else settings.mqtt_port)
        client.loop_start()
        clients.append(client)
        if not connected.wait(10):
            raise RuntimeError(f"MQTT connect of {device} failed")
    return clients


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of sorted `values` (nearest rank)."""
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 2)


def _delivery_histogram(metrics_url: str) -> list[tuple[float, float]]:
    """The bridge's produce -> Kafka ack histogram now ([] if /metrics does not answer)."""
    try:
        return histogram_buckets(requests.get(metrics_url + "/metrics", timeout=2).text,
                                 DELIVERY_HISTOGRAM)
    except requests.RequestException:
        return []


class Round:
    """One offered load's fresh devices (MQTT clients), queues, topic, bridge and arrival reader."""

    def __init__(self, settings: Settings, rate: int, device_count: int, log_path: Path):
        run_id = uuid.uuid4().hex[:6]
        self.settings, self.rate, self.log_path, self.run_id = settings, rate, log_path, run_id
        self.devices = [f"E2E{rate}-{run_id}-{n}" for n in range(device_count)]
        self.topic = f"bench.e2e.{rate}.{run_id}"
        topology.enrol_devices(settings, self.devices)
        topology.declare_devices(settings, self.devices)
        ensure_topic(settings.kafka_bootstrap, self.topic, settings.kafka_partitions)
        self.bridge, self.metrics_url = start_bridge(
            settings, [naming.device_queue(d) for d in self.devices], log_path,
            ["--topic-template", self.topic])
        self.reader = ArrivalReader(settings, self.topic)
        self.clients: list[mqtt.Client] = []
        self.acked = [0] * device_count
        self.mqtt_topics = [naming.mqtt_topic(device, "info") for device in self.devices]

    def connect(self, plain: bool) -> None:
        """The devices' MQTT clients (see connect_devices)."""
        self.clients = connect_devices(self.settings, self.devices, self.acked, plain)

    def warm_up(self) -> int:
        """Until every device's first message made the whole trip (bridge consuming each queue,
        reader fetching): otherwise the first records measure start-up, not the path. The
        number of probes sent."""
        deadline = time.monotonic() + 60
        probes = 0
        while self.reader.warm_devices < set(self.devices):
            self.bridge.check_running("during the warm-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no warm-up record from every device in 60 s; see "
                                   f"{self.log_path}")
            for client, device, mqtt_topic in zip(self.clients, self.devices, self.mqtt_topics):
                if device not in self.reader.warm_devices:
                    client.publish(mqtt_topic, json.dumps({"id": device, "warmup": True}), qos=1)
                    probes += 1
            time.sleep(0.5)  # re-send period of the warm-up probes
        return probes

    def publish(self, warm_total: int, total: int, sampler: ResourceSampler) -> dict:
        """Publish at the offered load: `warm_total` untimed messages, then `total` timed ones
        (the sampler and the delivery histogram start with those). What the loop saw."""
        device_count = len(self.devices)
        start = time.perf_counter()
        next_report = start + 2
        seen = {"peak_waiting": 0}
        for seq in range(warm_total + total):
            if seq == warm_total:
                seen["delivery_before"] = _delivery_histogram(self.metrics_url)
                seen["timed_start_ns"] = time.time_ns()
                sampler.start()
                seen["peak_waiting"] = 0  # the timed part's own
                timed_start = time.perf_counter()
            pause = start + seq / self.rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # pacing the devices to the offered load
            index = seq % device_count
            device = self.devices[index]
            fields = {"Producer": device, "command": "position", "id": device, "x": seq % 7,
                      "y": seq % 5, "status": "Active", "seq": seq // device_count,
                      "msg_id": f"{self.run_id}-{seq}", "ts": int(time.time() * 1000)}
            if seq < warm_total:
                fields["warmup"] = True
            else:
                fields["t_ns"] = time.time_ns()  # last field: the reader slices it out
            self.clients[index].publish(self.mqtt_topics[index], json.dumps(fields), qos=1)
            if time.perf_counter() >= next_report:
                next_report += 2
                waiting = sum(queue_depth(self.settings, naming.device_queue(d))
                              for d in self.devices)
                seen["peak_waiting"] = max(seen["peak_waiting"], waiting)
                _say(f"  sent {seq + 1}/{warm_total + total}, in RabbitMQ {waiting} (management "
                     f"API, a few s old), timed arrivals {len(self.reader.latencies_ms)}")
        seen["achieved"] = total / (time.perf_counter() - timed_start)
        return seen

    def drain(self, total: int) -> None:
        """Until the reader has every timed record, or DRAIN_TIMEOUT."""
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while len(self.reader.latencies_ms) < total and time.monotonic() < deadline:
            self.bridge.check_running("while Kafka drained")
            time.sleep(0.1)  # polling the reader's count; it has its own thread

    def close(self) -> None:
        """Stop the reader, the clients and the bridge; delete the devices and the topic."""
        self.reader.stop()
        for client in self.clients:
            client.disconnect()
            client.loop_stop()
        self.bridge.stop(60)
        with pika.BlockingConnection(endpoints.admin_parameters(self.settings)) as connection:
            channel = connection.channel()
            for device in self.devices:
                topology.delete_device(channel, device)
        AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap}).delete_topics([self.topic])


def run_rate(settings: Settings, rate: int, seconds: float, warmup: float, device_count: int,
             log_path: Path, brokers: dict[str, psutil.Process | None],
             plain: bool = False) -> dict:
    """One offered load: fresh devices, topic and bridge; latency percentiles and resources."""
    warm_total, total = int(rate * warmup), int(rate * seconds)
    round_ = Round(settings, rate, device_count, log_path)
    try:
        round_.connect(plain)
        probes = round_.warm_up()
        sampler = ResourceSampler({"bridge": psutil.Process(round_.bridge.pid), **brokers,
                                   "bench_clients": psutil.Process()}, alone=["bench_clients"],
                                  jvm="kafka")
        _say(f"{rate} msg/s from {device_count} devices: {warm_total} messages to warm up "
             f"(untimed: Kafka's JIT compiler, caches), then {total} timed")
        seen = round_.publish(warm_total, total, sampler)
        # publish() only queues in paho: what RabbitMQ has not acknowledged when the loop ends
        # shows a load generator that fell behind (its delay then counts as latency).
        seen["unacked"] = probes + warm_total + total - sum(round_.acked)
        round_.drain(total)
        seen["delivery_after"] = _delivery_histogram(round_.metrics_url)
        resources = sampler.stop()
    finally:
        round_.close()
    if not round_.reader.latencies_ms:
        raise RuntimeError(f"no timed record arrived at {rate} msg/s; see {log_path}")
    return {"rate_target": rate, "rate_achieved": round(seen["achieved"]), "devices": device_count,
            "warmup_messages": warm_total, "messages": total,
            **_round_figures(round_.reader, sampler, seen, seconds),
            "peak_rabbitmq_backlog": seen["peak_waiting"],
            "generator_unacked_at_end": seen["unacked"],
            "bridge_exit_code": round_.bridge.process.returncode,
            "resources": resources}


def _round_figures(reader: ArrivalReader, sampler: ResourceSampler, seen: dict,
                   seconds: float) -> dict:
    """Latency percentiles of one round, where its time went and why it was slow."""
    latencies = sorted(reader.latencies_ms)
    to_bridge, after_bridge = sorted(reader.to_bridge_ms), sorted(reader.after_bridge_ms)
    kafka_ack = {p: histogram_quantile_ms(seen["delivery_before"], seen["delivery_after"], p / 100)
                 for p in (50, 99)}
    diagnosis = diagnose(reader.latencies_ms, reader.to_bridge_ms,
                         [(sent - seen["timed_start_ns"]) / 1e9 for sent in reader.sent_ns],
                         seconds,
                         {**sampler.series, "machine": sampler.machine, "others": sampler.others,
                          "jvm_paused": sampler.jvm_paused, "jvm_compiling": sampler.jvm_compiling},
                         kafka_ack[99])
    p99 = percentile(latencies, 99)
    jvm_total = sampler.jvm_total
    return {"received": len(latencies),
            "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90),
            "p99_ms": p99, "p999_ms": percentile(latencies, 99.9),
            "max_ms": round(latencies[-1], 2),
            # Where the time goes, cut at the bridge's produce call (CreateTime, 1 ms resolution);
            # produce -> Kafka's ack is the bridge's delivery-report histogram (bucket bounds).
            "publish_to_produce_ms": {p: percentile(to_bridge, p) for p in (50, 99)},
            "produce_to_consume_ms": {p: percentile(after_bridge, p) for p in (50, 99)},
            "produce_to_kafka_ack_ms_at_most": kafka_ack,
            "machine_busy_pct_mean": sampler.machine_mean,
            # Kafka's JVM over the round: stopped in safepoints (GC pauses among them), compiling.
            "kafka_jvm_paused_ms": round(1000 * jvm_total["paused"], 1) if jvm_total else None,
            "kafka_jvm_compiling_ms": (round(1000 * jvm_total["compiling"], 1)
                                       if jvm_total else None),
            "cause": diagnosis["cause"] if p99 > SLOW_MS else None,
            "diagnosis": diagnosis}


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
            "max_ms_per_round": [run_["max_ms"] for run_ in runs],
            "cause_per_round": [run_.get("cause") for run_ in runs],
            "generator_unacked_at_end": max(run_["generator_unacked_at_end"] for run_ in runs),
            "resources": typical["resources"], "runs": runs}


def plot(results: list[dict], path: Path) -> None:
    """Latency percentiles against offered load, and each process's mean CPU per load."""
    plt = pyplot()

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [r["rate_achieved"] for r in results]
    for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-"),
                              ("max_ms", "max", "^--")):
        left.plot(x, [r[key] for r in results], style, label=label)
    left.plot([r["rate_achieved"] for r in results for _ in r["p99_ms_per_round"]],
              [p99 for r in results for p99 in r["p99_ms_per_round"]], "x", color="grey",
              label="p99 of each round")
    left.axhline(SLOW_MS, color="grey", linestyle=":", linewidth=1)
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
    save_figure(figure, path)


def _say_round(rate: int, result: dict) -> None:
    """One round's figures, where its time went and, if slow, why."""
    resources = ", ".join(f"{name} {r['cpu_mean_pct']}% CPU {r['peak_rss_mb']} MB"
                          for name, r in result["resources"].items())
    _say(f"{rate} msg/s: achieved {result['rate_achieved']}, received "
         f"{result['received']}/{result['messages']}, p50 {result['p50_ms']} ms, p99 "
         f"{result['p99_ms']} ms, max {result['max_ms']} ms, not yet acknowledged by "
         f"RabbitMQ at the end {result['generator_unacked_at_end']}; {resources}; machine "
         f"{result['machine_busy_pct_mean']}% busy; Kafka's JVM paused "
         f"{result['kafka_jvm_paused_ms']} ms, compiled "
         f"{result['kafka_jvm_compiling_ms']} ms")
    diagnosis = result["diagnosis"]
    _say(f"  split at the bridge's produce: p50 {result['publish_to_produce_ms'][50]} + "
         f"{result['produce_to_consume_ms'][50]} ms, p99 "
         f"{result['publish_to_produce_ms'][99]} + {result['produce_to_consume_ms'][99]} ms"
         f" (produce -> Kafka's ack: p50 <= {result['produce_to_kafka_ack_ms_at_most'][50]}"
         f", p99 <= {result['produce_to_kafka_ack_ms_at_most'][99]} ms); "
         f"{diagnosis['slow_messages']} messages over {SLOW_MS:.0f} ms")
    if result["cause"]:
        _say(f"  p99 above {SLOW_MS:.0f} ms, likely cause: {result['cause']}")


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
    results, plain_results = [], []
    for rate in rates():
        runs, plain_runs = [], []
        for round_ in range(rounds):
            if rate == PLAIN_RATE and settings.plain_listeners:
                # The same load over plain MQTT, in the same round: what TLS costs.
                _say(f"{rate} msg/s, round {round_ + 1}/{rounds}, plain MQTT (no TLS)")
                plain_runs.append(run_rate(settings, rate, seconds, warmup, device_count,
                                           log_path, brokers, plain=True))
                _say(f"{rate} msg/s plain: p50 {plain_runs[-1]['p50_ms']} ms, p99 "
                     f"{plain_runs[-1]['p99_ms']} ms, max {plain_runs[-1]['max_ms']} ms")
            _say(f"{rate} msg/s, round {round_ + 1}/{rounds}")
            result = run_rate(settings, rate, seconds, warmup, device_count, log_path, brokers)
            runs.append(result)
            _say_round(rate, result)
        combined = combine_rounds(runs)
        _say(f"{rate} msg/s, every round (p50 / p99 / max ms): " + "; ".join(
            f"{p50} / {p99} / {worst}" + (f" ({cause})" if cause else "")
            for p50, p99, worst, cause in zip(combined["p50_ms_per_round"],
                                              combined["p99_ms_per_round"],
                                              combined["max_ms_per_round"],
                                              combined["cause_per_round"])))
        results.append(combined)
        if plain_runs:
            plain_results.append({**combine_rounds(plain_runs), "transport": "plain"})
    image = out_dir / "e2e_latency.png"
    plot(results, image)
    summary = {"seconds_per_rate": seconds, "warmup_seconds_per_rate": warmup, "rounds": rounds,
               "devices": device_count,
               "load_average_at_end": [round(x, 1) for x in os.getloadavg()], "runs": results,
               "plain_runs": plain_results,
               "plot": repo_path(image)}
    figures = write_figures(out_dir, "e2e_latency", COMMAND, summary)
    _say(f"plot written to {image}, figures to {figures}")
    return summary
