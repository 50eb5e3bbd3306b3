"""A local Prometheus (Debian's `prometheus` package) for `WEBOS_PROMETHEUS=1 make run`.

It runs monitoring/prometheus.yml with each job's targets moved to this stack's 127.0.0.1 ports
(the bridge's metrics port, the publisher's and the live view's, every RabbitMQ node's
rabbitmq_prometheus port) and the same alert rules, monitoring/alerts.yml.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from common.config import REPO_ROOT, ConfigError, Settings
from stack.process import LocalProcess, answers

MONITORING_DIR = REPO_ROOT / "monitoring"


def local_targets(settings: Settings) -> dict[str, list[str]]:
    """Each scrape job's targets on this machine."""
    nodes = [f"127.0.0.1:{node.rabbitmq_metrics_port}" for node in settings.rabbitmq_addresses()]
    return {"webos-bridge": [f"127.0.0.1:{settings.bridge_metrics_port}"],
            "webos-publisher": [f"127.0.0.1:{settings.publisher_port}"],
            "webos-consumer": [f"127.0.0.1:{settings.consumer_port}"],
            "rabbitmq": nodes, "rabbitmq-queues": nodes}


def local_config(settings: Settings, interval: str | None = None) -> dict:
    """monitoring/prometheus.yml for this stack (`interval`: scrape and evaluation interval)."""
    config = yaml.safe_load((MONITORING_DIR / "prometheus.yml").read_text())
    targets = local_targets(settings)
    for job in config["scrape_configs"]:
        if job["job_name"] not in targets:
            raise ConfigError(f"monitoring/prometheus.yml has a job {job['job_name']!r} that "
                              "stack/prometheus_server.py has no local target for")
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    config["rule_files"] = [str(MONITORING_DIR / name) for name in config["rule_files"]]
    if interval:
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    return config


class LocalPrometheus(LocalProcess):
    """Prometheus on 127.0.0.1:`settings.prometheus_port`, its data under `base_dir`."""

    name = "prometheus"

    def __init__(self, base_dir: Path, settings: Settings, interval: str | None = None):
        super().__init__(base_dir)
        self.settings = settings
        self.interval = interval
        self.url = f"http://127.0.0.1:{settings.prometheus_port}"
        # Debian's build serves the classic web UI only, under /classic.
        self.alerts_url = f"{self.url}/classic/alerts"

    def describe(self) -> str:
        return f"prometheus (127.0.0.1:{self.settings.prometheus_port})"

    def prepare(self) -> None:
        (self.base_dir / "prometheus.yml").write_text(
            yaml.safe_dump(local_config(self.settings, self.interval), sort_keys=False))

    def command(self) -> list[str]:
        binary = shutil.which("prometheus")
        if binary is None:
            raise ConfigError("prometheus is missing: `make install` installs Debian's "
                              "prometheus package (or unset WEBOS_PROMETHEUS)")
        return [binary, f"--config.file={self.base_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.base_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.settings.prometheus_port}",
                "--storage.tsdb.retention.time=7d"]

    def probe(self) -> bool:
        return answers(f"{self.url}/-/ready")
