"""The consumer against real Kafka: `python -m consumer` as a subprocess, and the live view's SSE.

Every test produces into its own topic, so tests never see each other's records.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from common.config import REPO_ROOT, Settings
from rabbitmq import endpoints
from stack.process import AppProcess
from tests.helpers import wait_for
from tests.support.bridge import BridgeProcess
from tests.support.consumer import LiveView, consumer_env, device_record, new_topic, produce

DEVICES = ("3DF92-192", "4HHC2-392", "T-consumer-3")


# -- helpers ---------------------------------------------------------------------------------------


def run_consumer(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m consumer ARGS` to completion."""
    return subprocess.run([sys.executable, "-m", "consumer", *args], cwd=REPO_ROOT,
                          env=consumer_env(settings), capture_output=True, text=True,
                          timeout=timeout)


class RunningConsumer(AppProcess):
    """`python -m consumer ARGS` in the background, its stdout and stderr in files of their own."""

    def __init__(self, settings: Settings, log_dir: Path, *args: str):
        super().__init__(["consumer", *args], consumer_env(settings), log_dir / "consumer.out",
                         stderr_path=log_dir / "consumer.err")

    @property
    def stdout(self) -> list[str]:
        return self.output().splitlines()

    @property
    def stderr(self) -> list[str]:
        return self.output(stream="stderr").splitlines()


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def summary_of(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("consumer: ")]
    assert len(lines) == 1, f"expected one summary line in stderr:\n{stderr}"
    return lines[0]


@pytest.fixture
def topic(settings):
    return new_topic(settings)


# -- the terminal consumer ---------------------------------------------------------------------------
def test_json_prints_every_record_in_per_key_order(settings, topic):
    records = [device_record(device, seq, message_type=("info", "warning", "error")[seq % 3])
               for seq in range(1, 31) for device in DEVICES]
    produce(settings, topic, records)

    result = run_consumer(settings, "--topic", topic, "--from-beginning", "--format", "json",
                          "--timeout", "2")

    assert result.returncode == 0, result.stderr
    lines = json_lines(result.stdout)
    assert len(lines) == len(records), result.stderr
    produced = {json.loads(value)["msg_id"]: (key, json.loads(value), headers)
                for key, value, headers in records}
    for line in lines:
        key, payload, headers = produced[line["payload"]["msg_id"]]
        assert line["key"] == key
        assert line["payload"] == payload
        assert line["headers"] == headers
        assert line["topic"] == topic
        assert isinstance(line["partition"], int) and isinstance(line["offset"], int)
    assert {line["payload"]["msg_id"] for line in lines} == set(produced)
    for device in DEVICES:
        seqs = [line["payload"]["seq"] for line in lines if line["key"] == device]
        assert seqs == list(range(1, 31)), f"{device} out of order: {seqs}"
    summary = summary_of(result.stderr)
    assert "90 records" in summary
    for device in DEVICES:
        assert f"{device}: 30" in summary
    assert "0 seq gaps" in summary and "0 non-JSON" in summary


@pytest.fixture(scope="module")
def filter_topic(settings):
    """Records of three devices and three types; one record says its type only in routing_key."""
    topic = new_topic(settings, "test.consumer.filters")
    records = [device_record(device, seq, message_type=message_type)
               for seq, message_type in enumerate(("info", "warning", "error", "info"), start=1)
               for device in DEVICES]
    key, value, headers = device_record(DEVICES[1], 5, message_type="error")
    headers = {"routing_key": headers["routing_key"], "msg_id": headers["msg_id"]}
    records.append((key, value, headers))
    produce(settings, topic, records)
    return topic, records


def _expected(records, devices=(), types=()) -> set[str]:
    chosen = set()
    for key, value, headers in records:
        message_type = headers.get("type") or headers["routing_key"].rsplit(".", 1)[1]
        if (not devices or key in devices) and (not types or message_type in types):
            chosen.add(json.loads(value)["msg_id"])
    return chosen


@pytest.mark.parametrize("devices, types", [
    ((DEVICES[0],), ()),
    ((DEVICES[0], DEVICES[2]), ()),
    ((), ("error",)),
    ((), ("warning", "error")),
    ((DEVICES[1],), ("error",)),
    (("no-such-device",), ()),
])
def test_filters_select_exactly_the_matching_records(settings, filter_topic, devices, types):
    topic, records = filter_topic
    args = [arg for device in devices for arg in ("--device", device)]
    args += [arg for message_type in types for arg in ("--type", message_type)]

    result = run_consumer(settings, "--topic", topic, "--from-beginning", "--format", "json",
                          "--timeout", "1.5", *args)

    assert result.returncode == 0, result.stderr
    printed = [line["payload"]["msg_id"] for line in json_lines(result.stdout)]
    assert len(printed) == len(set(printed))
    assert set(printed) == _expected(records, devices, types)


