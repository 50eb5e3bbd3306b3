"""The stack against real brokers: routing, users, topology, Kafka topic, management API."""
from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import sys
import uuid
from pathlib import Path
from urllib.parse import quote

import pika
import psutil
import pytest
import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from stack import apps as stack_apps
from common import config
from stack import kafka_server
from stack.kafka_server import ensure_topic
from stack.process import AppProcess
from tests.helpers import MqttDevice, consume, get_message, kafka_consumer, queue_depth, wait_for

DEVICE = "3DF92-192"


def payload(device: str, seq: int = 1) -> bytes:
    return json.dumps({"Producer": device, "command": "position", "id": device, "x": 3, "y": 4,
                       "status": "Active", "seq": seq, "msg_id": uuid.uuid4().hex}).encode()


@pytest.fixture
def device_client(settings):
    client = MqttDevice(settings, DEVICE)  # the registered device's certificate
    assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
    yield client
    client.close()


def test_mqtt_qos1_publish_lands_in_device_queue_with_routing_key(settings, admin_channel, device_client):
    admin_channel.queue_purge(naming.device_queue(DEVICE))
    body = payload(DEVICE)

    assert device_client.publish(naming.mqtt_topic(DEVICE, "info"), body), "no PUBACK"

    method, properties, received = get_message(admin_channel, "webos.3DF92-192")
    assert received == body
    assert method.exchange == "webos.topic"
    assert method.routing_key == "webos.3DF92-192.info"
    assert properties.delivery_mode == 2  # QoS 1 publishes are persistent


def test_publish_for_unknown_device_is_kept_in_unrouted(settings, admin_channel, request):
    admin_channel.queue_purge(naming.UNROUTED_QUEUE)
    stranger = f"nobody-{uuid.uuid4().hex[:6]}"
    topology.enrol_devices(settings, [stranger])  # it may log in, but has no queue
    request.addfinalizer(lambda: topology.remove_enrolment(settings, stranger))
    body = payload(stranger)
    client = MqttDevice(settings, stranger)
    request.addfinalizer(client.close)

    assert client.publish(f"webos/{stranger}/warning", body)

    method, _, received = get_message(admin_channel, "webos.unrouted")
    assert received == body
    assert method.routing_key == f"webos.{stranger}.warning"


def test_fanout_reaches_every_device_queue(admin_channel, new_device):
    devices = [new_device(), new_device()]
    default_queues = [naming.device_queue(d) for d in ("3DF92-192", "4HHC2-392")]
    for queue in default_queues:
        admin_channel.queue_purge(queue)
    body = b'{"Producer": "server", "command": "emergency"}'

    admin_channel.basic_publish("webos.fanout", "", body)

    for queue in default_queues + [naming.device_queue(d) for d in devices]:
        assert get_message(admin_channel, queue)[2] == body


def test_management_api_lists_queues_and_get_messages_returns_payload(settings, admin_channel, device_client):
    admin_channel.queue_purge(naming.device_queue(DEVICE))
    body = payload(DEVICE, seq=42)
    assert device_client.publish(naming.mqtt_topic(DEVICE, "error"), body)
    api = f"{settings.management_url}/api"
    auth = (settings.admin_user, settings.admin_password)

    def listed():
        queues = requests.get(f"{api}/queues/%2F", auth=auth, verify=str(settings.ca_file), timeout=5).json()
        by_name = {q["name"]: q for q in queues}
        ready = by_name.get("webos.3DF92-192", {}).get("messages", 0)
        return "webos.4HHC2-392" in by_name and "webos.dead" in by_name and ready >= 1 and by_name
    by_name = wait_for(listed, 15, message="management API to list the device queue with a message")
    assert by_name["webos.3DF92-192"]["durable"] is True
    assert by_name["webos.3DF92-192"]["arguments"]["x-single-active-consumer"] is True

    response = requests.post(f"{api}/queues/%2F/{quote('webos.3DF92-192')}/get", auth=auth, verify=str(settings.ca_file), timeout=5,
                             json={"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"})
    assert response.status_code == 200
    [message] = response.json()
    assert json.loads(message["payload"]) == json.loads(body)
    assert message["routing_key"] == "webos.3DF92-192.error"


def test_kafka_round_trip_on_events_topic(settings):
    key = f"k-{uuid.uuid4().hex[:8]}"
    body = payload(DEVICE)
    consumer = kafka_consumer(settings, [settings.kafka_topic])
    try:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all",
                             "enable.idempotence": True})
        producer.produce(settings.kafka_topic, key=key, value=body)
        assert producer.flush(10) == 0
        mine = []
        wait_for(lambda: mine.extend(r for r in consume(consumer, 1, 1) if r.key() == key.encode()) or mine,
                 30, message="the record back from Kafka")
        assert mine[0].value() == body
    finally:
        consumer.close()
    metadata = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10)
    assert len(metadata.topics[settings.kafka_topic].partitions) == 6


