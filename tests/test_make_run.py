"""`make run` as a newcomer types it: every page answers, devices reach Kafka, Ctrl-C stops it all,
a second `make run` keeps the data, `make clean` deletes it.

It runs its own stack (data dir, node name and ports from WEBOS_* variables), so it never touches
a `make run` stack already running on the default ports.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psutil

from rabbitmq import topology
from stack.config import REPO_ROOT, load_settings
from stack.process import free_port, port_open
from tests.helpers import answers, consume, kafka_consumer, wait_for


def free_port_with_neighbour(offset: int) -> int:
    """A free port whose port + `offset` is free too (RabbitMQ's distribution port, Kafka's
    controller port)."""
    while True:
        port = free_port()
        if port + offset <= 65535 and not port_open(port + offset):
            return port


def stack_environment(tmp_path) -> dict[str, str]:
    """The environment of a stack of its own: data dir, node name, free ports, fresh passwords."""
    env = {**os.environ,
           "WEBOS_STACK_DIR": str(tmp_path / "stack"),
           "WEBOS_RABBITMQ_NODE": f"webos-make-run-{os.getpid()}",
           "WEBOS_AMQP_PORT": str(free_port_with_neighbour(20000)),
           "WEBOS_MQTT_PORT": str(free_port()),
           "WEBOS_MANAGEMENT_PORT": str(free_port()),
           "WEBOS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port_with_neighbour(1)}",
           "WEBOS_PUBLISHER_PORT": str(free_port()),
           "WEBOS_CONSUMER_PORT": str(free_port()),
           "WEBOS_BRIDGE_METRICS_PORT": str(free_port()),
           **{name: secrets.token_urlsafe(12) for name in
              ("WEBOS_ADMIN_PASSWORD", "WEBOS_DEVICE_PASSWORD", "WEBOS_BRIDGE_PASSWORD")}}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    return env


def identity(record) -> tuple:
    return record.partition(), record.offset(), record.value()


def make_run_until_ctrl_c(env: dict[str, str], log_path, enough) -> list:
    """`make run`; once every page answers, read the topic from the start until `enough(records)`,
    press Ctrl-C, check everything stopped cleanly. Returns the records."""
    settings = load_settings(env=env)  # as make run reads them: .env under the environment
    with open(log_path, "wb") as log:
        # Its own process group, as a terminal gives a foreground job.
        make = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pages = [f"http://127.0.0.1:{settings.publisher_port}/",
             f"http://127.0.0.1:{settings.consumer_port}/",
             f"http://127.0.0.1:{settings.bridge_metrics_port}/healthz"]
    admin = (settings.admin_user, settings.admin_password)
    device_queue = (f"{settings.management_url}/api/queues/{quote(settings.vhost, safe='')}/"
                    f"{topology.device_queue(settings.devices[0])}")

    def everything_answers() -> bool:
        assert make.poll() is None, f"make run exited early:\n{log_path.read_text()[-3000:]}"
        return all(answers(page) for page in pages) and answers(device_queue, admin)

    try:
        wait_for(everything_answers, timeout=240, interval=0.5, message="every page of make run")
        consumer = kafka_consumer(settings, [settings.kafka_topic])
        records = []
        try:
            deadline = time.monotonic() + 60
            while not enough(records) and time.monotonic() < deadline:
                records += consume(consumer, 1, timeout=1)
        finally:
            consumer.close()
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = make.wait(120)
    finally:
        if make.poll() is None:
            # honcho starts each app in a session of its own: the group's SIGKILL would miss them.
            for process in [psutil.Process(make.pid), *psutil.Process(make.pid).children(recursive=True)]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            make.wait()
        subprocess.run([sys.executable, "-m", "stack", "down"], env=env,
                       cwd=REPO_ROOT, capture_output=True, timeout=180)
    output = log_path.read_text()
    # make itself dies of the SIGINT once its recipe is done (printing "Interrupt"), as for any
    # target: what shows a clean stop is every app's exit code and both brokers stopped.
    assert code in (0, -signal.SIGINT), output[-3000:]
    for app in ("publisher", "bridge", "consumer"):
        assert f"{app}.1 stopped (rc=0)" in output, output[-3000:]
    assert "rabbitmq stopped" in output and "kafka stopped" in output, output[-3000:]
    kafka_port = int(settings.kafka_bootstrap.rpartition(":")[2])
    for port in (settings.amqp_port, settings.mqtt_port, kafka_port, settings.publisher_port):
        assert not port_open(port), f"port {port} still open after Ctrl-C"
    assert not list(Path(env["WEBOS_STACK_DIR"]).glob("*/*.pid")), "a broker's pid file is left"
    assert {record.key().decode() for record in records} <= set(settings.devices)
    return records


def test_make_run_twice_then_make_clean(tmp_path):
    env = stack_environment(tmp_path)

    first = make_run_until_ctrl_c(env, tmp_path / "first-run.log", lambda records: len(records) >= 4)
    assert len(first) >= 4, "the simulated devices' messages did not reach Kafka"
    kept = {identity(record) for record in first}

    # Again on the same data: Kafka still has the first run's records, new ones follow.
    second = make_run_until_ctrl_c(
        env, tmp_path / "second-run.log",
        lambda records: kept <= {identity(r) for r in records} and len(records) >= len(kept) + 4)
    assert kept <= {identity(record) for record in second}, "the first run's records are gone"
    assert len(second) >= len(kept) + 4, "no new records after the second make run"

    cleaned = subprocess.run(["make", "--no-print-directory", "clean"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not (tmp_path / "stack").exists(), "make clean left the brokers' data"
