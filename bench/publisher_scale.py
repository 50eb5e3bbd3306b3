"""Publisher scale: N simulated devices (one MQTT client each) in one process, at their 1-2 s cadence.

For each N (1,000 / 5,000 / 10,000; `WEBOS_BENCH_DEVICES=100,1000` for a quick run) the simulator
runs for `WEBOS_BENCH_SECONDS` (default 25) after every device has connected and a short warm-up.
Reported: the share of scheduled messages published within 100 ms of their due time (and p50/p99/
max lateness), messages/s published and acknowledged by RabbitMQ against the expected N/1.5 per s,
the publisher process's CPU (% of one core, and per published message) and memory (RSS), the
machine's CPU, and RabbitMQ's side: its CPU per acknowledged message over the same window and its
memory per MQTT connection.

Memory per connection: RabbitMQ's memory is read after the queues exist and before any device
connects, and again once all are connected: the broker process's RSS from the OS, and its memory
breakdown (GET /api/nodes/<node>/memory, computed when asked). What RabbitMQ 4.0.5 answers there:
an MQTT connection is one Erlang process counted in `connection_other` (`connection_readers`/
`_writers`/`_channels` are AMQP 0-9-1's and stay 0): a few KB while idle, tens of KB once it
publishes; `binary` (and so the `erlang`/`allocated` totals) grows by about 3.8 MiB per connection
that RSS does not show (reserved, not touched); `total.rss` is the RSS, which the node's memory
alarm compares with its watermark (strategy `rss`; `mem_used` in /api/nodes is the same figure,
refreshed only every few seconds). So the headline is the RSS growth per connection (from the OS,
which answers even when the broker is too busy for its API); the other two are kept beside it.
The devices already publish while the last ones connect, so the RSS growth includes those first
messages.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import psutil
import requests

from bench.common import listening_process, pyplot, save_figure
from common.devices import DeviceConfig
from publisher.simulator import Simulator
from rabbitmq import endpoints, topology
from stack.local import fresh_settings, start_rabbitmq
from common.config import Settings

LOGGER = logging.getLogger("bench.publisher_scale")
DEFAULT_COUNTS = (1000, 5000, 10000)
PLAIN_COUNTS = (1000,)  # also measured without TLS, for the cost of TLS (5,000: docs/performance.md)
INTERVAL = (1.0, 2.0)
WARM_UP = 3.0
PROGRESS_PERIOD = 5.0  # seconds between "connected so far" lines while devices connect
CONNECT_STALL = 60.0  # stop waiting for the rest when no device connected for this long
NODE_PREFIX = "webos-bench-scale"  # each run's RabbitMQ node (python -m bench.rabbitmq_profile --node)


def device_counts() -> list[int]:
    """The device counts to run, from WEBOS_BENCH_DEVICES (default 1000,5000,10000)."""
    raw = os.environ.get("WEBOS_BENCH_DEVICES")
    return [int(part) for part in raw.split(",") if part.strip()] if raw else list(DEFAULT_COUNTS)


def raise_file_limit(needed: int) -> int:
    """Raise the soft open-files limit to `needed`, the hard one too where that is allowed (root),
    else as far as the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass  # not allowed (or above fs.nr_open): the hard limit is as far as it goes
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def broker_files_needed(devices: int) -> int:
    """Open files RabbitMQ needs for `devices` MQTT devices with a queue each: a socket and a
    queue file per device (a 300-device trial had 643 open), and some to spare."""
    return 2 * devices + 1024


def broker_memory(settings: Settings, broker: psutil.Process | None) -> dict:
    """RabbitMQ's memory now: `rss` (bytes, from the OS) and `breakdown` (bytes per category and
    `total` rss/erlang/allocated, from the management API); None for what cannot be read."""
    rss = None
    if broker is not None:
        try:
            rss = broker.memory_info().rss
        except psutil.Error:
            pass
    try:
        with endpoints.management_api(settings) as http:
            node = http.get(f"{settings.management_url}/api/overview", timeout=30).json()["node"]
            response = http.get(f"{settings.management_url}/api/nodes/{node}/memory", timeout=30)
        response.raise_for_status()
        breakdown = response.json()["memory"]
    except (requests.RequestException, ValueError, KeyError, TypeError) as error:
        LOGGER.warning("could not read RabbitMQ's memory breakdown: %r", error)
        breakdown = None
    return {"rss": rss, "breakdown": breakdown}


