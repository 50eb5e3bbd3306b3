"""Publisher scale: N simulated devices (one MQTT client each) in one process, at their 1-2 s cadence.

For each N (100 / 1,000 / 5,000; `WEBOS_BENCH_DEVICES=100,1000` for a quick run) the simulator
runs for `WEBOS_BENCH_SECONDS` (default 25) after every device has connected and a short warm-up.
Reported: the share of scheduled messages published within 100 ms of their due time (and p50/p99/
max lateness), messages/s published and acknowledged by RabbitMQ against the expected N/1.5 per s,
the publisher process's CPU (% of one core) and memory (RSS), and the machine's CPU.
"""
from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path

import pika
import pika.exceptions
import psutil

from publisher.devices import DeviceConfig, Simulator
from rabbitmq import topology
from stack.config import Settings

LOGGER = logging.getLogger("bench.publisher_scale")
DEFAULT_COUNTS = (100, 1000, 5000)
INTERVAL = (1.0, 2.0)
WARM_UP = 3.0


def device_counts() -> list[int]:
    """The device counts to run, from WEBOS_BENCH_DEVICES (default 100,1000,5000)."""
    raw = os.environ.get("WEBOS_BENCH_DEVICES")
    return [int(part) for part in raw.split(",") if part.strip()] if raw else list(DEFAULT_COUNTS)


def raise_file_limit(needed: int) -> int:
    """Raise the soft open-files limit towards the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def broker_process(settings: Settings) -> psutil.Process | None:
    """The RabbitMQ process listening on the MQTT port (to show where the CPU goes), if visible."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if (connection.status == psutil.CONN_LISTEN and connection.laddr
                    and connection.laddr.port == settings.mqtt_port and connection.pid):
                return psutil.Process(connection.pid)
    except (psutil.AccessDenied, psutil.NoSuchProcess):
        pass
    return None


def _cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
        return times.user + times.system
    except psutil.NoSuchProcess:
        return 0.0


def _schedstat(thread_id: int | None) -> tuple[float, float]:
    """(seconds on CPU, seconds runnable but waiting for a CPU) of one thread, from Linux."""
    try:
        with open(f"/proc/self/task/{thread_id}/schedstat", encoding="ascii") as stat:
            on_cpu, waiting, _ = stat.read().split()
        return int(on_cpu) / 1e9, int(waiting) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


def _declare_queues(settings: Settings, devices: list[str], delete: bool = False) -> None:
    # A broker still busy with thousands of closing connections answers slowly: be patient.
    parameters = topology.admin_parameters(settings, stack_timeout=120, socket_timeout=30,
                                           connection_attempts=5, retry_delay=2)
    with pika.BlockingConnection(parameters) as connection:
        channel = connection.channel()
        for device in devices:
            if delete:
                topology.delete_device(channel, device)
            else:
                topology.declare_device(channel, device)


