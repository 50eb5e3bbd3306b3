"""Commands to devices on the real brokers: Kafka webos.commands -> relay (python -m bridge relay)
-> RabbitMQ -> the device's MQTT session -> its reply -> one final record in
webos.command-feedback, and the desired and reported state in webos.state."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid

import paho.mqtt.client as mqtt
import pytest

from common.config import REPO_ROOT
from common.devices import DeviceConfig
from publisher.admin_link import AdminLink
from publisher.app import create_app
from publisher.simulator import Simulator
from rabbitmq import naming
from stack.kafka_server import ensure_topic
from tests.helpers import MqttDevice, wait_for
from tests.support.command_device import CommandDevice
from tests.support.commands import CommandSender, mosquitto_sub, read_state, start_relay


@pytest.fixture(scope="module")
def relay(settings, tmp_path_factory):
    relay = start_relay(settings, tmp_path_factory.mktemp("relay") / "relay.log")
    yield relay
    assert relay.stop() == 0, relay.output(30)


@pytest.fixture
def commands(settings, relay):
    line = CommandSender(settings)
    yield line
    line.close()


@pytest.fixture
def device(settings, new_device):
    """A connected, subscribed device (MQTT 5) that acts on commands; disconnected after."""
    devices = []

    def make(protocol=mqtt.MQTTv5) -> CommandDevice:
        made = CommandDevice(settings, new_device("CMD"), protocol).connect()
        assert made.subscribed.wait(10) and all(code.value == 1 for code in made.granted), made.granted
        devices.append(made)
        return made

    yield make
    for made in devices:
        made.disconnect()


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_a_command_goes_to_the_device_and_its_reply_is_the_final_feedback(commands, device,
                                                                          protocol):
    target = device(protocol)
    command_id = commands.send(target.device, "ping")
    [final] = commands.wait_final(command_id)
    assert final["status"] == "succeeded" and final["detail"] == "pong"
    assert final["device"] == target.device and final["name"] == "ping"
    assert final["sent_at"] <= final["completed_at"]
    assert [value["status"] for value in commands.feedback[command_id]] == ["sent", "succeeded"]
    assert target.applied == [command_id]
    if protocol == mqtt.MQTTv5:  # the command id as MQTT 5 Correlation Data
        assert target.correlations == [command_id.encode()]


@pytest.mark.parametrize("topic", ["webos/{other}/command", "webos/+/command", "webos/#",
                                   "webos/{me}/reply", "webos/{other}/info"])
def test_a_device_may_subscribe_to_nothing_but_its_commands_and_the_broadcast(settings,
                                                                              new_device, topic):
    me, other = new_device("SUBA"), new_device("SUBB")
    printed = mosquitto_sub(settings, me, topic.format(me=me, other=other))
    assert "All subscription requests were denied" in printed, printed


def test_a_device_cannot_answer_for_another(settings, new_device, commands, device):
    target = device()
    forger = MqttDevice(settings, new_device("FORGE"), protocol=mqtt.MQTTv5)
    try:
        assert forger.connected.wait(10)
        command_id = commands.send(target.device, "set-status", {"status": "Inactive"}, ttl_s=5)
        assert not forger.publish(naming.reply_topic(target.device),
                                  b'{"command_id": "%s", "status": "failed"}' % command_id.encode(),
                                  timeout=3)
    finally:
        forger.close()
    [final] = commands.wait_final(command_id)
    assert final["status"] == "succeeded"


def test_commands_sent_while_a_device_is_away_arrive_in_order_when_it_returns(commands, device):
    target = device()
    target.disconnect()
    sent = [commands.send(target.device, "ping") for _ in range(20)]
    wait_for(lambda: commands.read() or all(commands.feedback.get(c) for c in sent), 20,
             message="the broker to confirm the commands")
    target.connect()
    wait_for(lambda: len(target.applied) == 20, 20, message="the queued commands")
    assert target.applied == sent
    assert all(commands.wait_final(c)[0]["status"] == "succeeded" for c in sent)


def test_a_command_whose_ttl_runs_out_is_reported_expired(commands, device):
    target = device()
    target.disconnect()
    command_id = commands.send(target.device, "ping", ttl_s=0.5)
    [final] = commands.wait_final(command_id)
    assert final["status"] == "expired" and final["name"] == "ping"
    target.connect()
    assert target.subscribed.wait(10)
    later = commands.send(target.device, "ping")
    assert commands.wait_final(later)[0]["status"] == "succeeded"
    assert command_id not in target.applied


def test_more_commands_than_a_device_may_queue_are_rejected_queue_full(settings, commands, device):
    target = device()
    target.disconnect()
    sent = [commands.send(target.device, "ping") for _ in range(settings.command_queue_limit + 5)]
    refused = wait_for(lambda: commands.read() or [c for c in sent[-5:] if commands.finals(c)], 20,
                       message="the overflow's feedback")
    wait_for(lambda: commands.read() or len([c for c in sent[-5:] if commands.finals(c)]) == 5, 20)
    assert all(commands.finals(c)[0]["status"] == "rejected"
               and commands.finals(c)[0]["detail"].startswith("queue-full") for c in sent[-5:])
    assert refused
    target.connect()
    wait_for(lambda: len(target.applied) == settings.command_queue_limit, 30,
             message="the queued commands")
    assert target.applied == sent[:settings.command_queue_limit]


def test_unknown_devices_sessionless_devices_and_bad_records_get_feedback(commands, new_device):
    unknown = commands.send(f"NOBODY{uuid.uuid4().hex[:6]}", "ping")
    away = commands.send(new_device("AWAY"), "ping")
    bad = commands.send("D1", "ping", ttl_s=-3)
    assert commands.wait_final(unknown)[0]["detail"].startswith("unknown-device")
    assert commands.wait_final(unknown)[0]["status"] == "rejected"
    assert commands.wait_final(away)[0]["status"] == "undeliverable"
    assert commands.wait_final(bad)[0]["detail"].startswith("invalid-command")
    # A record that is not even JSON is logged and skipped: the next one still goes through.
    commands.send("D1", "ping", raw=b"\xff not json")
    after = commands.send(f"NOBODY{uuid.uuid4().hex[:6]}", "ping")
    assert commands.wait_final(after)[0]["status"] == "rejected"


def test_a_device_refuses_a_command_it_does_not_know(commands, device):
    target = device()
    [final] = commands.wait_final(commands.send(target.device, "reboot"))
    assert final["status"] == "rejected" and final["detail"].startswith("unknown-command")


def test_a_broadcast_reaches_every_connected_device(commands, device):
    targets = [device() for _ in range(3)]
    command_id = commands.send(naming.BROADCAST, "ping")
    finals = commands.wait_final(command_id, count=3)
    assert {final["device"] for final in finals} == {target.device for target in targets}
    assert all(final["broadcast"] and final["status"] == "succeeded" for final in finals)


def test_desired_state_is_sent_applied_reported_and_never_applied_twice(settings, commands, device):
    target = device()
    first = commands.send(target.device, "set-status", {"status": "Inactive"})
    assert commands.wait_final(first)[0]["status"] == "succeeded"
    state = wait_for(lambda: (s := read_state(settings, target.device)) and s.reported and s,
                     10, message="the reported state")
    assert state.desired == {"status": "Inactive"} and state.reported["status"] == "Inactive"
    version = state.version
    second = commands.send(target.device, "set-status", {"status": "Active"})
    assert commands.wait_final(second)[0]["status"] == "succeeded"
    state = wait_for(lambda: (s := read_state(settings, target.device))
                     and s.reported["status"] == "Active" and s, 10)
    assert state.version == version + 1 and state.desired == {"status": "Active"}
    assert state.delta() == {}
    # An old desired value (version 1 again), as a stale copy would bring it: refused.
    stale = commands.send(target.device, "ping")  # a barrier: the device answered all before
    commands.wait_final(stale)
    answer = target.commands.handle(b'{"command_id": "old", "name": "set-status", '
                                    b'"args": {"status": "Inactive", "version": %d}}' % version)
    assert answer.status == "rejected" and target.status == "Active"


def test_the_publishers_emergency_broadcast_reaches_every_device_session(settings, commands,
                                                                        device):
    targets = [device(), device()]
    link = AdminLink(settings)
    try:
        payload = link.broadcast("evacuate hall 3")
    finally:
        link.close()
    assert payload["devices_reached"]
    finals = commands.wait_final(payload["msg_id"], count=2)
    assert {(final["device"], final["name"], final["status"]) for final in finals} == {
        (target.device, "emergency", "succeeded") for target in targets}
    assert all(target.commands.emergencies == ["evacuate hall 3"] for target in targets)


@pytest.mark.faults
def test_a_relay_killed_mid_stream_applies_each_command_exactly_once(settings, new_device,
                                                                     tmp_path):
    own = dataclasses.replace(settings, commands_topic=f"test.commands.{uuid.uuid4().hex[:6]}",
                              relay_group=f"test-relay-{uuid.uuid4().hex[:6]}")
    ensure_topic(own.kafka_bootstrap, own.commands_topic, 6)
    # 10 devices x 100 commands: no device is sent more than its queue holds (100), however far
    # behind it falls while the relay publishes.
    targets = [CommandDevice(own, new_device("KILL")).connect() for _ in range(10)]
    assert all(target.subscribed.wait(10) for target in targets)
    line = CommandSender(own)
    relay = start_relay(own, tmp_path / "relay.log")
    try:
        sent = {target.device: [line.send(target.device, "ping") for _ in range(100)]
                for target in targets}
        wait_for(lambda: sum(len(t.applied) for t in targets) >= 200, 60,
                 message="a fifth of the commands applied")
        relay.kill()
        at_kill = sum(len(t.applied) for t in targets)
        assert at_kill < 1000, "every command was applied before the relay could be killed"
        relay = start_relay(own, tmp_path / "relay-again.log")
        wait_for(lambda: all(len(t.applied) == 100 for t in targets), 120,
                 message="every command applied", watch=[relay])
        for target in targets:
            assert target.applied == sent[target.device]  # each once, in order
        last = [ids[-1] for ids in sent.values()]
        assert all(line.wait_final(c)[0]["status"] == "succeeded" for c in last)
    finally:
        relay.stop()
        line.close()
        for target in targets:
            target.disconnect()


def consumer_cli(settings, *args: str) -> subprocess.CompletedProcess:
    """`python -m consumer ARGS` run to its end, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "consumer", *args], cwd=REPO_ROOT,
                          env={**os.environ, **settings.to_env()}, capture_output=True,
                          text=True, timeout=120)


