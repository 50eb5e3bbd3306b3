"""docker-compose.yml for real: the images `make images` builds, on podman's Docker API, from `up`
to a device's message in Kafka (its certificate, MQTT over TLS, the published port) to `down -v`
with nothing of the project left behind; a bridge that crashes inside compose is restarted and
loses nothing. Then the cluster variant (docker-compose.cluster.yml): three RabbitMQ nodes and
three Kafka brokers, a device going on through another node when one stops. Every call goes to
ports published on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import uuid

import pytest
import requests
from confluent_kafka.admin import AdminClient

from common.config import PASSWORD_VARIABLES, REPO_ROOT, Settings
from rabbitmq import naming
from stack import images
from stack.process import answers, free_port
from tests.helpers import read_records, wait_for

# What docker-compose.yml reads from the repository: the project is a copy of these, with its
# own .env, so that a test run never touches the developer's .env or a stack of theirs.
ARTIFACTS = REPO_ROOT / "test-artifacts"
PROJECT_FILES = ["docker-compose.yml", "docker-compose.cluster.yml", "Dockerfile", "rabbitmq",
                 "monitoring", "containers"]
PORTS = ["WEBOS_AMQP_PORT", "WEBOS_MQTT_PORT", "WEBOS_MANAGEMENT_PORT", "KAFKA_PORT",
         "WEBOS_PUBLISHER_PORT", "WEBOS_CONSUMER_PORT", "WEBOS_BRIDGE_METRICS_PORT"]
CLUSTER_PORTS = [f"WEBOS_NODE{k}_{name}_PORT" for k in (2, 3) for name in ("AMQP", "MQTT", "MANAGEMENT")] + [
    "KAFKA_2_PORT", "KAFKA_3_PORT"]


@pytest.fixture(scope="module")
def engine():
    """podman's API and the images (built once, then reused: `make images` does the same)."""
    for tool in ("podman", "docker-compose", "mosquitto_pub"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `make install-test` installs it")
    started = images.start_engine()
    yield {"DOCKER_HOST": images.DOCKER_HOST, **images.build_images()}
    if started:  # no socket process of ours left behind either
        images.stop_engine()


class Project:
    """One docker-compose project in a folder of its own, on free ports."""

    def __init__(self, folder, engine: dict[str, str], cluster: bool = False):
        for name in PROJECT_FILES:
            source = REPO_ROOT / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
        self.name = f"webostest{uuid.uuid4().hex[:8]}"
        self.ports = {name: str(free_port()) for name in PORTS + (CLUSTER_PORTS if cluster else [])}
        passwords = {name: secrets.token_urlsafe(12) for name in PASSWORD_VARIABLES}
        (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in passwords.items()))
        self.folder = folder
        files = "docker-compose.yml:docker-compose.cluster.yml" if cluster else "docker-compose.yml"
        self.env = {"PATH": os.environ["PATH"], "COMPOSE_PROJECT_NAME": self.name,
                    "COMPOSE_FILE": files, **engine, **self.ports, **passwords}
        self.admin_password = passwords["WEBOS_ADMIN_PASSWORD"]
        self.label = f"label=com.docker.compose.project={self.name}"

    def compose(self, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", *args], cwd=self.folder, env=self.env,
                              timeout=timeout, capture_output=True, **kwargs)

    def podman(self, *args: str) -> str:
        return images.podman(*args, capture_output=True, text=True, check=True).stdout

    def url(self, port: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service, text=True).stdout.strip()

    def up(self) -> None:
        """`up -d`, then until the bridge and the publisher answer on their published ports."""
        up = self.compose("up", "-d")
        assert up.returncode == 0, up.stderr.decode()[-3000:]
        wait_for(lambda: answers(self.url("WEBOS_BRIDGE_METRICS_PORT", "/healthz")), 120,
                 interval=1, message="the bridge in compose to connect")
        wait_for(lambda: answers(self.url("WEBOS_PUBLISHER_PORT", "/devices")), 60,
                 interval=1, message="the publisher in compose")

    def subnets(self) -> list[str]:
        """The subnets of the project's networks (their firewall rules name them)."""
        networks = self.podman("network", "ls", "--quiet", "--filter", self.label).split()
        return [json.loads(self.podman("network", "inspect", name))[0]["subnets"][0]["subnet"]
                for name in networks]

    def down_leaves_nothing(self, subnets: list[str]) -> None:
        """`down -v` (the services' logs kept in test-artifacts/ first if the test failed); then
        no container, volume, network or firewall rule of the project."""
        if sys.exc_info()[0] is not None:
            logs = self.compose("logs", "--no-color", timeout=120).stdout
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / f"compose-{self.name}.log").write_bytes(logs)
        down = self.compose("down", "-v")
        assert down.returncode == 0, down.stderr
        left = {"containers": self.podman("ps", "-a", "-q", "--filter", self.label),
                "volumes": self.podman("volume", "ls", "-q", "--filter", self.label),
                "networks": self.podman("network", "ls", "-q", "--filter", self.label)}
        assert {kind: found.split() for kind, found in left.items()} == {
            "containers": [], "volumes": [], "networks": []}
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        assert not [line for line in rules.splitlines()
                    if any(subnet in line for subnet in subnets)
                    or any(f"--dport {port} " in line for port in self.ports.values())]

    def management(self, path: str, ca_file, port: str = "WEBOS_MANAGEMENT_PORT"):
        """A management API call on a published port, as webos-admin, the broker checked."""
        response = requests.get(f"https://127.0.0.1:{self.ports[port]}/api/{path}",
                                auth=("webos-admin", self.admin_password), verify=str(ca_file),
                                timeout=10)
        response.raise_for_status()
        return response.json()


