"""What the benchmarks share: the machine they ran on, a bridge as a child process and its
/metrics, a queue's depth, and a sampler of each process's CPU and memory (with Kafka's JVM)."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import signal
import struct
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bridge.metrics import parse_samples
from common.config import REPO_ROOT, Settings
from rabbitmq import endpoints
from stack.process import AppProcess, free_port


def machine() -> dict:
    """What the figures were measured on."""
    return {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
            "kernel": platform.release()}


def repo_path(path: Path) -> str:
    """`path` as the figures name it: relative to the repository when it lies inside it."""
    return str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def write_figures(out_dir: Path, name: str, command: str, figures: dict) -> Path:
    """`name`.json in `out_dir`: the date, the machine, the command that measured and `figures`."""
    path = Path(out_dir) / f"{name}.json"
    path.write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
                                "command": command, **figures}, indent=2) + "\n")
    return path


def queue_depth(settings: Settings, queue: str) -> int:
    """Ready plus unacked messages of `queue`, from the management API."""
    # Unfiltered: with ?columns= RabbitMQ answers [] for a queue that has no statistics yet.
    with endpoints.management_api(settings) as http:
        response = http.get(f"{settings.management_url}/api/queues/%2F/{queue}", timeout=10)
    response.raise_for_status()
    return response.json().get("messages", 0)  # absent until the first statistics


def metric(text: str, name: str) -> float:
    return parse_samples(text).get(name, 0.0)


def start_bridge(settings: Settings, queues: list[str], log_path: Path,
                 extra: list[str] = ()) -> tuple[AppProcess, str]:
    """`python -m bridge` with its defaults, consuming `queues`; returns (process, metrics URL)."""
    port = free_port()
    bridge = AppProcess(["bridge", "--queues", ",".join(queues), "--metrics-port", str(port),
                         *extra], {**os.environ, **settings.to_env()}, log_path)
    return bridge, f"http://127.0.0.1:{port}"


def thread_times(pid: int) -> dict[int, tuple[str, float, int]]:
    """Each thread of process `pid` now: thread id -> (its name, CPU seconds used, user plus
    system, and voluntary context switches so far: how often it went to sleep), from
    /proc/<pid>/task. psutil's own counts cover the main thread only."""
    ticks, threads = os.sysconf("SC_CLK_TCK"), {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            switches = next(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                            if line.startswith("voluntary_ctxt_switches:"))
        except (OSError, ValueError, StopIteration):
            continue  # a thread that ended meanwhile
        threads[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / ticks, switches)
    return threads


SAMPLE_PERIOD = 0.5  # seconds between resource samples


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


def parse_perfdata(data: bytes) -> dict[str, int]:
    """The scalar long counters of a HotSpot hsperfdata file (name -> value)."""
    if data[:4] != b"\xca\xfe\xc0\xc0":
        raise ValueError("not a HotSpot hsperfdata file")
    order = "<" if data[4] == 1 else ">"
    entry, entries = struct.unpack_from(order + "ii", data, 24)
    counters = {}
    for _ in range(entries):
        length, name_at, vector_length, data_type = struct.unpack_from(order + "iiib", data, entry)
        data_at = struct.unpack_from(order + "i", data, entry + 16)[0]
        if length <= 0:
            break
        if vector_length == 0 and data_type == ord("J"):
            name_end = data.index(b"\0", entry + name_at)
            name = data[entry + name_at:name_end].decode("ascii", "replace")
            counters[name] = struct.unpack_from(order + "q", data, entry + data_at)[0]
        entry += length
    return counters


# hsperfdata counters (ticks of sun.os.hrt.frequency) summed into each figure, as JDK 17 names them.
JVM_COUNTERS = {"paused": ("sun.rt.safepointTime",),
                "compiling": ("sun.ci.standardTime", "sun.ci.osrTime")}


def jvm_seconds(process: psutil.Process | None) -> dict[str, float] | None:
    """Seconds a HotSpot JVM has spent, since it started, stopped in safepoints (`paused`: its
    garbage collector's pauses among them) and in its JIT compiler (`compiling`), from its
    hsperfdata file; None where that is not readable."""
    if process is None:
        return None
    try:
        path = Path(tempfile.gettempdir()) / f"hsperfdata_{process.username()}" / str(process.pid)
        counters = parse_perfdata(path.read_bytes())
        ticks = counters["sun.os.hrt.frequency"]
        return {name: sum(counters[counter] for counter in names) / ticks
                for name, names in JVM_COUNTERS.items()}
    except (OSError, ValueError, KeyError, struct.error, ZeroDivisionError, psutil.Error):
        return None


def _jvm_delta(now: dict | None, then: dict | None) -> dict[str, float] | None:
    if now is None or then is None:
        return None
    return {name: round(now[name] - then[name], 4) for name in now}


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle, sum(times)


class ResourceSampler:
    """Samples RSS and CPU of named processes (each with its children, except those named in
    `alone`) every SAMPLE_PERIOD s; keeps the series too (`series`: per process, `machine`:
    % of all cores busy, `others`: % of one core used by every other process, `jvm_paused` and
    `jvm_compiling`: seconds the JVM of the process named `jvm` stood still or compiled), each
    point (seconds since start, value over the interval that ended then)."""

    def __init__(self, processes: dict[str, psutil.Process | None], alone=(),
                 jvm: str | None = None):
        self.processes = {name: p for name, p in processes.items() if p is not None}
        self.alone = set(alone)
        self.peak_rss = {name: 0 for name in self.processes}
        self.peak_cpu = {name: 0.0 for name in self.processes}
        self.start_rss: dict[str, int] = {}
        self.cpu_start: dict[str, float] = {}
        self.cpu_end: dict[str, float] = {}
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in self.processes}
        self.machine: list[tuple[float, float]] = []
        # CPU of every other process on the machine, % of one core: machine minus those sampled.
        self.others: list[tuple[float, float]] = []
        self.cores = psutil.cpu_count() or 1
        self.jvm = self.processes.get(jvm) if jvm else None
        self.jvm_paused: list[tuple[float, float]] = []
        self.jvm_compiling: list[tuple[float, float]] = []
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
        self.machine_start = _machine_busy()
        self.jvm_start = jvm_seconds(self.jvm)
        for name in self.processes:
            self.start_rss[name], self.cpu_start[name] = self._measure(name)
        self.thread.start()

    def run(self) -> None:
        last = {name: (time.monotonic(), self.cpu_start[name]) for name in self.processes}
        machine_then, jvm_then = self.machine_start, self.jvm_start
        while not self.stop_event.wait(SAMPLE_PERIOD):
            own = 0.0
            for name in self.processes:
                rss, cpu = self._measure(name)
                now = time.monotonic()
                self.peak_rss[name] = max(self.peak_rss[name], rss)
                then, cpu_then = last[name]
                percent = (cpu - cpu_then) / (now - then) * 100
                self.peak_cpu[name] = max(self.peak_cpu[name], percent)
                self.series[name].append((round(now - self.started, 3), round(percent, 1)))
                own += percent
                last[name] = (now, cpu)
            machine_now, offset = _machine_busy(), round(time.monotonic() - self.started, 3)
            if machine_now[1] > machine_then[1]:
                busy = 100 * (machine_now[0] - machine_then[0]) / (machine_now[1] - machine_then[1])
                self.machine.append((offset, round(busy, 1)))
                self.others.append((offset, round(max(0.0, busy * self.cores - own), 1)))
            machine_then = machine_now
            jvm_now = jvm_seconds(self.jvm)
            jvm = _jvm_delta(jvm_now, jvm_then)
            if jvm is not None:
                self.jvm_paused.append((offset, jvm["paused"]))
                self.jvm_compiling.append((offset, jvm["compiling"]))
            jvm_then = jvm_now

    def stop(self) -> dict:
        """Stop sampling; per process: RSS at start, peak and end (MB), mean and peak CPU (% of
        one core)."""
        self.stop_event.set()
        self.thread.join(5)
        elapsed = time.monotonic() - self.started
        busy, total = _machine_busy()
        self.machine_mean = (round(100 * (busy - self.machine_start[0])
                                   / (total - self.machine_start[1]), 1)
                             if total > self.machine_start[1] else None)
        self.jvm_total = _jvm_delta(jvm_seconds(self.jvm), self.jvm_start)  # seconds, or None
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


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path) -> None:
    """Write a benchmark's figure as a PNG and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot().close(figure)


def sigterm_as_interrupt() -> None:
    """SIGTERM from now on raises KeyboardInterrupt, as Ctrl-C does: a long run stopped either
    way leaves through its `finally` blocks (brokers stopped, results kept)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)


def report_run(name: str, result: dict, text: str, failures: list[str], work: Path) -> int:
    """The end of a long run (make soak, make outage): bench/results/<name>-<date>.json and .md,
    the work directory removed when it passed and kept (and named) when not; the exit code."""
    if failures:
        logging.getLogger(name).error("the brokers' data and the apps' logs are kept in %s", work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    stem = results / f"{name}-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"{'FAILED: ' + '; '.join(failures) if failures else 'ok'}: results in {stem}.json and .md")
    return 1 if failures else 0
