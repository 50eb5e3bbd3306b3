"""docker-compose.yml for real: the images `make images` builds, on podman's Docker API, from `up`
to a device's message in Kafka (its certificate, MQTT over TLS, the published port) to `down -v`
with nothing of the project left behind; a bridge that crashes inside compose is restarted and
loses nothing. Every call goes to ports published on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import tarfile
import uuid

import pytest
import requests

from common.config import REPO_ROOT, Settings
from rabbitmq import naming
from stack import images
from stack.process import answers, free_port
from tests.helpers import read_records, wait_for

# What docker-compose.yml reads from the repository: the project is a copy of these, with its
# own .env, so that a test run never touches the developer's .env or a stack of theirs.
PROJECT_FILES = ["docker-compose.yml", "Dockerfile", "rabbitmq", "monitoring"]
PORTS = ["WEBOS_AMQP_PORT", "WEBOS_MQTT_PORT", "WEBOS_MANAGEMENT_PORT", "KAFKA_PORT",
         "WEBOS_PUBLISHER_PORT", "WEBOS_CONSUMER_PORT", "WEBOS_BRIDGE_METRICS_PORT"]


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

    def __init__(self, folder, engine: dict[str, str]):
        for name in PROJECT_FILES:
            source = REPO_ROOT / name
            (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
        self.name = f"webostest{uuid.uuid4().hex[:8]}"
        self.ports = {name: str(free_port()) for name in PORTS}
        passwords = {"WEBOS_ADMIN_PASSWORD": secrets.token_urlsafe(12),
                     "WEBOS_BRIDGE_PASSWORD": secrets.token_urlsafe(12)}
        (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in passwords.items()))
        self.folder = folder
        self.env = {"PATH": os.environ["PATH"], "COMPOSE_PROJECT_NAME": self.name,
                    **engine, **self.ports, **passwords}
        self.admin_password = passwords["WEBOS_ADMIN_PASSWORD"]

    def compose(self, *args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", *args], cwd=self.folder, env=self.env,
                              timeout=timeout, capture_output=True, **kwargs)

    def podman(self, *args: str) -> str:
        return images.podman(*args, capture_output=True, text=True, check=True).stdout

    def url(self, port: str, path: str = "") -> str:
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service, text=True).stdout.strip()

    def left_behind(self, label: str) -> dict[str, str]:
        """What of this project the engine still has: containers, volumes, networks."""
        return {"containers": self.podman("ps", "-a", "-q", "--filter", label),
                "volumes": self.podman("volume", "ls", "-q", "--filter", label),
                "networks": self.podman("network", "ls", "-q", "--filter", label)}


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


def publish(project: Project, device: str, files: dict, payloads: list[dict]) -> None:
    for payload in payloads:
        sent = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", project.ports["WEBOS_MQTT_PORT"],
             "-V", "mqttv311", "-q", "1", "-i", device, "-t", naming.mqtt_topic(device, "info"),
             "-m", json.dumps(payload), *[str(part) for item in files.items() for part in item]],
            capture_output=True, text=True, timeout=30)
        assert sent.returncode == 0, sent.stderr


def test_compose_up_carries_a_device_message_to_kafka_survives_a_bridge_crash_and_down_leaves_nothing(
        engine, tmp_path):
    project = Project(tmp_path, engine)
    label = f"label=com.docker.compose.project={project.name}"
    subnets: list[str] = []
    try:
        up = project.compose("up", "-d")
        assert up.returncode == 0, up.stderr.decode()[-3000:]
        wait_for(lambda: answers(project.url("WEBOS_BRIDGE_METRICS_PORT", "/healthz")), 120,
                 interval=1, message="the bridge in compose to connect")
        wait_for(lambda: answers(project.url("WEBOS_PUBLISHER_PORT", "/devices")), 60,
                 interval=1, message="the publisher in compose")
        device, files = real_device(project, tmp_path)
        kafka = Settings(kafka_bootstrap=f"127.0.0.1:{project.ports['KAFKA_PORT']}")
        run = uuid.uuid4().hex

        # A message from the device's own certificate reaches Kafka, keyed by the device.
        publish(project, device, files, [{"id": device, "run": run, "seq": 0}])

        def mine(records) -> list[int]:
            return [json.loads(r.value())["seq"] for r in records
                    if r.key() == device.encode() and json.loads(r.value()).get("run") == run]
        read_records(kafka, "webos.events", lambda got: mine(got) == [0], 60)

        # The management UI on its published port is RabbitMQ 4.
        overview = requests.get(f"https://127.0.0.1:{project.ports['WEBOS_MANAGEMENT_PORT']}/api/overview",
                                auth=("webos-admin", project.admin_password),
                                verify=str(files["--cafile"]), timeout=10).json()
        assert overview["rabbitmq_version"].startswith("4.0")

        # The bridge's process killed: compose's restart policy brings it back; nothing is lost.
        bridge = project.container("bridge")
        pid = project.podman("inspect", "--format", "{{.State.Pid}}", bridge).strip()
        subprocess.run(["kill", "-9", pid], check=True)
        publish(project, device, files, [{"id": device, "run": run, "seq": seq} for seq in range(1, 21)])
        read_records(kafka, "webos.events", lambda got: set(mine(got)) == set(range(21)), 120)
        restarts = project.podman("inspect", "--format", "{{.RestartCount}}", bridge).strip()
        assert int(restarts) >= 1

        network = project.podman("network", "ls", "--quiet", "--filter", label).split()
        subnets += [json.loads(project.podman("network", "inspect", name))[0]["subnets"][0]["subnet"]
                   for name in network]
        assert subnets, "the project's network is labelled with its project"
    finally:
        down = project.compose("down", "-v")
    assert down.returncode == 0, down.stderr
    assert {kind: found.split() for kind, found in project.left_behind(label).items()} == {
        "containers": [], "volumes": [], "networks": []}
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert not [line for line in rules.splitlines()
                if any(subnet in line for subnet in subnets)
                or any(f"--dport {port} " in line for port in project.ports.values())]
