"""`make run` as a newcomer types it: every page answers, devices reach Kafka, Ctrl-C stops it all,
`make clean` deletes its data.

It runs its own stack (data dir, node name and ports from WEBOS_* variables), so it never touches
a `make run` stack already running on the default ports.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
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


def test_make_run_serves_every_page_forwards_devices_stops_on_ctrl_c_and_make_clean_wipes(tmp_path):
    kafka_port = free_port_with_neighbour(1)
    env = {**os.environ,
           "WEBOS_STACK_DIR": str(tmp_path / "stack"),
           "WEBOS_RABBITMQ_NODE": f"webos-make-run-{os.getpid()}",
           "WEBOS_AMQP_PORT": str(free_port_with_neighbour(20000)),
           "WEBOS_MQTT_PORT": str(free_port()),
           "WEBOS_MANAGEMENT_PORT": str(free_port()),
           "WEBOS_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
           "WEBOS_PUBLISHER_PORT": str(free_port()),
           "WEBOS_CONSUMER_PORT": str(free_port()),
           "WEBOS_BRIDGE_METRICS_PORT": str(free_port()),
           **{name: secrets.token_urlsafe(12) for name in
              ("WEBOS_ADMIN_PASSWORD", "WEBOS_DEVICE_PASSWORD", "WEBOS_BRIDGE_PASSWORD")}}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    settings = load_settings(env=env)  # as make run reads them: .env under the environment
    log_path = tmp_path / "make-run.log"
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
        return (all(answers(page) for page in pages)
                and answers(device_queue, admin))

    try:
        wait_for(everything_answers, timeout=240, interval=0.5, message="every page of make run")
        consumer = kafka_consumer(settings, [settings.kafka_topic])
        try:
            records = consume(consumer, 4, timeout=60)
        finally:
            consumer.close()
        assert {record.key().decode() for record in records} <= set(settings.devices)
        assert len(records) == 4, "the simulated devices' messages did not reach Kafka"

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
    for port in (settings.amqp_port, settings.mqtt_port, kafka_port, settings.publisher_port):
        assert not port_open(port), f"port {port} still open after Ctrl-C"
    assert not list((tmp_path / "stack").glob("*/*.pid")), "a broker's pid file is left"

    cleaned = subprocess.run(["make", "--no-print-directory", "clean"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not (tmp_path / "stack").exists(), "make clean left the brokers' data"