def run_one(settings: Settings, count: int, seconds: float) -> dict:
    """Run `count` devices for `seconds` of measurement; the figures for that count."""
    devices = [f"bench{count}-{i:05d}" for i in range(count)]
    LOGGER.info("%d devices: declaring queues", count)
    _declare_queues(settings, devices)
    process = psutil.Process()
    simulator = Simulator(settings, [DeviceConfig(d, interval=INTERVAL) for d in devices],
                          max_queued_messages=1000, seed=count)
    # The simulator runs inside this process, which holds what earlier benchmarks left: its
    # memory is what RSS grows by from here (a low bound under `make bench`, where it may reuse
    # memory those benchmarks freed; run `python -m bench publisher_scale` alone for the figure).
    rss_before = process.memory_info().rss
    started = time.monotonic()
    simulator.start()
    try:
        deadline = started + max(60.0, count / 20)
        while simulator.stats()["connected"] < count and time.monotonic() < deadline:
            time.sleep(0.2)
        connect_seconds = time.monotonic() - started
        connected = simulator.stats()["connected"]
        LOGGER.info("%d devices: %d connected in %.1f s", count, connected, connect_seconds)
        time.sleep(WARM_UP)  # let the start-up burst settle before measuring

        simulator.call(simulator.lateness.reset).result(10)
        before = simulator.stats()
        cpu_before = process.cpu_times()
        broker = broker_process(settings)
        broker_before = _cpu_seconds(broker)
        scheduler_thread = simulator._thread.native_id
        sched_before = _schedstat(scheduler_thread)
        psutil.cpu_percent()
        window_start = time.monotonic()
        rss, machine_cpu, threads = [], [], 0
        while time.monotonic() - window_start < seconds:
            time.sleep(1.0)  # one sample per second over the measurement window
            rss.append(process.memory_info().rss)
            machine_cpu.append(psutil.cpu_percent())
            threads = max(threads, process.num_threads())
        load_average = os.getloadavg()[0]
        window = time.monotonic() - window_start
        after = simulator.stats()
        cpu_after = process.cpu_times()
        broker_cpu = _cpu_seconds(broker) - broker_before
        sched_after = _schedstat(scheduler_thread)
        lateness = after["lateness"]
    finally:
        simulator.close()

    cpu_seconds = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    published = after["published"] - before["published"]
    acked = after["acked"] - before["acked"]
    figures = {
        "devices": count,
        "connected": connected,
        "connect_seconds": round(connect_seconds, 1),
        "window_seconds": round(window, 1),
        "on_time_share": round(lateness["on_time_share"] or 0.0, 4),
        "lateness_p50_ms": lateness["p50_ms"],
        "lateness_p99_ms": lateness["p99_ms"],
        "lateness_max_ms": lateness["max_ms"],
        "messages_per_s": round(published / window, 1),
        "acked_per_s": round(acked / window, 1),
        "expected_per_s": round(count / (sum(INTERVAL) / 2), 1),
        "dropped": after["dropped"],
        "cpu_percent_of_one_core": round(100 * cpu_seconds / window, 1),
        # How long the scheduler thread was ready to run but had no CPU (machine overloaded).
        "scheduler_thread_cpu_percent": round(100 * (sched_after[0] - sched_before[0]) / window, 1),
        "scheduler_thread_waiting_for_cpu_percent":
            round(100 * (sched_after[1] - sched_before[1]) / window, 1),
        "rss_mib_max": round(max(rss) / 2**20, 1),
        "rss_mib_added": round((max(rss) - rss_before) / 2**20, 1),
        "rabbitmq_cpu_percent_of_one_core": round(100 * broker_cpu / window, 1) if broker else None,
        "machine_cpu_percent": round(sum(machine_cpu) / len(machine_cpu), 1),
        "threads": threads,
        "load_average_1min": round(load_average, 1),
    }
    LOGGER.info("%d devices: %s", count, figures)
    LOGGER.info("%d devices: deleting queues", count)
    try:
        _declare_queues(settings, devices, delete=True)
    except pika.exceptions.AMQPError as error:
        LOGGER.warning("%d devices: could not delete their queues: %r", count, error)
    return figures


def plot(results: list[dict], path: Path) -> None:
    """On-time share, throughput, CPU and memory against the device count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["devices"] for r in results]
    labels = [str(c) for c in counts]
    slots = list(range(len(counts)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis in (axes[0], axes[2]):
        axis.set_xticks(slots, labels)
    axes[0].bar(slots, [100 * r["on_time_share"] for r in results], color="#1a7f37")
    axes[0].set(title="published within 100 ms of schedule", ylabel="%", ylim=(0, 105),
                xlabel="devices")
    for i, r in enumerate(results):
        axes[0].annotate(f"p99 {'>=' if r['lateness_p99_ms'] >= 10000 else ''}"
                         f"{r['lateness_p99_ms']:.0f} ms", (i, 100 * r["on_time_share"]),
                         ha="center", va="bottom", fontsize=8)
    axes[1].plot(counts, [r["expected_per_s"] for r in results], "k--", label="expected (N/1.5 s)")
    axes[1].plot(counts, [r["messages_per_s"] for r in results], "o-", label="published")
    axes[1].plot(counts, [r["acked_per_s"] for r in results], "s-", label="acked by RabbitMQ")
    axes[1].set(title="messages/s", xlabel="devices", xscale="log", yscale="log")
    axes[1].legend(fontsize=8)
    axes[2].bar(slots, [r["cpu_percent_of_one_core"] for r in results], color="#4472c4",
                label="CPU % of one core")
    twin = axes[2].twinx()
    twin.plot(slots, [r["rss_mib_added"] for r in results], "o-", color="#c62828",
              label="RSS added, MiB")
    axes[2].set(title="publisher process", xlabel="devices", ylabel="CPU % of one core")
    twin.set_ylabel("RSS added by the simulator, MiB")
    fig.suptitle("publisher scale: one process, one scheduler thread, one MQTT client per device")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(settings: Settings, out_dir) -> dict:
    """The figures for every device count, and a PNG plot in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = device_counts()
    seconds = float(os.environ.get("WEBOS_BENCH_SECONDS", "25"))
    file_limit = raise_file_limit(max(counts) + 1024)
    logging.getLogger("publisher.devices").setLevel(logging.WARNING)  # no line per device
    results = [run_one(settings, count, seconds) for count in counts]
    image = out_dir / "publisher_scale.png"
    plot(results, image)
    return {"interval_s": list(INTERVAL), "late_threshold_ms": 100, "open_files_limit": file_limit,
            "results": results, "plot": str(image)}