def test_the_cli_sends_a_command_waits_for_its_answer_and_shows_the_state(settings, relay,
                                                                         device):
    target = device()
    done = consumer_cli(settings, "command", target.device, "set-status", "--arg",
                        "status=Inactive", "--wait")
    assert done.returncode == 0, done.stderr
    assert f"{target.device}: set-status" in done.stdout and "succeeded" in done.stdout
    assert target.status == "Inactive"
    refused = consumer_cli(settings, "command", target.device, "reboot", "--wait")
    assert refused.returncode == 1 and "rejected" in refused.stdout, refused.stderr
    state = wait_for(lambda: (done := consumer_cli(settings, "state", target.device, "--format",
                                                   "json")).returncode == 0
                     and json.loads(done.stdout), 20, message="the device's state")
    assert state["desired"] == {"status": "Inactive"} and state["delta"] == {}
    assert state["reported"]["status"] == "Inactive"
    answers = consumer_cli(settings, "broadcast", "ping", "--wait", "3")
    assert f"{target.device}: ping" in answers.stdout and answers.returncode == 0, answers.stderr


@pytest.mark.parametrize("args, problem", [
    (["command", "bad.id", "ping"], "not a device id"),
    (["command", "D1", "Ping!"], "command name"),
    (["command", "D1", "ping", "--arg", "novalue"], "KEY=VALUE"),
])
def test_the_cli_refuses_bad_usage_with_a_reason(settings, args, problem):
    done = consumer_cli(settings, *args)
    assert done.returncode == 2 and problem in done.stderr


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_a_simulated_device_acts_on_commands_and_reports_its_own_switch(settings, commands,
                                                                        new_device, mqtt_version):
    device = new_device("SIM")
    simulator = Simulator(settings, [DeviceConfig(device, interval=(0.5, 0.5))],
                          mqtt_version=mqtt_version)
    simulator.start()
    try:
        wait_for(lambda: simulator.stats()["subscribed"] == 1, 15, message="its subscriptions")
        [final] = commands.wait_final(commands.send(device, "set-status", {"status": "Inactive"}))
        assert final["status"] == "succeeded"
        assert simulator.device(device)["status"] == "Inactive"
        [final] = commands.wait_final(commands.send(device, "set-interval", {"interval": [2, 3]}))
        assert final["status"] == "succeeded" and simulator.device(device)["interval"] == [2, 3]
        assert commands.wait_final(commands.send(device, "ping"))[0]["detail"] == "pong"
        # The switch on the device itself (the publisher's page): reported, not desired.
        simulator.set_status(device, "Active").result(10)
        state = wait_for(lambda: (s := read_state(settings, device))
                         and s.reported.get("status") == "Active" and s, 15,
                         message="the switch's report")
        assert state.desired == {"status": "Inactive", "interval": [2, 3]}
        assert state.delta() == {"status": "Inactive"}
        # Telemetry is not counted twice: replies and reports are not telemetry.
        wait_for(lambda: (d := simulator.device(device))["acked"] == d["messages"], 10)
    finally:
        simulator.close()


