"""Discovery at scale: how the bridge finds 1,000 and 5,000 device queues (WEBOS_BENCH_QUEUES,
default "1000,5000"; 10,000 are in docs/performance.md), and what they cost RabbitMQ.

Per count, on the bench's broker: declare that many device queues (no devices, no messages),
start `python -m bridge` on them (by --queue-pattern), then measure
- the seconds from the bridge's start until it consumes every queue (webos_bridge_queues);
- the seconds from declaring one more queue until the bridge consumes it (queue events);
- RabbitMQ's memory per queue (its queue processes' memory before and after, from its
  memory breakdown in the management API);
- the bridge's CPU while idle (WEBOS_BENCH_IDLE_SECONDS, default 20), in % of one core;
- one full listing of the queues through the management API (what discovery did every 2 s
  before queue events): its size in bytes and its time.
"""
from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import pika
import psutil
import requests

from bench.common import metric, start_bridge, write_figures
from common.config import Settings
from rabbitmq import topology
from rabbitmq import endpoints
from stack.process import wait_until

COMMAND = ".venv/bin/python -m bench discovery  (WEBOS_BENCH_QUEUES=1000,10000)"


def _say(text: str) -> None:
    print(f"[discovery] {text}", flush=True)


def _bridge_queues(url: str) -> float:
    try:
        return metric(requests.get(url + "/metrics", timeout=5).text, "webos_bridge_queues")
    except requests.RequestException:
        return 0.0


def _queue_memory(settings: Settings) -> int:
    """Bytes held by RabbitMQ's queue processes (its memory breakdown, management API)."""
    with endpoints.management_api(settings) as http:
        node = http.get(f"{settings.management_url}/api/overview", timeout=30).json()["node"]
        breakdown = http.get(f"{settings.management_url}/api/nodes/{node}/memory",
                             timeout=30).json()["memory"]
    return int(breakdown["queue_procs"]) + int(breakdown.get("quorum_queue_procs", 0))


def _listing(settings: Settings) -> tuple[int, float]:
    """One full queue listing as the bridge used to make it: (bytes, seconds)."""
    with endpoints.management_api(settings, settings.bridge_user, settings.bridge_password) as http:
        started = time.perf_counter()
        response = http.get(f"{settings.management_url}/api/queues/%2F",
                            params={"columns": "name"}, timeout=120)
        response.raise_for_status()
        return len(response.content), time.perf_counter() - started


def _declare(settings: Settings, devices: list[str], delete: bool = False) -> float:
    started = time.monotonic()
    if delete:
        with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
            channel = connection.channel()
            for device in devices:
                topology.delete_device(channel, device)
    else:
        topology.declare_devices(settings, devices)
    return time.monotonic() - started


def run_one(settings: Settings, count: int, idle_seconds: float, logs: Path) -> dict:
    prefix = f"DISC{uuid.uuid4().hex[:6]}"
    devices = [f"{prefix}-{n:05d}" for n in range(count)]
    before = _queue_memory(settings)
    declare_seconds = _declare(settings, devices)
    time.sleep(5)  # RabbitMQ's memory figure is refreshed every few seconds, not a condition
    per_queue = (_queue_memory(settings) - before) / count
    _say(f"{count} queues declared in {declare_seconds:.1f} s; RabbitMQ +{per_queue / 1024:.1f} KiB "
         "per queue")
    listing_bytes, listing_seconds = _listing(settings)
    bridge = None
    try:
        started = time.monotonic()
        bridge, url = start_bridge(settings, [], logs / f"bridge-{count}.log",
                                   ["--queue-pattern", f"^webos\\.{prefix}-",
                                    "--topic-template", settings.kafka_topic])
        wait_until(lambda: _bridge_queues(url) >= count, 600, 0.2,
                   f"the bridge consuming {count} queues", watch=[bridge])
        consume_all = time.monotonic() - started
        _say(f"bridge consuming all {count} in {consume_all:.1f} s")
        extra = f"{prefix}-new"
        started = time.monotonic()
        topology.declare_devices(settings, [extra])
        wait_until(lambda: _bridge_queues(url) >= count + 1, 120, 0.05,
                   "the bridge consuming the new queue", watch=[bridge])
        pick_up = time.monotonic() - started
        devices.append(extra)
        process = psutil.Process(bridge.pid)
        cpu_before, at = process.cpu_times(), time.monotonic()
        time.sleep(idle_seconds)  # the idle window measured, not a wait for a condition
        cpu_after = process.cpu_times()
        idle_cpu = ((cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system)
                    / (time.monotonic() - at) * 100)
        rss_mb = process.memory_info().rss / 1e6
        _say(f"new queue consumed {pick_up:.2f} s after its declaration; bridge idle CPU "
             f"{idle_cpu:.1f} % of a core, RSS {rss_mb:.0f} MB; one full listing "
             f"{listing_bytes / 1024:.0f} KiB in {listing_seconds * 1000:.0f} ms")
    finally:
        if bridge is not None:
            bridge.stop(60)
        _declare(settings, devices, delete=True)
    return {"queues": count, "declare_seconds": round(declare_seconds, 1),
            "rabbitmq_kib_per_queue": round(per_queue / 1024, 1),
            "bridge_consume_all_seconds": round(consume_all, 1),
            "new_queue_pick_up_seconds": round(pick_up, 2),
            "bridge_idle_cpu_pct": round(idle_cpu, 2), "bridge_rss_mb": round(rss_mb, 1),
            "full_listing_kib": round(listing_bytes / 1024, 1),
            "full_listing_ms": round(listing_seconds * 1000, 1)}


def run(settings: Settings, out_dir) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in os.environ.get("WEBOS_BENCH_QUEUES", "1000,5000").split(",")]
    idle_seconds = float(os.environ.get("WEBOS_BENCH_IDLE_SECONDS", 20))
    logs = Path(tempfile.mkdtemp(prefix="webos-bench-discovery-"))
    _say(f"queue counts {counts}; bridge logs in {logs}")
    result = {"runs": [run_one(settings, count, idle_seconds, logs) for count in counts]}
    write_figures(out_dir, "discovery", COMMAND, result)
    return result
