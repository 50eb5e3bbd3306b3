"""monitoring/: the alert rules pass promtool's tests on synthetic series, every alert has a
firing case and a healthy one, and a real Prometheus (Debian's) scrapes the stack and evaluates
the rules, its alerts page seen in a browser."""
from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest
import requests
import yaml

from common.config import REPO_ROOT, Settings
from stack.process import free_port
from stack.prometheus_server import MONITORING_DIR, LocalPrometheus, local_config
from tests.helpers import wait_for


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make install` installs Debian's prometheus package")
    return subprocess.run([binary, *args], cwd=MONITORING_DIR, capture_output=True, text=True,
                          timeout=120)


def test_promtool_passes_the_rule_tests_and_checks_the_config():
    tested = promtool("test", "rules", "alerts.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    checked = promtool("check", "config", "prometheus.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "6 rules found" in checked.stdout


def test_every_alert_fires_in_a_test_and_stays_silent_on_the_healthy_pipeline():
    rules = yaml.safe_load((MONITORING_DIR / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((MONITORING_DIR / "alerts.test.yml").read_text())["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case["exp_alerts"]}
    healthy = next(test for test in tests if test["name"] == "a healthy pipeline raises nothing")
    silent = {case["alertname"] for case in healthy["alert_rule_test"] if not case["exp_alerts"]}
    assert alerts == firing == silent == {"BridgeDown", "DeviceQueueGrowing", "DeadLettersArriving",
                                         "KafkaConsumerLagGrowing", "DeviceSilent", "BridgeRetrying"}


def test_the_local_config_scrapes_this_stack_on_loopback():
    single = local_config(Settings(), interval="5s")
    jobs = {job["job_name"]: job["static_configs"][0]["targets"]
            for job in single["scrape_configs"]}
    assert jobs == {"webos-bridge": ["127.0.0.1:9108"], "webos-publisher": ["127.0.0.1:5000"],
                    "webos-consumer": ["127.0.0.1:5001"], "rabbitmq": ["127.0.0.1:15692"],
                    "rabbitmq-queues": ["127.0.0.1:15692"]}
    assert single["global"]["evaluation_interval"] == "5s"
    assert single["rule_files"] == [str(REPO_ROOT / "monitoring" / "alerts.yml")]
    cluster = local_config(Settings(rabbitmq_nodes=3))
    assert [job["static_configs"][0]["targets"] for job in cluster["scrape_configs"]
            if job["job_name"] == "rabbitmq"] == [
        ["127.0.0.1:15692", "127.0.0.1:15702", "127.0.0.1:15712"]]


@pytest.mark.browser
def test_prometheus_scrapes_rabbitmq_and_raises_bridge_down(settings, tmp_path, page, artifacts):
    # No bridge listens on this stack's bridge port: BridgeDown must go pending, then firing.
    local = dataclasses.replace(settings, prometheus_port=free_port(),
                                bridge_metrics_port=free_port())
    prometheus = LocalPrometheus(tmp_path / "prometheus", local, interval="1s")
    prometheus.start()
    try:
        prometheus.wait_ready(60)
        api = f"{prometheus.url}/api/v1"

        def health() -> dict:
            targets = requests.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
            return {t["labels"]["job"]: t["health"] for t in targets}
        # Each job's first scrape: both RabbitMQ jobs up, the bridge's down.
        wanted = {"rabbitmq": "up", "rabbitmq-queues": "up", "webos-bridge": "down"}
        wait_for(lambda: wanted.items() <= health().items(), 30, 0.5, f"the scrapes {wanted}")
        dead = requests.get(f"{api}/query", params={
            "query": 'rabbitmq_detailed_queue_messages{queue="webos.dead"}'}, timeout=5).json()
        assert len(dead["data"]["result"]) == 1  # the queue as rabbitmq_prometheus reports it

        def bridge_down() -> str | None:
            alerts = requests.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
            return next((a["state"] for a in alerts if a["labels"]["alertname"] == "BridgeDown"),
                        None)
        assert wait_for(bridge_down, 30, 0.5, "BridgeDown to be evaluated") in ("pending", "firing")
        page.goto(prometheus.alerts_url)
        page.click("text=BridgeDown")  # unfolds the rule and its pending alert
        page.wait_for_selector("text=up{job=")
        assert "DeviceSilent" in page.inner_text("body")
        page.screenshot(path=str(artifacts / "prometheus-alerts.png"), full_page=True)
    finally:
        prometheus.stop()
