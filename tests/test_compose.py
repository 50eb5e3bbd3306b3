"""docker-compose.yml and docker-compose.cluster.yml as docker-compose resolves them, no engine
needed: every service there, ports on loopback only, only files that exist (test_compose_run.py
runs them)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import REPO_ROOT

COMPOSE_FILES = ["docker-compose.yml", "docker-compose.cluster.yml", "Dockerfile", "requirements.txt",
                 "rabbitmq", "stack", "publisher", "bridge", "consumer", "monitoring", "containers"]
SINGLE, CLUSTER = "docker-compose.yml", "docker-compose.yml:docker-compose.cluster.yml"


def resolve(folder: Path, files: str) -> dict:
    """`docker-compose config` of `files` in a copy of the repo with a throwaway .env."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is missing: `make install-test` installs Debian's docker-compose")
    for name in COMPOSE_FILES:
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    (folder / ".env").write_text("WEBOS_ADMIN_PASSWORD=a\nWEBOS_BRIDGE_PASSWORD=b\nWEBOS_ERLANG_COOKIE=c\n")
    result = subprocess.run([compose, "config"], cwd=folder, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "COMPOSE_FILE": files})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture
def resolved_compose(tmp_path) -> tuple[dict, Path]:
    return resolve(tmp_path, SINGLE), tmp_path


@pytest.fixture(params=[SINGLE, CLUSTER], ids=["single", "cluster"])
def either_compose(tmp_path, request) -> tuple[dict, Path]:
    return resolve(tmp_path, request.param), tmp_path


def test_compose_has_every_service_with_healthchecked_brokers(resolved_compose):
    config, _ = resolved_compose
    services = config["services"]
    assert set(services) == {"pki", "rabbitmq", "kafka", "setup", "publisher", "bridge", "consumer",
                             "relay", "prometheus", "grafana"}
    assert services["rabbitmq"]["depends_on"]["pki"]["condition"] == "service_completed_successfully"
    assert "healthcheck" in services["rabbitmq"] and "healthcheck" in services["kafka"]
    assert services["setup"]["depends_on"]["rabbitmq"]["condition"] == "service_started"
    assert services["setup"]["depends_on"]["kafka"]["condition"] == "service_started"
    for app in ("publisher", "bridge", "consumer", "relay"):
        assert services[app]["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert services["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_USER"] == "webos-admin"


def test_compose_publishes_ports_on_loopback_only(either_compose):
    config, _ = either_compose
    for name, service in config["services"].items():
        for port in service.get("ports", []):  # docker-compose 1.29 prints "ip:host:container/proto"
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_compose_names_only_files_that_exist(either_compose):
    config, copy = either_compose
    for name, service in config["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("/"):  # a bind mount, not a named volume
                relative = Path(source).relative_to(copy)
                assert (REPO_ROOT / relative).exists(), (name, relative)
        if "build" in service:
            context = Path(service["build"]["context"]).relative_to(copy)
            assert (REPO_ROOT / context / service["build"].get("dockerfile", "Dockerfile")).exists()
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            source = line.split()[1]
            assert (REPO_ROOT / source).exists(), line


def test_compose_runs_rabbitmq_4_0_with_the_local_config(resolved_compose):
    config, copy = resolved_compose
    rabbitmq = config["services"]["rabbitmq"]
    assert rabbitmq["image"] == "rabbitmq:4.0-management"  # the series the local runtime runs
    sources = [volume.split(":")[0] if isinstance(volume, str) else volume["source"]
               for volume in rabbitmq["volumes"]]
    mounted = {str(Path(source).relative_to(copy)) for source in sources if source.startswith("/")}
    assert {"rabbitmq/rabbitmq.conf", "rabbitmq/enabled_plugins"} <= mounted


def test_compose_serves_tls_only_and_shares_one_pki(resolved_compose):
    config, _ = resolved_compose
    services = config["services"]
    published = {str(port).split(":")[-1].split("/")[0] for port in services["rabbitmq"]["ports"]}
    assert published == {"5671", "8883", "15671"}  # AMQPS, MQTT over TLS, management HTTPS
    for name in ("rabbitmq", "setup", "publisher", "bridge", "consumer"):
        volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                   for v in services[name]["volumes"]]
        assert any(v.startswith("pki:/pki") for v in volumes), (name, volumes)
    for name in ("setup", "publisher", "bridge", "consumer"):
        assert services[name]["environment"]["WEBOS_PKI_DIR"] == "/pki"


def test_compose_prometheus_scrapes_every_service_with_the_tested_rules(resolved_compose):
    config, copy = resolved_compose
    services = config["services"]
    scrape = yaml.safe_load((REPO_ROOT / "monitoring" / "prometheus.yml").read_text())
    targets = {target.split(":")[0] for job in scrape["scrape_configs"]
               for static in job["static_configs"] for target in static["targets"]}
    assert targets == {"bridge", "publisher", "consumer", "rabbitmq"} <= set(services)
    mounted = {str(Path(v.split(":")[0] if isinstance(v, str) else v["source"]).relative_to(copy))
               for v in services["prometheus"]["volumes"]
               if (v.split(":")[0] if isinstance(v, str) else v["source"]).startswith("/")}
    assert mounted == {"monitoring/prometheus.yml", "monitoring/alerts.yml"}
    # Grafana's admin password is the one in .env, as RabbitMQ's is: none in the repository.
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "a"


def test_the_cluster_variant_has_three_nodes_of_each_broker_in_one_cluster(tmp_path):
    services = resolve(tmp_path, CLUSTER)["services"]
    assert {"rabbitmq", "rabbitmq-2", "rabbitmq-3", "kafka", "kafka-2", "kafka-3"} <= set(services)
    for app in ("setup", "publisher", "bridge", "consumer", "relay"):
        assert services[app]["environment"]["WEBOS_RABBITMQ_HOSTS"] == "rabbitmq,rabbitmq-2,rabbitmq-3"
        assert services[app]["environment"]["WEBOS_KAFKA_BOOTSTRAP"].count(":19092") == 3
    for node in ("rabbitmq", "rabbitmq-2", "rabbitmq-3"):
        assert services[node]["environment"]["WEBOS_ERLANG_COOKIE"] == "c"
        assert any("20-cluster.conf" in str(volume) for volume in services[node]["volumes"])
    voters = {services[k]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"] for k in ("kafka", "kafka-2", "kafka-3")}
    assert voters == {"1@kafka:9093,2@kafka-2:9093,3@kafka-3:9093"}
    assert sorted(services[k]["environment"]["KAFKA_NODE_ID"] for k in ("kafka", "kafka-2", "kafka-3")) == [1, 2, 3]