def test_kafka_topic_creation_is_idempotent(settings):
    assert ensure_topic(settings.kafka_bootstrap, settings.kafka_topic, 6) is False


def test_guest_is_refused_over_amqp(settings):
    params = endpoints.amqp_parameters(settings, "guest", "guest", connection_attempts=1)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(params)
    users = requests.get(f"{settings.management_url}/api/users",
                         auth=(settings.admin_user, settings.admin_password),
                         verify=str(settings.ca_file), timeout=5).json()
    assert "guest" not in {u["name"] for u in users}


@pytest.mark.parametrize("user,password", [(None, None), ("guest", "guest"),
                                           (DEVICE, "wrong-password"), ("webos-admin", "x")])
def test_mqtt_without_a_certificate_or_valid_credentials_is_refused(settings, user, password):
    client = MqttDevice(settings, user=user, password=password)  # no certificate
    try:
        assert client.connected.wait(10) or client.disconnected.wait(1)
        assert client.reason_code is None or client.reason_code != 0
    finally:
        client.close()


def test_device_user_cannot_publish_outside_webos(settings, admin_channel, device_client):
    admin_channel.queue_purge(naming.UNROUTED_QUEUE)

    acked = device_client.publish("other/3DF92-192/info", b'{"x": 1}', timeout=3)

    # RabbitMQ refuses the routing key `other.3DF92-192.info` and drops the connection.
    assert not acked
    assert device_client.disconnected.wait(5)
    assert admin_channel.basic_get(naming.UNROUTED_QUEUE, auto_ack=True)[0] is None


@pytest.mark.parametrize("password", ["", "anything"])
def test_a_device_user_cannot_log_in_over_amqp(settings, password):
    # A device's user has no password: it logs in over MQTT with its certificate, nowhere else.
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(endpoints.amqp_parameters(settings, DEVICE, password,
                                                         connection_attempts=1))


def test_applying_topology_twice_is_harmless(settings, admin_channel, device_client):
    queue = naming.device_queue(DEVICE)
    admin_channel.queue_purge(queue)
    assert device_client.publish(naming.mqtt_topic(DEVICE, "info"), payload(DEVICE))
    wait_for(lambda: queue_depth(admin_channel, queue) == 1, 10)

    topology.apply(settings)
    topology.apply(settings)

    assert queue_depth(admin_channel, queue) == 1
    bindings = requests.get(f"{settings.management_url}/api/queues/%2F/{queue}/bindings",
                            auth=(settings.admin_user, settings.admin_password),
                         verify=str(settings.ca_file), timeout=5).json()
    # One binding per message type, not webos.<device>.*: that would take the device's commands
    # and replies into its telemetry.
    assert sorted((b["source"], b["routing_key"]) for b in bindings if b["source"]) == [
        ("webos.fanout", ""), ("webos.topic", "webos.3DF92-192.error"),
        ("webos.topic", "webos.3DF92-192.info"), ("webos.topic", "webos.3DF92-192.warning")]
    # the device user still works after it was enrolled again
    assert device_client.publish(naming.mqtt_topic(DEVICE, "info"), payload(DEVICE))


def test_declaring_devices_in_one_import_gives_what_declaring_each_gives(settings, admin_channel):
    """topology.declare_devices (one definitions import, for thousands of devices) and
    declare_device (AMQP, one by one): the same queue, arguments and bindings."""
    one_by_one, imported = f"T{uuid.uuid4().hex[:10]}", f"T{uuid.uuid4().hex[:10]}"
    api, auth = f"{settings.management_url}/api", (settings.admin_user, settings.admin_password)

    def declared(device: str) -> tuple:
        queue = requests.get(f"{api}/queues/%2F/{naming.device_queue(device)}", auth=auth,
                             verify=str(settings.ca_file), timeout=5).json()
        bindings = requests.get(f"{api}/queues/%2F/{naming.device_queue(device)}/bindings",
                                auth=auth, verify=str(settings.ca_file), timeout=5).json()
        return (queue["durable"], queue["arguments"],
                sorted((b["source"], b["routing_key"].replace(device, "D"))
                       for b in bindings if b["source"]))

    try:
        topology.declare_device(admin_channel, one_by_one, settings.cluster)
        topology.declare_devices(settings, [imported])
        assert declared(imported) == declared(one_by_one)
        assert len(declared(imported)[2]) == len(naming.MESSAGE_TYPES) + 1  # and the fanout
    finally:
        for device in (one_by_one, imported):
            admin_channel.queue_delete(naming.device_queue(device))