def test_count_exits_zero_after_n_records(settings, topic):
    produce(settings, topic, [device_record(DEVICES[0], seq) for seq in range(1, 21)])

    started = time.monotonic()
    result = run_consumer(settings, "--topic", topic, "--from-beginning", "--format", "json",
                          "--count", "5")

    assert result.returncode == 0, result.stderr
    assert [line["payload"]["seq"] for line in json_lines(result.stdout)] == [1, 2, 3, 4, 5]
    assert "5 records" in summary_of(result.stderr)
    assert time.monotonic() - started < 15


def test_timeout_exits_zero_when_idle(settings, topic):
    started = time.monotonic()
    result = run_consumer(settings, "--topic", topic, "--timeout", "1")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert summary_of(result.stderr).startswith("consumer: 0 records")
    assert time.monotonic() - started < 15


def test_dedupe_drops_injected_duplicates_and_reports_them(settings, topic):
    originals = [device_record(device, seq) for seq in range(1, 6) for device in DEVICES[:2]]
    # what a bridge reconnect can cause: the same messages (same msg_id) produced again
    duplicates = [originals[1], originals[4], originals[7]]
    produce(settings, topic, originals[:5] + duplicates + originals[5:])

    plain = run_consumer(settings, "--topic", topic, "--from-beginning", "--format", "json",
                         "--timeout", "1.5")
    deduped = run_consumer(settings, "--topic", topic, "--from-beginning", "--format", "json",
                           "--timeout", "1.5", "--dedupe")

    assert plain.returncode == 0 and deduped.returncode == 0, deduped.stderr
    assert len(json_lines(plain.stdout)) == 13
    printed = [line["payload"]["msg_id"] for line in json_lines(deduped.stdout)]
    assert sorted(printed) == sorted(json.loads(value)["msg_id"] for _, value, _ in originals)
    summary = summary_of(deduped.stderr)
    assert "10 records" in summary and "3 duplicates dropped" in summary


def test_summary_counts_seq_gaps(settings, topic):
    produce(settings, topic, [device_record(DEVICES[0], seq) for seq in (1, 2, 3, 6, 7, 9)]
            + [device_record(DEVICES[1], seq) for seq in (1, 2, 3)])

    result = run_consumer(settings, "--topic", topic, "--from-beginning", "--timeout", "1.5",
                          "--color", "never")

    assert result.returncode == 0, result.stderr
    assert "2 seq gaps (3 missing)" in summary_of(result.stderr)
    gap_lines = [line for line in result.stdout.splitlines() if "[seq gap]" in line]
    assert [("seq=6" in gap_lines[0]), ("seq=9" in gap_lines[1])] == [True, True]


def test_restarted_consumer_in_same_group_resumes_where_it_stopped(settings, topic, tmp_path):
    group = f"test-resume-{uuid.uuid4().hex[:8]}"
    first_batch = [device_record(device, seq) for seq in range(1, 11) for device in DEVICES]
    produce(settings, topic, first_batch)

    # stopped by --count: exactly the printed records are committed
    first = run_consumer(settings, "--topic", topic, "--group", group, "--from-beginning",
                         "--format", "json", "--count", "12")
    second = run_consumer(settings, "--topic", topic, "--group", group, "--format", "json",
                          "--timeout", "1.5")
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    seen_first = [(l["partition"], l["offset"]) for l in json_lines(first.stdout)]
    seen_second = [(l["partition"], l["offset"]) for l in json_lines(second.stdout)]
    assert len(seen_first) == 12 and len(seen_second) == 18
    assert not set(seen_first) & set(seen_second), "records printed twice"
    printed = json_lines(first.stdout) + json_lines(second.stdout)
    assert {l["payload"]["msg_id"] for l in printed} == \
        {json.loads(value)["msg_id"] for _, value, _ in first_batch}

    # stopped by SIGTERM while running: records that arrive while it is down come next, once
    running = RunningConsumer(settings, tmp_path, "--topic", topic, "--group", group,
                              "--format", "json")
    try:
        wait_for(lambda: any("assigned" in line for line in running.stderr), 20,
                 message="the consumer to join its group")
        produce(settings, topic, [device_record(DEVICES[0], 11)])
        wait_for(lambda: len(running.stdout) == 1, 20, message="the live record")
        status = running.stop(10, signal.SIGTERM)
    finally:
        running.kill()
    assert status == 0
    produce(settings, topic, [device_record(DEVICES[0], seq) for seq in (12, 13)])
    third = run_consumer(settings, "--topic", topic, "--group", group, "--format", "json",
                         "--timeout", "1.5")
    assert [l["payload"]["seq"] for l in json_lines(third.stdout)] == [12, 13]