def memory_per_connection(before: dict, after: dict, connections: int) -> dict:
    """KiB per connection that RabbitMQ grew by between two broker_memory readings: its RSS, its
    connection processes (every `connection_*` category) and what Erlang allocated."""

    def per_connection(value_before, value_after) -> float | None:
        if value_before is None or value_after is None or connections <= 0:
            return None
        return round((value_after - value_before) / connections / 1024, 1)

    def category(reading: dict, pick):
        return pick(reading["breakdown"]) if reading.get("breakdown") else None

    def connection_processes(breakdown: dict) -> int:
        return sum(value for name, value in breakdown.items()
                   if name.startswith("connection_") and isinstance(value, int))

    def allocated(breakdown: dict) -> int:
        return breakdown["total"]["allocated"]

    return {"rss_kib": per_connection(before.get("rss"), after.get("rss")),
            "connection_processes_kib": per_connection(category(before, connection_processes),
                                                       category(after, connection_processes)),
            "erlang_allocated_kib": per_connection(category(before, allocated),
                                                   category(after, allocated))}


def cpu_us_per_message(cpu_seconds: float, messages: int) -> float | None:
    """CPU microseconds per message, or None when no message was counted."""
    return round(cpu_seconds / messages * 1e6, 1) if messages > 0 else None


def open_files(process: psutil.Process | None) -> tuple[int | None, int | None]:
    """(files open now, soft open-files limit) of a process: RabbitMQ needs one per connection,
    and its classic queues open their own files too."""
    if process is None:
        return None, None
    try:
        return process.num_fds(), process.rlimit(psutil.RLIMIT_NOFILE)[0]
    except (psutil.Error, AttributeError, OSError):
        return None, None


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


def enrol(settings: Settings, devices: list[str]) -> float:
    """Certificates, broker users and queues for `devices`; the seconds enrolling took."""
    LOGGER.info("%d devices: enrolling them (certificates, broker users)", len(devices))
    enrol_started = time.monotonic()
    topology.enrol_devices(settings, devices, timeout=300)
    enrol_seconds = time.monotonic() - enrol_started
    LOGGER.info("%d devices: enrolled in %.1f s; declaring queues", len(devices), enrol_seconds)
    declared = time.monotonic()
    topology.declare_devices(settings, devices)
    LOGGER.info("%d devices: queues declared in %.1f s", len(devices), time.monotonic() - declared)
    return enrol_seconds


def _wait_connected(simulator: Simulator, broker: psutil.Process | None, count: int) -> float:
    """Until every device connected, the deadline passed or connecting stalled; the seconds it
    took (from the simulator's start)."""
    started = time.monotonic()
    simulator.start()
    deadline = started + max(60.0, count / 20)
    next_progress = started + PROGRESS_PERIOD
    last_count, last_change = 0, started
    while simulator.stats()["connected"] < count and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the simulator's count; it connects on its own thread
        connected_now = simulator.stats()["connected"]
        if connected_now != last_count:
            last_count, last_change = connected_now, time.monotonic()
        elif connected_now and time.monotonic() - last_change > CONNECT_STALL:
            LOGGER.warning("%d devices: no more connected in %.0f s; measuring %d", count,
                           CONNECT_STALL, connected_now)
            break
        if time.monotonic() >= next_progress:
            next_progress += PROGRESS_PERIOD
            # The scheduler opens every socket before it reads the first CONNACK: "added"
            # moves first, then "connected".
            stats = simulator.stats()
            files, file_limit = open_files(broker)
            LOGGER.info("%d devices: %d added, %d connected after %.0f s (RabbitMQ has %s of "
                        "%s files open)", count, stats["devices"], stats["connected"],
                        time.monotonic() - started, files, file_limit)
    return time.monotonic() - started