def test_a_real_device_enrolled_on_the_publisher_is_not_simulated_and_takes_commands(
        settings, commands, admin_channel):
    """POST /devices with "simulated": false enrols (certificate, user, queue) without running
    the device: the real device connects on its own, under its id, and gets its commands."""
    device = f"REAL{uuid.uuid4().hex[:8]}"
    app = create_app({"SETTINGS": settings, "DEVICES": [], "TESTING": True})
    client = app.test_client()
    real = None
    try:
        answer = client.post("/devices", json={"id": device, "simulated": False})
        assert answer.status_code == 201, answer.get_json()
        listing = client.get("/devices").get_json()
        assert device not in [d["id"] for d in listing["devices"]]
        assert [d["id"] for d in listing["enrolled"]] == [device]
        assert client.post("/devices", json={"id": device}).status_code == 409
        real = CommandDevice(settings, device).connect()  # no simulator fights over its id
        assert real.subscribed.wait(10)
        [final] = commands.wait_final(commands.send(device, "ping"))
        assert final["status"] == "succeeded"
        assert client.delete(f"/devices/{device}").status_code == 200
        assert client.get("/devices").get_json()["enrolled"] == []
    finally:
        if real:
            real.disconnect()
        app.extensions["publisher"].close()
        admin_channel.queue_delete(naming.device_queue(device))