@pytest.mark.parametrize("output_format", ["json", "pretty"])
def test_non_json_records_are_shown_raw_and_counted(settings, topic, output_format):
    records = [device_record(DEVICES[0], 1), (DEVICES[0], b"plain text, not JSON", {}),
               (DEVICES[0], b"\xff\xfe\x00binary", {"device": DEVICES[0]}),
               (DEVICES[0], b'{"truncated": ', {}), device_record(DEVICES[0], 2)]
    produce(settings, topic, records)

    result = run_consumer(settings, "--topic", topic, "--from-beginning", "--format",
                          output_format, "--timeout", "1.5", "--color", "never")

    assert result.returncode == 0, result.stderr
    assert "5 records" in summary_of(result.stderr)
    assert "3 non-JSON" in summary_of(result.stderr)
    if output_format == "json":
        lines = json_lines(result.stdout)
        assert [line["payload"] is None for line in lines] == [False, True, True, True, False]
        assert lines[1]["raw"] == "plain text, not JSON"
        assert lines[3]["raw"] == '{"truncated": '
        assert lines[1]["error"] == "value is not JSON"
    else:
        lines = result.stdout.splitlines()
        assert len(lines) == 5
        assert "non-JSON 'plain text, not JSON'" in lines[1]
        assert "seq=2" in lines[4]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_promptly_and_only_new_records_by_default(settings, topic, signum,
                                                                      tmp_path):
    old = [device_record(DEVICES[0], seq) for seq in (1, 2, 3)]
    produce(settings, topic, old)
    running = RunningConsumer(settings, tmp_path, "--topic", topic, "--format", "json")
    try:
        # once it logs its assignment, the start positions are pinned: anything produced now
        # is new to it, and nothing produced before is
        wait_for(lambda: any("assigned" in line for line in running.stderr), 20,
                 message="the consumer to join its group")
        new = [device_record(DEVICES[2], seq) for seq in (1, 2)]
        produce(settings, topic, new)
        wait_for(lambda: sum(1 for line in running.stdout if DEVICES[2] in line) == 2, 20,
                 message="the new records")
        started = time.monotonic()
        status = running.stop(10, signum)
        seconds = time.monotonic() - started
    finally:
        running.kill()

    assert status == 0
    assert seconds < 3, f"took {seconds:.1f} s to stop"
    printed = [json.loads(line) for line in running.stdout]
    assert not [line for line in printed if line["key"] == DEVICES[0]], "old records printed"
    assert [line["payload"]["seq"] for line in printed if line["key"] == DEVICES[2]] == [1, 2]
    assert summary_of("\n".join(running.stderr))


def test_lag_shows_what_the_group_has_not_committed(settings, topic):
    group = f"test-lag-{uuid.uuid4().hex[:8]}"
    produce(settings, topic, [device_record(device, seq) for seq in range(1, 6)
                              for device in DEVICES[:2]])
    assert run_consumer(settings, "--topic", topic, "--group", group, "--from-beginning",
                        "--count", "4").returncode == 0

    as_json = run_consumer(settings, "--topic", topic, "--group", group, "--lag", "--format", "json")
    table = run_consumer(settings, "--topic", topic, "--group", group, "--lag")

    assert as_json.returncode == 0 and table.returncode == 0, table.stderr
    lag = json.loads(as_json.stdout)
    assert lag["group"] == group and lag["total"] == 6
    assert [p["partition"] for p in lag["partitions"]] == list(range(6))
    assert sum(p["high"] for p in lag["partitions"]) == 10
    for partition in lag["partitions"]:
        assert partition["lag"] == partition["high"] - (partition["committed"] or 0)
    assert re.search(r"^\s+total\s+10\s+6$", table.stdout, re.MULTILINE), table.stdout


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "consumer", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--group", "--from-beginning", "--device", "--type", "--format", "--count",
                 "--timeout", "--dedupe", "--lag", "--topic", "serve"):
        assert flag in result.stdout


