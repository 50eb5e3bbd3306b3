"""`make run` as a newcomer types it: every page answers, devices reach Kafka, Ctrl-C stops it all,
a second `make run` keeps the data, `make clean` deletes it; an app that dies is started again, one
that keeps failing is reported.

It runs its own stack (data dir, node name and ports from WEBOS_* variables), so it never touches
a `make run` stack already running on the default ports.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psutil
import requests

from rabbitmq import topology
from rabbitmq import naming
from common.config import PASSWORD_VARIABLES, REPO_ROOT, load_settings
from stack.process import free_port, port_open
from tests.helpers import answers, kafka_consumer, poll_records, wait_for


def stack_environment(tmp_path) -> dict[str, str]:
    """The environment of a stack of its own: data dir, node name, free ports, fresh passwords."""
    env = {**os.environ,
           "WEBOS_STACK_DIR": str(tmp_path / "stack"),
           "WEBOS_RABBITMQ_NODE": f"webos-make-run-{os.getpid()}",
           "WEBOS_AMQP_PORT": str(free_port(20000)),  # + Erlang distribution
           "WEBOS_MQTT_PORT": str(free_port()),
           "WEBOS_MANAGEMENT_PORT": str(free_port()),
           "WEBOS_RABBITMQ_METRICS_PORT": str(free_port()),
           "WEBOS_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port(1)}",  # + controller
           "WEBOS_PUBLISHER_PORT": str(free_port()),
           "WEBOS_CONSUMER_PORT": str(free_port()),
           "WEBOS_BRIDGE_METRICS_PORT": str(free_port()),
           **{name: secrets.token_urlsafe(12) for name in PASSWORD_VARIABLES}}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    return env


APPS = ("publisher", "bridge", "relay", "consumer")
PAGES = ("publisher", "bridge", "consumer")  # the apps that answer HTTP (the relay has none)


def identity(record) -> tuple:
    return record.partition(), record.offset(), record.value()


class MakeRun:
    """`make run` in a process group of its own, as a terminal runs a foreground job; leaving the
    `with` block kills whatever is left and stops the brokers (after a failed test)."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.settings = load_settings(env=env)  # as make run reads them: .env under the environment
        self.pages = {"publisher": f"http://127.0.0.1:{self.settings.publisher_port}/",
                      "consumer": f"http://127.0.0.1:{self.settings.consumer_port}/",
                      "bridge": f"http://127.0.0.1:{self.settings.bridge_metrics_port}/healthz"}
        with open(log_path, "wb") as log:
            self.make = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=REPO_ROOT,
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def __enter__(self) -> "MakeRun":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.make.poll() is None:
            # supervisord runs in a session of its own, each app in a process group of its own:
            # the group's SIGKILL would miss them.
            make = psutil.Process(self.make.pid)
            for process in [make, *make.children(recursive=True)]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
            self.make.wait()
        subprocess.run([sys.executable, "-m", "stack", "down"], env=self.env,
                       cwd=REPO_ROOT, capture_output=True, timeout=180)

    def output(self) -> str:
        return self.log_path.read_text()

    def status(self) -> str:
        """What `python -m stack status` (`make status`) prints for this stack."""
        return subprocess.run([sys.executable, "-m", "stack", "status"], env=self.env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60, check=True).stdout

    def pid(self, name: str) -> int | None:
        """The pid `make status` shows for an app or a broker while it runs."""
        found = re.search(rf"^{name}: running, pid (\d+)", self.status(), re.MULTILINE)
        return int(found.group(1)) if found else None

    def wait_until_up(self, apps=PAGES) -> None:
        """Until the pages of `apps`, a device queue in the management API and, when all apps
        are asked for, the relay (by `make status`) answer."""
        admin = (self.settings.admin_user, self.settings.admin_password)
        device_queue = (f"{self.settings.management_url}/api/queues/{quote(self.settings.vhost, safe='')}/"
                        f"{naming.device_queue(topology.registered_devices(self.settings)[0])}")

        def everything_answers() -> bool:
            assert self.make.poll() is None, f"make run exited early:\n{self.output()[-3000:]}"
            return (all(answers(self.pages[app]) for app in apps)
                    and answers(device_queue, admin, self.settings.ca_file)
                    and (apps != PAGES or self.pid("relay") is not None))
        wait_for(everything_answers, timeout=240, interval=0.5, message="every page of make run")

    def read_kafka(self, enough, timeout: float = 60) -> list:
        """Records of the topic from the start, until `enough(records)` or the timeout."""
        consumer = kafka_consumer(self.settings, [self.settings.kafka_topic])
        try:
            records = poll_records(consumer, enough, timeout)
        finally:
            consumer.close()
        assert {record.key().decode() for record in records} <= set(topology.registered_devices(self.settings))
        return records

    def ctrl_c(self, stopped=APPS) -> str:
        """Press Ctrl-C; check that the apps in `stopped` stopped cleanly, then both brokers, and
        that nothing is left. Returns the output."""
        os.killpg(self.make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        code = self.make.wait(120)
        output = self.output()
        # make itself dies of the SIGINT once its recipe is done (printing "Interrupt"), as for any
        # target; it would print "Error" if `python -m stack run` had not exited 0.
        assert code in (0, -signal.SIGINT), output[-3000:]
        assert not re.search(r"^make: \*\*\*.*Error", output, re.MULTILINE), output[-3000:]
        for app in stopped:
            assert f"stopped: {app} (exit status 0)" in output, output[-3000:]
        # The apps first, then the brokers.
        assert output.rindex("stopped: ") < output.index("stopping brokers"), output[-3000:]
        assert "rabbitmq stopped" in output and "kafka stopped" in output, output[-3000:]
        kafka_port = int(self.settings.kafka_bootstrap.rpartition(":")[2])
        for port in (self.settings.amqp_port, self.settings.mqtt_port, kafka_port,
                     self.settings.publisher_port, self.settings.consumer_port,
                     self.settings.bridge_metrics_port):
            assert not port_open(port), f"port {port} still open after Ctrl-C"
        assert not list(Path(self.env["WEBOS_STACK_DIR"]).glob("*/*.pid")), "a pid file is left"
        assert "running" not in self.status(), self.status()
        return output


def publisher_runs(records, device: str) -> list[list[int]]:
    """One device's seqs in Kafka order, one list per publisher process (each starts at seq 1),
    repeats of a msg_id (redelivered after the bridge was killed) dropped."""
    seen, runs = set(), []
    for record in records:
        payload = json.loads(record.value())
        if record.key() != device.encode() or payload["msg_id"] in seen:
            continue
        seen.add(payload["msg_id"])
        if payload["seq"] == 1 or not runs:
            runs.append([])
        runs[-1].append(payload["seq"])
    return runs


def kill_the_bridge_then_the_publisher(run: MakeRun) -> tuple[list, dict[str, int]]:
    """kill -9 the bridge, then the publisher, each seen started again by make run's supervisor
    while the brokers and the consumer run on; returns Kafka's records once both devices published
    after the restarts, and what RabbitMQ had acknowledged to each device before the kill."""
    brokers = {broker: run.pid(broker) for broker in ("rabbitmq", "kafka")}
    consumer = wait_for(lambda: run.pid("consumer"), 30, message="consumer running")
    for app in ("bridge", "publisher"):
        killed = wait_for(lambda: run.pid(app), 30, message=f"{app} running")
        if app == "publisher":
            devices = requests.get(run.pages["publisher"] + "devices", timeout=5).json()["devices"]
            acked = {device["id"]: device["acked"] for device in devices}
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: run.pid(app) not in (None, killed), 60, interval=0.5,
                 message=f"{app} running again with a new pid (make status)")
        wait_for(lambda: answers(run.pages[app]), 60, interval=0.5,
                 message=f"{app}'s page answering again")
        assert f"exited: {app} (terminated by SIGKILL; not expected)" in run.output()

    assert {broker: run.pid(broker) for broker in brokers} == brokers, "a broker was restarted"
    assert None not in brokers.values()
    assert run.pid("consumer") == consumer, "the consumer was restarted too"
    restarted_ms = time.time() * 1000

    def fresh_devices(records) -> set[str]:
        return {record.key().decode() for record in records
                if json.loads(record.value())["ts"] > restarted_ms}
    devices = set(topology.registered_devices(run.settings))
    records = run.read_kafka(lambda records: fresh_devices(records) == devices)
    assert fresh_devices(records) == devices, "no records after the restarts"
    return records, acked


