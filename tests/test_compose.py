"""docker-compose.yml: no Docker engine runs here, so check that it parses and names real files."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.config import REPO_ROOT

COMPOSE_FILES = ["docker-compose.yml", "Dockerfile", "requirements.txt", "rabbitmq", "stack",
                 "publisher", "bridge", "consumer", "monitoring"]


@pytest.fixture
def resolved_compose(tmp_path) -> dict:
    """`docker-compose config` of a copy of the repo with a throwaway .env."""
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.fail("docker-compose is missing: `make install-test` installs Debian's docker-compose")
    for name in COMPOSE_FILES:
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    (tmp_path / ".env").write_text("WEBOS_ADMIN_PASSWORD=a\nWEBOS_BRIDGE_PASSWORD=b\n")
    result = subprocess.run([compose, "config"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout), tmp_path


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


def test_compose_publishes_ports_on_loopback_only(resolved_compose):
    config, _ = resolved_compose
    for name, service in config["services"].items():
        for port in service.get("ports", []):  # docker-compose 1.29 prints "ip:host:container/proto"
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_compose_names_only_files_that_exist(resolved_compose):
    config, copy = resolved_compose
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