def real_device(project: Project, folder) -> tuple[str, dict]:
    """A device enrolled as a real one (POST /devices, "simulated": false: its certificate, broker
    user and queue, nobody else using its id), and its files out of the pki volume."""
    device = f"R{uuid.uuid4().hex[:8]}"
    enrolled = requests.post(project.url("WEBOS_PUBLISHER_PORT", "/devices"), timeout=30,
                             json={"id": device, "interval": [1, 2], "simulated": False})
    assert enrolled.status_code == 201, enrolled.text
    archive = project.compose("run", "--rm", "--no-deps", "-T", "pki", "tar", "-C", "/pki", "-c",
                              "ca.crt", f"devices/{device}.crt", f"devices/{device}.key")
    assert archive.returncode == 0, archive.stderr
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder)
    return device, {"--cafile": folder / "ca.crt", "--cert": folder / f"devices/{device}.crt",
                    "--key": folder / f"devices/{device}.key"}


def publish(project: Project, device: str, files: dict, payloads: list[dict],
            port: str = "WEBOS_MQTT_PORT") -> None:
    for payload in payloads:
        sent = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", project.ports[port],
             "-V", "mqttv311", "-q", "1", "-i", device, "-t", naming.mqtt_topic(device, "info"),
             "-m", json.dumps(payload), *[str(part) for item in files.items() for part in item]],
            capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr


def device_seqs(records, device: str, run: str) -> list[int]:
    """The `seq` of each record of `device` sent in this `run`, in Kafka's order."""
    return [json.loads(r.value())["seq"] for r in records
            if r.key() == device.encode() and json.loads(r.value()).get("run") == run]