def test_make_run_restarts_killed_apps_keeps_its_data_and_make_clean_deletes_it(tmp_path):
    # One stack for three checks (a stack's start is most of each one's time).
    env = stack_environment(tmp_path)
    with MakeRun(env, tmp_path / "first-run.log") as first_run:
        first_run.wait_until_up()
        first, acked = kill_the_bridge_then_the_publisher(first_run)
        first_run.ctrl_c()

    # The audit: nothing RabbitMQ acknowledged was lost, across both kills (seq counts per device
    # from 1 in each publisher process; a repeat after the bridge's kill is not a loss).
    for device in topology.registered_devices(first_run.settings):
        killed_run, restarted_run = publisher_runs(first, device)
        assert acked[device] > 0
        assert set(range(1, acked[device] + 1)) <= set(killed_run), f"{device}: acknowledged, lost"
        for seqs in (killed_run, restarted_run):
            assert seqs == list(range(1, len(seqs) + 1)), f"{device}: a gap or reordering"
    kept = {identity(record) for record in first}

    # Again on the same data: Kafka still has the first run's records, new ones follow.
    with MakeRun(env, tmp_path / "second-run.log") as second_run:
        second_run.wait_until_up()
        second = second_run.read_kafka(
            lambda records: kept <= {identity(r) for r in records} and len(records) >= len(kept) + 4)
        second_run.ctrl_c()
    assert kept <= {identity(record) for record in second}, "the first run's records are gone"
    assert len(second) >= len(kept) + 4, "no new records after the second make run"

    cleaned = subprocess.run(["make", "--no-print-directory", "clean"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not (tmp_path / "stack" / "rabbitmq").exists(), "make clean left RabbitMQ's data"
    assert not (tmp_path / "stack" / "kafka").exists(), "make clean left Kafka's data"
    # The certificates stay: real devices enrolled with them keep working after a clean.
    assert (tmp_path / "stack" / "pki" / "ca.crt").exists()


def test_make_run_reports_an_app_that_keeps_failing_at_start(tmp_path):
    # The bridge exits 2 at once (a configuration error) when a queue it is told to read is missing.
    env = {**stack_environment(tmp_path), "WEBOS_BRIDGE_QUEUES": "webos.no-such-queue"}
    with MakeRun(env, tmp_path / "run.log") as run:
        run.wait_until_up(apps=("publisher", "consumer"))
        others = {app: wait_for(lambda: run.pid(app), 30, message=f"{app} running")
                  for app in ("publisher", "consumer")}

        wait_for(lambda: "bridge: backing off" in run.status(), 60, interval=0.2,
                 message="make status: the bridge backing off")
        wait_for(lambda: "bridge: gave up after 6 failed starts" in run.status(), 120, interval=1,
                 message="make status: the bridge given up")
        wait_for(lambda: "bridge gave up: 6 failed starts in a row" in run.output(), 5,
                 message="a line in the log saying so")

        output = run.output()
        assert re.search(r"^bridge +\| .*configuration error: .*webos\.no-such-queue", output,
                         re.MULTILINE), output[-3000:]
        assert "exited: bridge (exit status 2; not expected)" in output
        for failed in range(1, 6):
            plural = "s" if failed > 1 else ""
            assert f"start{plural} in a row): backing off, next start in {failed} s" in output
        assert {app: run.pid(app) for app in others} == others, "the other apps were disturbed"
        assert run.pid("rabbitmq") and run.pid("kafka")
        run.ctrl_c(stopped=("publisher", "consumer"))