def _freeze_heap() -> None:
    """As `python -m publisher` does once its devices run: what exists now (here also what
    earlier benchmarks left) is kept out of the collector's walks."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


def _measure_window(simulator: Simulator, process: psutil.Process,
                    broker: psutil.Process | None, seconds: float) -> dict:
    """The simulator's, this process's and RabbitMQ's figures over `seconds` of steady running."""
    def reset() -> None:
        simulator.lateness.reset()
        simulator.links.ack_wait.reset()
    simulator.call(reset).result(10)
    before = simulator.stats()
    cpu_before = process.cpu_times()
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
    sched_after = _schedstat(scheduler_thread)
    broker_files, broker_file_limit = open_files(broker)
    return {"window": window, "after": after, "lateness": after["lateness"],
            "cpu_seconds": ((cpu_after.user + cpu_after.system)
                            - (cpu_before.user + cpu_before.system)),
            "published": after["published"] - before["published"],
            "acked": after["acked"] - before["acked"],
            "broker_cpu": _cpu_seconds(broker) - broker_before,
            "sched": (sched_after[0] - sched_before[0], sched_after[1] - sched_before[1]),
            "rss": rss, "machine_cpu": machine_cpu, "threads": threads,
            "load_average": load_average, "broker_files": broker_files,
            "broker_file_limit": broker_file_limit}


def _rss_mib(reading: dict) -> float | None:
    return round(reading["rss"] / 2**20, 1) if reading["rss"] is not None else None


def _figures(count: int, transport: str, setup: dict, measured: dict, measured_broker: bool) -> dict:
    """The figures of one run from its set-up (`enrol_seconds`, `connect_seconds`, `connected`,
    `rss_before`, `memory_before`, `memory_connected`) and its measurement window."""
    window, lateness = measured["window"], measured["lateness"]
    published, acked, broker_cpu = measured["published"], measured["acked"], measured["broker_cpu"]
    rss = measured["rss"]
    per_connection = memory_per_connection(setup["memory_before"], setup["memory_connected"],
                                           setup["connected"])
    return {
        "devices": count,
        "transport": transport,
        "connected": setup["connected"],
        "enrol_seconds": round(setup["enrol_seconds"], 1),
        "connect_seconds": round(setup["connect_seconds"], 1),
        "window_seconds": round(window, 1),
        "on_time_share": round(lateness["on_time_share"] or 0.0, 4),
        "lateness_p50_ms": lateness["p50_ms"],
        "lateness_p99_ms": lateness["p99_ms"],
        "lateness_max_ms": lateness["max_ms"],
        # The broker's share, apart from the simulator's: handed to paho until RabbitMQ's PUBACK.
        "ack_wait_p50_ms": measured["after"]["ack_wait"]["p50_ms"],
        "ack_wait_p99_ms": measured["after"]["ack_wait"]["p99_ms"],
        "messages_per_s": round(published / window, 1),
        "acked_per_s": round(acked / window, 1),
        "expected_per_s": round(count / (sum(INTERVAL) / 2), 1),
        "dropped": measured["after"]["dropped"],
        "cpu_percent_of_one_core": round(100 * measured["cpu_seconds"] / window, 1),
        # How long the scheduler thread was ready to run but had no CPU (machine overloaded).
        "scheduler_thread_cpu_percent": round(100 * measured["sched"][0] / window, 1),
        "scheduler_thread_waiting_for_cpu_percent": round(100 * measured["sched"][1] / window, 1),
        "rss_mib_max": round(max(rss) / 2**20, 1),
        "rss_mib_added": round((max(rss) - setup["rss_before"]) / 2**20, 1),
        "rabbitmq_cpu_percent_of_one_core":
            round(100 * broker_cpu / window, 1) if measured_broker else None,
        # Where the CPU goes: RabbitMQ per message it acknowledged, this process per message it
        # handed to paho, over the same window.
        "rabbitmq_cpu_us_per_ack": cpu_us_per_message(broker_cpu, acked) if measured_broker else None,
        "publisher_cpu_us_per_message": cpu_us_per_message(measured["cpu_seconds"], published),
        "rabbitmq_memory_per_connection_kib": per_connection["rss_kib"],
        "rabbitmq_connection_processes_per_connection_kib":
            per_connection["connection_processes_kib"],
        "rabbitmq_erlang_allocated_per_connection_kib": per_connection["erlang_allocated_kib"],
        "rabbitmq_rss_mib_before_connect": _rss_mib(setup["memory_before"]),
        "rabbitmq_rss_mib_connected": _rss_mib(setup["memory_connected"]),
        "rabbitmq_open_files": measured["broker_files"],
        "rabbitmq_open_files_limit": measured["broker_file_limit"],
        "machine_cpu_percent": round(sum(measured["machine_cpu"]) / len(measured["machine_cpu"]), 1),
        "threads": measured["threads"],
        "load_average_1min": round(measured["load_average"], 1),
    }