def test_compose_up_carries_a_device_message_to_kafka_survives_a_bridge_crash_and_down_leaves_nothing(
        engine, tmp_path):
    project = Project(tmp_path, engine)
    subnets: list[str] = []
    try:
        project.up()
        device, files = real_device(project, tmp_path)
        kafka = Settings(kafka_bootstrap=f"127.0.0.1:{project.ports['KAFKA_PORT']}")
        run = uuid.uuid4().hex

        # A message from the device's own certificate reaches Kafka, keyed by the device.
        publish(project, device, files, [{"id": device, "run": run, "seq": 0}])
        read_records(kafka, "webos.events", lambda got: device_seqs(got, device, run) == [0], 60)

        # The management UI on its published port is RabbitMQ 4.
        assert project.management("overview", files["--cafile"])["rabbitmq_version"].startswith("4.0")

        # The bridge's process killed: compose's restart policy brings it back; nothing is lost.
        bridge = project.container("bridge")
        pid = project.podman("inspect", "--format", "{{.State.Pid}}", bridge).strip()
        subprocess.run(["kill", "-9", pid], check=True)
        publish(project, device, files, [{"id": device, "run": run, "seq": seq} for seq in range(1, 21)])
        read_records(kafka, "webos.events",
                     lambda got: set(device_seqs(got, device, run)) == set(range(21)), 120)
        restarts = project.podman("inspect", "--format", "{{.RestartCount}}", bridge).strip()
        assert int(restarts) >= 1

        subnets += project.subnets()
        assert subnets, "the project's network is labelled with its project"
    finally:
        project.down_leaves_nothing(subnets)


def test_compose_cluster_runs_three_nodes_of_each_broker_and_a_device_goes_on_when_its_node_stops(
        engine, tmp_path):
    """docker-compose.cluster.yml: one RabbitMQ cluster of three nodes, the device queues quorum
    queues on all three, the Kafka topics replicated on three brokers; a device that loses its
    node publishes through another (as a device with the node list does), and the bridge, which
    lost that node too, carries every message on."""
    project = Project(tmp_path, engine, cluster=True)
    subnets: list[str] = []
    try:
        project.up()
        device, files = real_device(project, tmp_path)
        ca_file = files["--cafile"]
        nodes = project.management("nodes", ca_file)
        assert sorted((n["name"], n["running"]) for n in nodes) == [
            ("rabbit@rabbitmq", True), ("rabbit@rabbitmq-2", True), ("rabbit@rabbitmq-3", True)]
        queue = project.management(f"queues/%2F/{naming.device_queue(device)}", ca_file)
        assert queue["type"] == "quorum"
        # Every queue on all three nodes: setup waits for the whole cluster before declaring
        # (webos.presence on two nodes lost its majority when one stopped, and the bridge waited).
        queues = project.management("queues/%2F?columns=name,type,members", ca_file)
        members = {q["name"]: len(q.get("members", [])) for q in queues if q["type"] == "quorum"}
        assert {naming.PRESENCE_QUEUE, naming.DEAD_QUEUE, naming.device_queue(device)} <= set(members)
        assert set(members.values()) == {3}, members

        kafka = Settings(kafka_bootstrap=",".join(
            f"127.0.0.1:{project.ports[name]}" for name in ("KAFKA_PORT", "KAFKA_2_PORT", "KAFKA_3_PORT")))
        admin = AdminClient({"bootstrap.servers": kafka.kafka_bootstrap})
        topic = admin.list_topics("webos.events", timeout=30).topics["webos.events"]
        assert {len(p.replicas) for p in topic.partitions.values()} == {3}
        assert len(admin.list_topics(timeout=30).brokers) == 3

        run = uuid.uuid4().hex
        publish(project, device, files, [{"id": device, "run": run, "seq": 0}], port="WEBOS_NODE2_MQTT_PORT")
        read_records(kafka, "webos.events", lambda got: device_seqs(got, device, run) == [0], 60)

        # Node 1, where the bridge and the apps connected first, stops; the device goes on
        # through node 3, and all of it reaches Kafka in order.
        stopped = project.compose("stop", "rabbitmq")
        assert stopped.returncode == 0, stopped.stderr
        publish(project, device, files, [{"id": device, "run": run, "seq": seq} for seq in range(1, 21)],
                port="WEBOS_NODE3_MQTT_PORT")
        read_records(kafka, "webos.events",
                     lambda got: device_seqs(got, device, run) == list(range(21)), 120)
        subnets += project.subnets()
    finally:
        project.down_leaves_nothing(subnets)