def test_cluster_id_never_starts_with_a_dash(monkeypatch):
    # 0xF8 encodes to "-" as the first URL-safe base64 character: kafka-storage would read it as a flag.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafka_server.uuid, "uuid4", lambda: next(draws))

    cluster_id = kafka_server.new_cluster_id()

    assert cluster_id == base64.urlsafe_b64encode(b"\x01" * 16).decode().rstrip("=")
    assert len(cluster_id) == 22


def test_environment_wins_over_dotenv_and_dotenv_fills_the_rest(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WEBOS_AMQP_PORT=5999\nPUBLISHER_API_TOKEN=from-dotenv\nWEBOS_MQTT_PORT=1999\n")
    env = {"WEBOS_AMQP_PORT": "6111"}

    merged = config.environment(env, dotenv)
    settings = config.load_settings(env, dotenv)

    assert merged["PUBLISHER_API_TOKEN"] == "from-dotenv"  # what the publisher's token is read from
    assert (settings.amqp_port, settings.mqtt_port) == (6111, 1999)


# `python -m stack run`'s last step on its own, with stand-in apps and no brokers.
DRIVER = """
import json, logging, signal, sys
from stack import __main__ as stack_main, apps as stack_apps
from common.config import load_settings
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
signal.signal(signal.SIGTERM, stack_main._interrupt)  # as main() does for `run`
apps, stack_apps.STARTSECS, stack_apps.STARTRETRIES = json.loads(sys.argv[1])
sys.exit(stack_apps.run_apps(load_settings(), apps))
"""
# Stand-in apps: one that runs until SIGTERM (and shows the environment it got), one that takes
# a second to stop, one that fails at start as a misconfigured bridge does.
SLEEPER = ("import os, signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); "
           "print('up', os.environ['WEBOS_MQTT_PORT'], os.environ['PYTHONUNBUFFERED'], "
           "os.environ['PATH'].split(os.pathsep)[0]); signal.pause()")
SLOW_STOPPER = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: "
                "(print('stopping'), time.sleep(1), sys.exit(0))); print('up'); signal.pause()")
FAILER = "import sys; sys.exit('configuration error: stand-in')"


class SupervisedApps:
    """run_apps in a process of its own (its own process group, as a terminal gives a job)."""

    def __init__(self, tmp_path, apps: dict[str, list[str]], startsecs=1, startretries=2):
        # WEBOS_MQTT_PORT: the environment wins over .env, and reaches every app.
        self.env = {**os.environ, "WEBOS_STACK_DIR": str(tmp_path / "stack"), "WEBOS_MQTT_PORT": "1999"}
        self.settings = config.load_settings(env=self.env)
        self.log_path = tmp_path / "run.log"
        self.driver = AppProcess(["-c", DRIVER, json.dumps([apps, startsecs, startretries])],
                                 self.env, self.log_path, "run_apps", new_session=True)
        self.process = self.driver.process

    def output(self) -> str:
        return self.driver.output()

    def status(self) -> str:
        return "\n".join(stack_apps.app_status(self.settings))

    def pid(self, app: str, state: str = "running") -> int | None:
        """The pid `make status` shows for `app` while it is in `state`."""
        found = re.search(rf"^{app}: {state}, pid (\d+)", self.status(), re.MULTILINE)
        return int(found.group(1)) if found else None

    def supervisord(self) -> psutil.Process:
        return wait_for(lambda: next((child for child in psutil.Process(self.process.pid).children()
                                      if "supervisor.supervisord" in child.cmdline()), None),
                        message="supervisord")

    def close(self) -> None:
        """Kill whatever is left (after a failed test)."""
        if self.process.poll() is None:
            for process in [psutil.Process(self.process.pid),
                            *psutil.Process(self.process.pid).children(recursive=True)]:
                try:
                    process.kill()
                except psutil.NoSuchProcess:
                    pass
        self.process.wait()


@pytest.fixture
def supervised(tmp_path):
    started = []

    def start(apps, **kwargs) -> SupervisedApps:
        started.append(SupervisedApps(tmp_path, apps, **kwargs))
        return started[-1]
    yield start
    for run in started:
        run.close()


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("stop", ["SIGINT to run_apps alone", "SIGTERM to run_apps alone",
                                  "SIGINT to its process group", "two quick SIGINTs"])