def _log_figures(count: int, figures: dict) -> None:
    LOGGER.info("%d devices: %s", count, figures)
    LOGGER.info("%d devices: %.1f %% on time (target 99 %%), p99 late %.0f ms; acked %.0f/s of "
                "%.0f/s expected; CPU per message: RabbitMQ %s µs per ack, publisher %s µs; "
                "RabbitMQ memory per MQTT connection %s KiB (RSS), %s KiB (connection processes)",
                count,
                100 * figures["on_time_share"], figures["lateness_p99_ms"], figures["acked_per_s"],
                figures["expected_per_s"], figures["rabbitmq_cpu_us_per_ack"],
                figures["publisher_cpu_us_per_message"],
                figures["rabbitmq_memory_per_connection_kib"],
                figures["rabbitmq_connection_processes_per_connection_kib"])


@contextlib.contextmanager
def own_rabbitmq(settings: Settings, label: str):
    """A fresh RabbitMQ node for one run (free ports, the bench's certificate authority, the
    topology applied), stopped and removed after it; its settings.

    Why not the bench's own broker: a run leaves two queues per device (its queue and its MQTT
    session queue) that would weigh on the next run's figures, and deleting them took longer than
    the run (about 60 a second on a busy broker: 5 min for 10,000 devices); a node starts in
    about 15 s. Only RabbitMQ: nothing here reads Kafka."""
    base = Path(tempfile.mkdtemp(prefix=f"webos-bench-scale-{label}-"))
    node_settings = fresh_settings(base, pki_dir=settings.pki_dir,
                                   plain_listeners=settings.plain_listeners)
    nodes = start_rabbitmq(node_settings, base, node_name=f"{NODE_PREFIX}-{os.getpid()}")
    try:
        topology.apply(node_settings, devices=[])
        yield node_settings
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_one(settings: Settings, count: int, seconds: float, plain: bool = False) -> dict:
    """Run `count` devices for `seconds` of measurement on a RabbitMQ of their own; the figures
    for that count. `plain`: MQTT without TLS, each device by its password (the baseline TLS is
    measured against)."""
    transport = "plain" if plain else "tls"
    with own_rabbitmq(settings, f"{count}{transport[0]}") as node_settings:
        return _run_devices(node_settings, count, transport, seconds)