# -- the live view's event stream --------------------------------------------------------------------
def read_events(response):
    """(event, data) pairs from a text/event-stream response."""
    event, data = None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and event:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def test_live_view_streams_a_produced_record_and_shows_lag(settings, topic):
    view = LiveView(settings, topic)
    try:
        with requests.get(view.url + "/events", stream=True, timeout=(5, 10)) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events = read_events(response)
            first_event, snapshot = next(events)
            assert first_event == "snapshot" and snapshot["topic"] == topic
            # What is timed is the stream, not the group join: on a Kafka that has no consumer
            # group yet, creating __consumer_offsets alone takes seconds (the test failed so when
            # run on its own).
            wait_for(lambda: "live view assigned" in view.output(), 30,
                     message="the live view's partitions assigned")
            key, value, headers = device_record(DEVICES[0], 1, status="Inactive", x=3, y=4)
            produce(settings, topic, [(key, value, headers)])
            produced = time.monotonic()
            for event, data in events:
                if event == "record":
                    break
            latency = time.monotonic() - produced
        assert data["record"]["device"] == DEVICES[0]
        assert data["device"]["status"] == "Inactive"
        assert (data["device"]["x"], data["device"]["y"]) == (3, 4)
        assert latency < 1.0, f"record reached the stream after {latency:.2f} s"

        def lag_committed():
            lag = requests.get(view.url + "/api/lag", timeout=5).json()
            return lag if lag["partitions"] and sum(p["high"] for p in lag["partitions"]) == 1 \
                and lag["total"] == 0 else None
        lag = wait_for(lag_committed, 10, message="the live view's group to commit")
        assert lag["group"] == view.group and len(lag["partitions"]) == 6
    finally:
        assert view.stop() == 0


# A device as its own process, so that it can be killed: it connects with its certificate,
# publishes once and waits.
DEVICE_PROCESS = """
import sys, threading
from common.config import load_settings
from rabbitmq import naming
from tests.helpers import MqttDevice
device = sys.argv[1]
client = MqttDevice(load_settings(), device)
assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
assert client.publish(naming.mqtt_topic(device, "info"), b'{"seq": 1, "status": "Active"}')
print("published", flush=True)
threading.Event().wait()
"""


def test_presence_of_a_killed_device_reaches_kafka_and_the_live_view(
        settings, new_device, tmp_path):
    device = new_device("PR")
    env = consumer_env(settings)
    bridge = BridgeProcess(settings, tmp_path, "--queues", f"webos.{device}", env=env)
    view = LiveView(settings, settings.kafka_topic)
    try:
        wait_for(lambda: "consuming webos.presence" in bridge.output, 30,
                 message="the bridge to consume webos.presence", watch=[bridge.app])
        client = AppProcess(["-c", DEVICE_PROCESS, device], env, tmp_path / "device.log")
        wait_for(lambda: "published" in client.output(), 30, message="the device to publish",
                 watch=[client])
        assert client.kill() == -signal.SIGKILL

        shown = run_consumer(settings, "--presence", "--from-beginning", "--device", device,
                             "--format", "json", "--count", "2")
        assert shown.returncode == 0, shown.stderr
        records = [json.loads(line) for line in shown.stdout.splitlines()]
        assert [(r["key"], r["headers"]["type"], r["payload"]["type"]) for r in records] == [
            (device, "connected", "connected"), (device, "disconnected", "disconnected")]
        with endpoints.management_api(settings) as http:
            node = http.get(f"{settings.management_url}/api/overview", timeout=10).json()["node"]
        assert all(r["payload"]["client_id"] == device and r["payload"]["device"] == device
                   and r["payload"]["node"] == node for r in records)
        assert records[0]["payload"]["ts"] <= records[1]["payload"]["ts"]

        def shown_offline():
            devices = requests.get(view.url + "/api/state", timeout=5).json()["devices"]
            row = next((d for d in devices if d["id"] == device), None)
            return row if row and row["online"] is False else None
        row = wait_for(shown_offline, 30, 0.2, f"the live view to show {device} offline")
        assert row["online_since"] == records[1]["payload"]["ts"]
        pretty = run_consumer(settings, "--presence", "--from-beginning", "--device", device,
                              "--count", "2", "--color", "never")
        assert [line.split()[1:3] for line in pretty.stdout.splitlines()] == [
            [device, "connected"], [device, "disconnected"]]
    finally:
        view.stop()
        bridge.stop(timeout=30)