def test_run_apps_stops_every_app_once_and_exits_0_on_a_requested_stop(supervised, stop):
    app = SLOW_STOPPER if stop == "two quick SIGINTs" else SLEEPER
    run = supervised({"first": ["-c", app], "second": ["-c", app]})
    pids = [wait_for(lambda: run.pid(name), 20, message=f"{name} running") for name in ("first", "second")]
    # Control over a unix socket only, readable by this user alone; never a TCP port.
    run_dir = stack_apps.supervisor_dir(run.settings)
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "supervisor.sock").stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "supervisord.conf").stat().st_mode) == 0o600
    assert not [c for c in run.supervisord().net_connections("inet") if c.status == psutil.CONN_LISTEN]

    if stop == "SIGINT to its process group":
        os.killpg(run.process.pid, signal.SIGINT)  # Ctrl-C in a terminal
    else:
        run.process.send_signal(signal.SIGTERM if stop.startswith("SIGTERM") else signal.SIGINT)
    if stop == "two quick SIGINTs":
        wait_for(lambda: "first       | stopping" in run.output(), 20, message="the first app stopping")
        run.process.send_signal(signal.SIGINT)

    assert run.process.wait(30) == 0, run.output()
    output = run.output()
    assert output.count("stopping the apps") == 1, output
    for name in ("first", "second"):
        assert f"stopped: {name} (exit status 0)" in output, output
    assert all(gone(pid) for pid in pids)
    assert not run_dir.exists(), "the supervisor's config and socket are left"


def test_run_apps_restarts_an_app_killed_with_sigkill_and_passes_the_environment(supervised):
    run = supervised({"sleeper": ["-c", SLEEPER], "other": ["-c", SLEEPER]})
    first = wait_for(lambda: run.pid("sleeper"), 20, message="sleeper running")
    other = wait_for(lambda: run.pid("other"), 20, message="other running")

    os.kill(first, signal.SIGKILL)

    second = wait_for(lambda: run.pid("sleeper") not in (None, first) and run.pid("sleeper"), 20,
                      message="sleeper running again with a new pid")
    assert run.pid("other") == other, "the other app was restarted too"
    output = run.output()
    assert "exited: sleeper (terminated by SIGKILL; not expected)" in output
    assert f"spawned: 'sleeper' with pid {second}" in output
    # Each line under its app's name, with the environment run_apps gives every app.
    venv_bin = str(Path(sys.executable).parent)
    assert output.count(f"sleeper     | up 1999 1 {venv_bin}") == 2, output
    run.process.send_signal(signal.SIGINT)
    assert run.process.wait(30) == 0, run.output()


def test_run_apps_backs_off_then_gives_up_on_an_app_that_fails_at_start(supervised):
    run = supervised({"failer": ["-c", FAILER], "sleeper": ["-c", SLEEPER]}, startretries=2)
    sleeper = wait_for(lambda: run.pid("sleeper"), 20, message="sleeper running")

    wait_for(lambda: "failer: backing off" in run.status(), 20, message="failer backing off")
    wait_for(lambda: "failer: gave up after 3 failed starts" in run.status(), 30,
             message="failer given up")
    wait_for(lambda: "failer gave up: 3 failed starts in a row" in run.output(), 5,
             message="run_apps' line saying so")

    output = run.output()
    assert "failer      | configuration error: stand-in" in output
    assert "exited: failer (exit status 1; not expected)" in output
    assert "(1 failed start in a row): backing off, next start in 1 s" in output
    assert "(2 failed starts in a row): backing off, next start in 2 s" in output
    assert run.pid("sleeper") == sleeper, "the app that works was disturbed"
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(30) == 0, run.output()


def test_run_apps_returns_supervisords_failure_and_stops_what_it_left(supervised):
    run = supervised({"sleeper": ["-c", SLEEPER]})
    sleeper = wait_for(lambda: run.pid("sleeper"), 20, message="sleeper running")

    run.supervisord().kill()

    assert run.process.wait(60) == 128 + signal.SIGKILL, run.output()
    assert "supervisord exited with SIGKILL" in run.output()
    assert gone(sleeper), "the app outlived its supervisor"
    assert not stack_apps.supervisor_dir(run.settings).exists()


def test_status_without_make_run_says_every_app_is_stopped(tmp_path):
    lines = stack_apps.app_status(config.Settings(stack_dir=str(tmp_path / "stack")))

    assert lines == [f"{app}: stopped (no `make run` supervises the apps)"
                     for app in ("publisher", "bridge", "relay", "consumer")]


def test_status_while_make_run_writes_its_supervisor_config_says_stopped(tmp_path):
    # `make status` can read the config at any moment of `make run`'s start: an empty or partly
    # written one (a suite run once caught it so) is "not yet running", never a traceback.
    settings = config.Settings(stack_dir=str(tmp_path / "stack"))
    run_dir = stack_apps.supervisor_dir(settings)
    run_dir.mkdir(parents=True)
    for text in ("", "[supervisord]\nnodaemon=true\n"):
        (run_dir / "supervisord.conf").write_text(text)

        lines = stack_apps.app_status(settings)

        assert lines == [f"{app}: stopped (no `make run` supervises the apps)"
                         for app in ("publisher", "bridge", "relay", "consumer")]
