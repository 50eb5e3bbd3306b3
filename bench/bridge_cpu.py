"""The bridge's CPU per message at a steady rate, thread by thread:
`python -m bench.bridge_cpu --rate 1000 [-- BRIDGE OPTIONS]`.

Fresh RabbitMQ and Kafka; `python -m bridge` with its defaults (and the options after `--`)
consumes four device queues; this process publishes --rate persistent messages a second into
them over AMQP, round robin. After --warmup s (Kafka's JIT compiler is busy for a while after it
starts) a window of --seconds: every thread of the bridge with its CPU (user plus system, % of one
core and µs per message) and its voluntary context switches (how often it went to sleep and was
woken), per second and per message; messages are what the bridge says Kafka confirmed. The
forwarding loop is the thread called python; librdkafka's are rdk:*. With --hang-kafka, Kafka is
hung (SIGSTOP: its sockets open, nothing answers) for the window: what the bridge costs while
records wait for it. End-to-end latency at the same rate is bench/e2e_latency.py's.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pika
import requests

from bench.bridge_throughput import payloads
from bench.common import metric, sigterm_as_interrupt, start_bridge, thread_times
from common import config
from rabbitmq import endpoints, naming, topology
from stack.kafka_server import ensure_pipeline_topics
from stack.local import start_fresh_brokers

LOGGER = logging.getLogger("bench.bridge_cpu")
DEVICES = [f"BCPU{n}-00{n}" for n in range(4)]


def publish(settings, rate: int, stop: threading.Event) -> None:
    """Persistent messages into the DEVICES' queues at `rate` a second until `stop`."""
    bodies = payloads(1000)
    keys = [naming.routing_key(device, "info") for device in DEVICES]
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
        channel, start, sent = connection.channel(), time.monotonic(), 0
        while not stop.is_set():
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                connection.sleep(ahead)  # the schedule's own pace; serves the connection meanwhile
            channel.basic_publish(naming.TOPIC_EXCHANGE, keys[sent % len(keys)],
                                  bodies[sent % len(bodies)], properties)
            sent += 1


def window(pid: int, metrics_url: str, seconds: float) -> dict:
    """Each bridge thread's CPU and wake-ups over `seconds`, per message Kafka confirmed."""
    def produced():
        return metric(requests.get(f"{metrics_url}/metrics", timeout=5).text,
                      "webos_bridge_produced_total")

    before, count_before, started = thread_times(pid), produced(), time.monotonic()
    time.sleep(seconds)  # the measurement window itself
    after, messages, elapsed = thread_times(pid), produced() - count_before, time.monotonic() - started
    threads, total_cpu, total_switches = [], 0.0, 0
    for tid, (name, cpu, switches) in after.items():
        _, cpu_before, switches_before = before.get(tid, (name, 0.0, 0))
        cpu, switches = cpu - cpu_before, switches - switches_before
        total_cpu, total_switches = total_cpu + cpu, total_switches + switches
        if cpu or switches > elapsed:  # threads that did something in the window
            threads.append(_figures(f"{name} ({tid})", cpu, switches, messages, elapsed))
    threads.sort(key=lambda row: -row["cpu_percent"])
    return {"messages_per_s": round(messages / elapsed, 1),
            "total": _figures("bridge", total_cpu, total_switches, messages, elapsed),
            "threads": threads}


def _figures(name: str, cpu: float, switches: int, messages: float, elapsed: float) -> dict:
    return {"thread": name, "cpu_percent": round(100 * cpu / elapsed, 1),
            "cpu_us_per_msg": round(1e6 * cpu / messages, 1) if messages else None,
            "wakeups_per_s": round(switches / elapsed),
            "wakeups_per_msg": round(switches / messages, 2) if messages else None}


def measure(rate: int, warmup: float, seconds: float, bridge_options: list[str],
            hang_kafka: bool = False) -> dict:
    base = Path(tempfile.mkdtemp(prefix="webos-bench-bridge-cpu-"))
    settings, rabbitmq, kafka = start_fresh_brokers(base, node_name=f"webos-bridge-cpu-{os.getpid()}")
    stop, bridge = threading.Event(), None
    try:
        topology.apply(settings, DEVICES)
        ensure_pipeline_topics(settings)
        bridge, metrics_url = start_bridge(settings, [naming.device_queue(d) for d in DEVICES],
                                           base / "bridge.log", bridge_options)
        publisher = threading.Thread(target=publish, args=(settings, rate, stop), daemon=True)
        publisher.start()
        LOGGER.info("publishing %d msg/s; %.0f s of warm-up, then %.0f s measured", rate, warmup,
                    seconds)
        time.sleep(warmup)  # untimed: the brokers' and the bridge's start-up work settles
        bridge.check_running("during the warm-up")
        if hang_kafka:
            kafka.hang()
            LOGGER.info("Kafka hung (SIGSTOP) for the window")
        result = {"rate": rate, "seconds": seconds, "bridge_options": bridge_options,
                  "kafka_hung": hang_kafka, **window(bridge.pid, metrics_url, seconds)}
        bridge.check_running("during the window")
        return result
    finally:
        stop.set()
        if hang_kafka:
            kafka.resume()
        if bridge is not None:
            bridge.stop()
        rabbitmq.stop()
        kafka.stop()
        shutil.rmtree(base, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bridge_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000, help="messages a second (1000)")
    parser.add_argument("--warmup", type=float, default=20.0, help="s before the window (20)")
    parser.add_argument("--seconds", type=float, default=30.0, help="the window's length (30)")
    parser.add_argument("--hang-kafka", action="store_true",
                        help="hang Kafka (SIGSTOP) for the window: the bridge's cost while it waits")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("bridge_options", nargs="*", metavar="BRIDGE OPTION",
                        help="passed to python -m bridge, after --: e.g. -- --linger-ms 3")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    sigterm_as_interrupt()  # SIGTERM stops the brokers too
    result = measure(args.rate, args.warmup, args.seconds, args.bridge_options, args.hang_kafka)
    print(f"{result['messages_per_s']} msg/s through the bridge")
    for row in [result["total"], *result["threads"]]:
        print(f"{row['thread']:>24}: {row['cpu_percent']:5.1f} % of a core, {row['cpu_us_per_msg']} µs "
              f"and {row['wakeups_per_msg']} wake-ups per message ({row['wakeups_per_s']}/s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    config.run(main)
