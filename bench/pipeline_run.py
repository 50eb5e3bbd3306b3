"""Running the whole pipeline for a fixed number of messages, with faults, then auditing it.

`python -m publisher` (N simulated devices) and `python -m bridge` run as real subprocesses against
the given brokers; a Kafka consumer in a fresh group reads the run's own topic from the beginning
while the stream runs. When every device has published its share (the harness turns each device
Inactive through the publisher's REST API once its `seq` reached it) and RabbitMQ acknowledged
every message, the harness waits until every published `seq` is in Kafka or a deadline passes,
then reports per device: published, arrived, missing (by `seq`), duplicated (by `msg_id`) and out
of order (a first arrival with a lower `seq` than one already seen).

Faults are injected from the caller's thread while the stream runs in the harness's threads:

    with PipelineRun(settings, work_dir, devices=100, messages=20_000) as run:
        run.start()
        run.wait_published(5_000)
        run.kill_bridge(); run.start_bridge()
        report = run.finish()
    assert report.ok, report.summary()

or `audit(settings, work_dir, ...)` for a run without faults. The audit itself (what the report
says and how it is computed) is bench/audit.py.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import requests
from confluent_kafka import KafkaError

from bench.audit import AuditReport, audit_records
from bench.common import start_bridge
from bridge.metrics import parse_samples
from common.config import Settings
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from stack.kafka_server import TopicReader, ensure_topic
from stack.process import AppProcess, answers, free_port, wait_until

LOGGER = logging.getLogger(__name__)
POLL_INTERVAL = 0.1  # s between reads of the publisher's GET /devices while streaming
HTTP_TIMEOUT = 10.0
# librdkafka logs every refused connection while a broker is down on purpose: keep errors only.
_KAFKA_LOGGER = logging.getLogger("bench.audit.kafka")
_KAFKA_LOGGER.setLevel(logging.ERROR)


CLEANUP_SECONDS = 120.0  # the longest close() waits for the run's queues to be deleted


class AuditError(RuntimeError):
    """The pipeline could not be run as asked (a process exited, a deadline passed)."""


# ---------------------------------------------------------------------------------------------
# Reading Kafka while the stream runs

class KafkaTally(TopicReader):
    """A thread reading every partition of one topic from the beginning: (seq, msg_id) per device.

    Partitions are assigned (TopicReader): no group membership, so a Kafka restart neither
    stalls the reader until the old member's session expires nor rewinds it to the beginning
    (it has committed nothing). Offsets already read are skipped all the same, so a record is
    counted once however often it is read; duplicates are distinct records with one msg_id.
    """

    batch = 1000
    join_seconds = 15.0

    def __init__(self, settings: Settings, topic: str):
        super().__init__(settings.kafka_bootstrap, topic,
                         config={"group.id": f"audit-{uuid.uuid4().hex[:10]}",
                                 "enable.partition.eof": False, "logger": _KAFKA_LOGGER})
        self.topic = topic
        self.arrivals: dict[str, list[tuple[int, str]]] = {}
        self.count = 0
        self.foreign = 0
        self.errors: list[str] = []
        self._next_offset: dict[int, int] = {}
        self._lock = threading.Lock()

    def on_record(self, record) -> None:
        error = record.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                self.errors.append(str(error))
            return
        partition, offset = record.partition(), record.offset()
        if offset < self._next_offset.get(partition, 0):
            return  # read again after a reconnect: the same record, not a duplicate
        self._next_offset[partition] = offset + 1
        try:
            payload = json.loads(record.value())
            entry = (int(payload["seq"]), str(payload["msg_id"]))
            device = record.key().decode()
        except (ValueError, TypeError, KeyError, AttributeError):
            self.foreign += 1
            return
        with self._lock:
            self.arrivals.setdefault(device, []).append(entry)
            self.count += 1

    def distinct(self, device: str) -> int:
        """Distinct seqs of `device` read so far."""
        with self._lock:
            return len({seq for seq, _ in self.arrivals.get(device, ())})

    def complete(self, published: dict[str, int], dropped: dict[str, int] | None = None) -> bool:
        """True when every seq 1..published[device] of every device has been read, but for the
        `dropped[device]` ones the publisher never sent (its buffer was full)."""
        with self._lock:
            for device, last in published.items():
                seqs = {seq for seq, _ in self.arrivals.get(device, ())}
                found = sum(1 for seq in range(1, last + 1) if seq in seqs)
                if found < last - (dropped or {}).get(device, 0):
                    return False
        return True

    def snapshot(self) -> dict[str, list]:
        with self._lock:
            return {device: list(entries) for device, entries in self.arrivals.items()}


# ---------------------------------------------------------------------------------------------
# The processes

class ChildProcess(AppProcess):
    """One `python -m <package>` child of the run, its output in a file."""

    def __init__(self, name: str, args: list[str], settings: Settings, log_path: Path):
        super().__init__(args, {**os.environ, **settings.to_env()}, log_path, name)
        LOGGER.info("%s started (pid %d), log %s", name, self.pid, log_path)



class PipelineRun:
    """Publisher + bridge as subprocesses over the given brokers, audited through Kafka."""

    def __init__(self, settings: Settings, work_dir: Path, *, devices: int = 100,
                 messages: int = 20_000, interval: tuple[float, float] = (0.05, 0.05),
                 prefix: str | None = None, topic: str | None = None, partitions: int = 6,
                 bridge_flags: tuple[str, ...] = (), max_queued: int = 100_000,
                 declare: bool = True, replication: int = 1):
        self.settings = settings
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = uuid.uuid4().hex[:8]
        prefix = prefix or f"A{self.run_id}"
        self.devices = [f"{prefix}-{i:04d}" for i in range(devices)]
        self.queues = [naming.device_queue(d) for d in self.devices]
        self.messages = messages
        # Each device's share of the messages; the first ones take the remainder.
        base, extra = divmod(messages, devices)
        self.shares = {d: base + (1 if i < extra else 0) for i, d in enumerate(self.devices)}
        self.interval = interval
        self.topic = topic or f"audit.{self.run_id}"
        self.partitions = partitions
        self.bridge_flags = tuple(bridge_flags)
        self.max_queued = max_queued
        self.declare = declare
        self.replication = replication  # of the run's Kafka topic
        self.publisher: ChildProcess | None = None
        self.publisher_url = ""
        self.bridge: AppProcess | None = None
        self.bridges: list[AppProcess] = []
        self._metrics_urls: dict[AppProcess, str] = {}  # each bridge's /metrics
        self.bridge_exit_codes: list[int] = []
        self.tally: KafkaTally | None = None
        self.rows: dict[str, dict] = {}        # last GET /devices row per device
        self.published = 0                     # sum of seq over the devices, last read
        self.stopped: set[str] = set()         # devices turned Inactive by the harness
        self.timeline: list[tuple[float, str]] = []
        self.started_at = 0.0
        self._streaming = threading.Event()
        self._stream_done = threading.Event()
        self._stream_error: BaseException | None = None
        self._streamer: threading.Thread | None = None
        self._http = requests.Session()

    # -- context manager: whatever happens, the children are stopped and the queues removed --

    def __enter__(self) -> "PipelineRun":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def note(self, event: str) -> None:
        """Record an event on the run's timeline (seconds since start)."""
        at = time.monotonic() - self.started_at if self.started_at else 0.0
        self.timeline.append((round(at, 2), event))
        LOGGER.info("audit %s +%.1f s: %s", self.run_id, at, event)
        with open(self.work_dir / "timeline.log", "a") as timeline:  # beside the children's logs
            timeline.write(f"{time.strftime('%H:%M:%S')} +{at:.1f} s {event}\n")

    # -- starting ---------------------------------------------------------------------------

    def start(self, bridges: int = 1) -> None:
        """`prepare(bridges)`, then `stream()`."""
        self.prepare(bridges)
        self.stream()

    def prepare(self, bridges: int = 1) -> None:
        """Declare queues and topic, start the Kafka reader and `bridges` bridge instances (each
        consuming before the next starts)."""
        self.started_at = time.monotonic()
        if self.declare:
            self._declare_queues()
        ensure_topic(self.settings.kafka_bootstrap, self.topic, self.partitions, self.replication)
        self.tally = KafkaTally(self.settings, self.topic).start()
        for _ in range(bridges):
            self.start_bridge()

    def stream(self) -> None:
        """Start the publisher, and the harness's thread that turns each device Inactive once it
        published its share."""
        self._start_publisher()
        self._streamer = threading.Thread(target=self._stream, name="audit-stream", daemon=True)
        self._streamer.start()
        self.note(f"streaming {self.messages} messages from {len(self.devices)} devices")

    def _declare_queues(self) -> None:
        """Each device's certificate, broker user and queue (the publisher then prepares none)."""
        topology.enrol_devices(self.settings, self.devices)
        topology.declare_devices(self.settings, self.devices)

    def start_bridge(self, wait: bool = True) -> AppProcess:
        """Start a `python -m bridge` for this run's queues and topic; wait until it consumes."""
        bridge, metrics_url = start_bridge(
            self.settings, self.queues, self.work_dir / f"bridge-{len(self.bridges) + 1}.log",
            ["--topic-template", self.topic, *self.bridge_flags])
        self._metrics_urls[bridge] = metrics_url + "/metrics"
        self.bridge = bridge
        self.bridges.append(bridge)
        if wait:
            self.wait_bridge_consuming()
        self.note(f"bridge {len(self.bridges)} started (pid {bridge.process.pid})")
        return bridge

    def bridge_instance(self, bridge: AppProcess) -> str:
        """The bridge's instance name: its default, <host name>:<metrics port>."""
        return f"{socket.gethostname()}:{self._metrics_urls[bridge].rsplit(':', 1)[1].split('/')[0]}"

    def bridge_metric(self, name: str, bridge: AppProcess | None = None) -> float | None:
        """One sample of `bridge`'s /metrics (default: the current bridge's), None when it does
        not answer."""
        try:
            text = self._http.get(self._metrics_urls[bridge or self.bridge], timeout=2).text
        except requests.RequestException:
            return None
        return parse_samples(text).get(name)

    def wait_bridge_consuming(self, timeout: float = 60.0) -> None:
        """Until the current bridge consumes every queue of the run (its webos_bridge_queues)."""
        wait_until(lambda: (self.bridge_metric("webos_bridge_queues") or 0) >= len(self.queues),
                   timeout, 0.1, f"the bridge to consume {len(self.queues)} queues",
                   watch=[self.bridge])

    def kill_bridge(self, bridge: AppProcess | None = None) -> int:
        """kill -9 `bridge` (default: the current one; the one started before it becomes the
        current one); returns its exit code (-9)."""
        bridge = bridge or self.bridge
        code = bridge.kill()
        self.bridge_exit_codes.append(code)
        self.note(f"bridge {self.bridges.index(bridge) + 1} killed (exit {code})")
        if bridge is self.bridge:
            alive = [other for other in self.bridges if other.running]
            self.bridge = alive[-1] if alive else bridge
        return code

    def _start_publisher(self) -> None:
        port = free_port()
        low, high = self.interval
        self.publisher = ChildProcess(
            "publisher", ["publisher", "--port", str(port), "--devices", ",".join(self.devices),
                          "--interval", str(low), str(high), "--max-queued", str(self.max_queued),
                          "--no-prepare", "--log-level", "WARNING"],
            self.settings, self.work_dir / "publisher.log")
        self.publisher_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(self.publisher_url + "/devices"), 60, 0.1,
                   "the publisher to answer", watch=[self.publisher])

    # -- streaming (the harness's thread) -----------------------------------------------------

    def read_devices(self) -> dict[str, dict]:
        """GET /devices: this run's rows by device id; also updates `published`."""
        answer = self._http.get(self.publisher_url + "/devices", timeout=HTTP_TIMEOUT)
        answer.raise_for_status()
        rows = {row["id"]: row for row in answer.json()["devices"] if row["id"] in self.shares}
        self.rows = rows
        self.published = sum(row["seq"] for row in rows.values())
        return rows

    def _stream(self) -> None:
        """Turn each device Inactive once its seq reached its share; until all are."""
        try:
            with ThreadPoolExecutor(8, thread_name_prefix="audit-status") as pool:
                while len(self.stopped) < len(self.devices):
                    self.publisher.check_running()
                    rows = self.read_devices()
                    due = [d for d, row in rows.items()
                           if d not in self.stopped and row["seq"] >= self.shares[d]]
                    for answer in pool.map(self._deactivate, due):
                        answer.raise_for_status()
                    self.stopped.update(due)
                    self._streaming.set()
                    time.sleep(POLL_INTERVAL)  # the publisher's cadence, not a wait on a condition
            self.read_devices()
            self.note(f"every device Inactive, {self.published} published")
        except BaseException as error:  # handed to the caller's thread by wait_* and finish
            self._stream_error = error
        finally:
            self._stream_done.set()

    def _deactivate(self, device: str) -> requests.Response:
        return self._http.post(f"{self.publisher_url}/status/{device}",
                               json={"status": "Inactive"}, timeout=HTTP_TIMEOUT)

    def _check_stream(self) -> None:
        if self._stream_error is not None:
            raise AuditError(f"the stream failed: {self._stream_error!r}") from self._stream_error

    def wait_published(self, count: int, timeout: float = 120.0) -> int:
        """Block the caller until the devices published `count` messages in all (or more)."""
        def reached() -> bool:
            self._check_stream()
            return self.published >= count or self._stream_done.is_set()
        wait_until(reached, timeout, 0.05, f"{count} messages published")
        self.note(f"{self.published} published")
        return self.published

    @property
    def streaming(self) -> bool:
        """True until every device published its share (a fault injected now is mid-stream)."""
        return not self._stream_done.is_set()

    def wait_stream_done(self, timeout: float = 300.0) -> None:
        """Until every device published its share and was turned Inactive."""
        if not self._stream_done.wait(timeout):
            raise AuditError(f"the stream did not end within {timeout:.0f} s "
                             f"({self.published} of {self.messages} published)")
        self._check_stream()

    # -- finishing ----------------------------------------------------------------------------

    def wait_acked(self, timeout: float = 120.0) -> None:
        """Until RabbitMQ acknowledged every message the publisher handed to MQTT."""
        wait_until(lambda: all(row["acked"] >= row["messages"]
                               for row in self.read_devices().values()),
                   timeout, 0.2, "RabbitMQ to acknowledge every message the publisher sent")

    def finish(self, timeout: float = 180.0, stream_timeout: float = 300.0) -> AuditReport:
        """End the stream, stop the publisher, wait for Kafka to hold everything, audit it."""
        self.wait_stream_done(stream_timeout)
        stream_seconds = time.monotonic() - self.started_at
        self.wait_acked(timeout)
        final = {d: dict(row) for d, row in self.read_devices().items()}
        publisher_code = self.publisher.stop(60)
        self.note(f"publisher stopped (exit {publisher_code}); waiting for Kafka")
        published = {d: row["seq"] for d, row in final.items()}
        dropped = {d: row["dropped"] for d, row in final.items()}
        deadline = time.monotonic() + timeout
        while not self.tally.complete(published, dropped) and time.monotonic() < deadline:
            if self.bridge is not None and not self.bridge.running:
                break  # nothing more will arrive
            time.sleep(0.2)
        complete_seconds = time.monotonic() - self.started_at
        self.note(f"Kafka holds {self.tally.count} records")
        if self.bridge is not None and self.bridge.running:
            self.bridge_exit_codes.append(self.bridge.stop(60))
        self.tally.stop()
        arrivals = self.tally.snapshot()
        report = audit_records(final, arrivals, self.topic, self.tally.foreign)
        if not report.ok:  # the evidence, for whoever reads the failure
            evidence = {d.device: [seq for seq, _ in arrivals.get(d.device, ())]
                        for d in report.devices if not d.ok}
            (self.work_dir / "arrivals.json").write_text(json.dumps(evidence))
        report.figures = {
            "stream_seconds": round(stream_seconds, 1),
            "published_per_s": round(report.published / stream_seconds, 1),
            "all_in_kafka_seconds": round(complete_seconds, 1),
            "bridges_started": len(self.bridges),
            "bridge_exit_codes": self.bridge_exit_codes,
            "publisher_exit_code": publisher_code,
            "kafka_errors": self.tally.errors[:5],
            "timeline": self.timeline,
        }
        LOGGER.info("audit %s: %s", self.run_id, report.summary())
        return report

    def close(self) -> None:
        """Stop whatever still runs and delete the run's queues."""
        for child in [self.publisher, *self.bridges]:
            if child is not None and child.running:
                child.kill()
        if self.tally is not None and self.tally.thread.is_alive():
            self.tally.stop()
        if self.declare:
            # A queue.delete waits for the queue: on a cluster still missing a node (a fault
            # that did not heal) that may be minutes. The run ends anyway; the queues stay.
            cleaner = threading.Thread(target=self._delete_queues, name="audit-cleanup",
                                       daemon=True)
            cleaner.start()
            cleaner.join(CLEANUP_SECONDS)
            if cleaner.is_alive():  # it goes on by itself (a daemon thread, its own connection)
                LOGGER.warning("the run's queues were not all deleted within %.0f s: the rest "
                               "is deleted in the background or left", CLEANUP_SECONDS)
        self._http.close()

    def _delete_queues(self) -> None:
        try:
            with pika.BlockingConnection(endpoints.admin_parameters(self.settings)) as connection:
                channel = connection.channel()
                for device in self.devices:
                    topology.delete_device(channel, device)
            topology.remove_enrolments(self.settings, self.devices)
        except (pika.exceptions.AMQPError, requests.RequestException, OSError) as error:
            LOGGER.warning("could not delete the run's queues and users: %r", error)


def audit(settings: Settings, work_dir: Path, *, timeout: float = 180.0,
          **options) -> AuditReport:
    """One audited run without faults (the fault tests drive a PipelineRun themselves)."""
    with PipelineRun(settings, work_dir, **options) as pipeline:
        pipeline.start()
        return pipeline.finish(timeout)


# ---------------------------------------------------------------------------------------------
# `make bench`

def run(settings: Settings, out_dir) -> dict:
    """A clean audited run (WEBOS_BENCH_AUDIT_DEVICES x _MESSAGES, default 100 x 20,000)."""
    import tempfile

    devices = int(os.environ.get("WEBOS_BENCH_AUDIT_DEVICES", "100"))
    messages = int(os.environ.get("WEBOS_BENCH_AUDIT_MESSAGES", "20000"))
    with tempfile.TemporaryDirectory(prefix="webos-audit-") as work_dir:
        report = audit(settings, Path(work_dir), devices=devices, messages=messages)
    LOGGER.info("audit: %s", report.summary())
    return report.to_json()
