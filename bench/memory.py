"""Memory (and CPU) of every process of the running system: publisher, bridge, consumer live view,
RabbitMQ and Kafka, with WEBOS_BENCH_MEMORY_DEVICES simulated devices (default 1000, reporting
every 1-2 s) for WEBOS_BENCH_MEMORY_SECONDS (default 30) after everything is up and flowing.

RSS at the start of the window, its peak and its end (end well above start hints at growth), and
mean/peak CPU in % of one core, sampled every 0.5 s with psutil (each process with its children).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import pika
import psutil
import requests
from confluent_kafka.admin import AdminClient

from bench.common import (ResourceSampler, listening_process, metric, start_bridge,
                          write_figures)
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from common.config import Settings
from stack.kafka_server import ensure_topic
from stack.process import AppProcess, free_port, wait_until

COMMAND = (".venv/bin/python -m bench memory  (WEBOS_BENCH_MEMORY_DEVICES=1000, "
           "WEBOS_BENCH_MEMORY_SECONDS=30)")
WARM_UP = 5.0  # seconds of flow before the measured window


def _say(text: str) -> None:
    print(f"[memory] {text}", flush=True)


def _child(settings: Settings, args: list[str], log_path: Path) -> AppProcess:
    return AppProcess(args, {**os.environ, **settings.to_env()}, log_path)


def _json(url: str):
    try:
        response = requests.get(url, timeout=2)
        return response.json() if response.ok else None
    except (requests.RequestException, ValueError):
        return None


def _bridgemetric(url: str, name: str) -> float:
    try:
        return metric(requests.get(url + "/metrics", timeout=2).text, name)
    except requests.RequestException:
        return 0.0


def run(settings: Settings, out_dir) -> dict:
    """The three apps as processes next to the brokers; per-process RSS and CPU; a JSON file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = int(os.environ.get("WEBOS_BENCH_MEMORY_DEVICES", 1000))
    seconds = float(os.environ.get("WEBOS_BENCH_MEMORY_SECONDS", 30))
    logs = Path(tempfile.mkdtemp(prefix="webos-bench-memory-"))
    run_id = uuid.uuid4().hex[:6]
    devices = [f"MEM{run_id}-{n:05d}" for n in range(count)]
    topic = f"bench.memory.{run_id}"
    ensure_topic(settings.kafka_bootstrap, topic, settings.kafka_partitions)
    publisher_port, consumer_port = free_port(), free_port()
    processes: dict[str, AppProcess] = {}
    _say(f"{count} devices for {seconds:.0f} s; process output in {logs}")
    try:
        devices_file = logs / "devices.json"
        devices_file.write_text(json.dumps({"interval": [1, 2],
                                            "devices": [{"id": d} for d in devices]}))
        processes["publisher"] = _child(settings, ["publisher", "--port", str(publisher_port),
                                                   "--devices-file", str(devices_file)],
                                        logs / "publisher.log")
        publisher_url = f"http://127.0.0.1:{publisher_port}"
        # 0.25 s: the period of an HTTP probe
        wait_until(lambda: ((_json(publisher_url + "/devices") or {}).get("stats", {})
                            .get("connected") == count), 120, 0.25, f"{count} devices connected",
                   watch=processes.values())
        _say("publisher: every device connected")
        processes["bridge"], metrics_url = start_bridge(
            settings, [naming.device_queue(d) for d in devices], logs / "bridge.log",
            ["--topic-template", topic])
        wait_until(lambda: _bridgemetric(metrics_url, "webos_bridge_queues") >= count, 120, 0.25,
                   "the bridge consuming", watch=processes.values())
        _say("bridge: consuming every queue")
        processes["consumer"] = _child(settings, ["consumer", "serve", "--port", str(consumer_port),
                                                  "--topic", topic, "--group", f"bench-{run_id}"],
                                       logs / "consumer.log")
        consumer_url = f"http://127.0.0.1:{consumer_port}"
        wait_until(lambda: _json(consumer_url + "/healthz"), 60, 0.25, "the live view",
                   watch=processes.values())
        _say(f"consumer live view up; {WARM_UP:.0f} s warm-up")
        time.sleep(WARM_UP)  # let the flow settle before the measured window
        kafka_port = int(settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
        sampler = ResourceSampler({**{name: psutil.Process(p.pid) for name, p in processes.items()},
                                   "rabbitmq": listening_process(settings.amqp_port),
                                   "kafka": listening_process(kafka_port)})
        acked_before = _bridgemetric(metrics_url, "webos_bridge_acked_total")
        sampler.start()
        for elapsed in range(0, int(seconds), 10):
            time.sleep(min(10, seconds - elapsed))  # the measured window, reported every 10 s
            _say(f"  {min(elapsed + 10, seconds):.0f}/{seconds:.0f} s")
        resources = sampler.stop()
        acked = _bridgemetric(metrics_url, "webos_bridge_acked_total") - acked_before
    finally:
        exit_codes = {name: process.stop(60) for name, process in reversed(processes.items())}
        AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).delete_topics([topic])
        with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
            channel = connection.channel()
            for device in devices:
                topology.delete_device(channel, device)
    result = {"devices": count, "seconds": seconds,
              "messages_per_s_through_bridge": round(acked / seconds, 1),
              "expected_messages_per_s": round(count / 1.5, 1), "exit_codes": exit_codes,
              "processes": resources}
    for name, figures in resources.items():
        _say(f"{name:10s} RSS {figures['start_rss_mb']:7.1f} -> peak {figures['peak_rss_mb']:7.1f}"
             f" -> end {figures['end_rss_mb']:7.1f} MB; CPU mean {figures['cpu_mean_pct']:5.1f}%"
             f" peak {figures['cpu_peak_pct']:5.1f}%")
    write_figures(out_dir, "memory", COMMAND, result)
    return result