def _run_devices(settings: Settings, count: int, transport: str, seconds: float) -> dict:
    plain = transport == "plain"
    devices = [f"bench{count}{transport[0]}-{i:05d}" for i in range(count)]
    setup = {"enrol_seconds": enrol(settings, devices)}
    process = psutil.Process()
    broker = listening_process(settings.mqtt_port)
    if broker is None:
        LOGGER.warning("%d devices: RabbitMQ's process is not visible here; its CPU and RSS are "
                       "not measured", count)
    setup["memory_before"] = broker_memory(settings, broker)
    simulator = Simulator(settings, [DeviceConfig(d, interval=INTERVAL) for d in devices],
                          max_queued_messages=1000, seed=count, plain=plain)
    # The simulator runs inside this process, which holds what earlier benchmarks left: its
    # memory is what RSS grows by from here (a low bound under `make bench`, where it may reuse
    # memory those benchmarks freed; run `python -m bench publisher_scale` alone for the figure).
    setup["rss_before"] = process.memory_info().rss
    try:
        setup["connect_seconds"] = _wait_connected(simulator, broker, count)
        setup["connected"] = simulator.stats()["connected"]
        LOGGER.info("%d devices: %d connected in %.1f s", count, setup["connected"],
                    setup["connect_seconds"])
        setup["memory_connected"] = broker_memory(settings, broker)
        _freeze_heap()
        time.sleep(WARM_UP)  # let the start-up burst settle before measuring
        measured = _measure_window(simulator, process, broker, seconds)
    finally:
        simulator.close()
    figures = _figures(count, transport, setup, measured, broker is not None)
    _log_figures(count, figures)
    return figures


def plot(results: list[dict], path: Path) -> None:
    """On-time share, throughput, CPU and memory against the device count."""
    plt = pyplot()

    counts = [r["devices"] for r in results]
    labels = [str(c) for c in counts]
    slots = list(range(len(counts)))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for axis in (axes[0], axes[2], axes[3]):
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
    width = 0.4
    axes[3].bar([i - width / 2 for i in slots],
                [r.get("rabbitmq_cpu_us_per_ack") or 0 for r in results], width,
                color="#ff8c00", label="RabbitMQ, per ack")
    axes[3].bar([i + width / 2 for i in slots],
                [r.get("publisher_cpu_us_per_message") or 0 for r in results], width,
                color="#4472c4", label="publisher, per message")
    for i, r in enumerate(results):
        if r.get("rabbitmq_memory_per_connection_kib") is not None:
            axes[3].annotate(f"{r['rabbitmq_memory_per_connection_kib']:.0f} KiB/conn.",
                             (i, r.get("rabbitmq_cpu_us_per_ack") or 0), ha="center",
                             va="bottom", fontsize=8)
    axes[3].set(xlabel="devices", ylabel="CPU µs per message")
    axes[3].set_title("CPU per message; RabbitMQ RSS per connection", fontsize=10)
    axes[3].legend(fontsize=8)
    fig.suptitle("publisher scale: one process, one scheduler thread, one MQTT client per device")
    save_figure(fig, path)


def run(settings: Settings, out_dir) -> dict:
    """The figures for every device count, and a PNG plot in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = device_counts()
    seconds = float(os.environ.get("WEBOS_BENCH_SECONDS", "25"))
    # The nodes started below inherit this process's open-files limit: RabbitMQ needs about two
    # files per device, and the simulator one socket per device.
    needed = broker_files_needed(max(counts))
    file_limit = raise_file_limit(needed)
    if file_limit < needed:
        LOGGER.warning("only %d files may be open and %d devices need about %d: expect refused "
                       "connections or failing queues near the end; raise the hard limit "
                       "(ulimit -Hn) to run this size", file_limit, max(counts), needed)
    logging.getLogger("publisher.simulator").setLevel(logging.WARNING)  # no line per device
    # What TLS costs: the same sizes over plain MQTT (per-device passwords), each right after its
    # TLS run.
    results, plain_results = [], []
    for count in counts:
        results.append(run_one(settings, count, seconds))
        if settings.plain_listeners and count in PLAIN_COUNTS:
            plain_results.append(run_one(settings, count, seconds, plain=True))
    image = out_dir / "publisher_scale.png"
    plot(results, image)
    return {"interval_s": list(INTERVAL), "late_threshold_ms": 100, "open_files_limit": file_limit,
            "results": results,
            "plain_results": plain_results, "plot": str(image)}
