"""The command contract without brokers: command records checked, replies read, expiry found,
desired and reported state merged, and a simulated device applying each command once."""
from __future__ import annotations

import json

import pytest

from common import command_records as records
from common.device_state import DeviceState
from publisher.device_commands import DeviceCommands
from rabbitmq import naming


def command(key: str | None, **value) -> records.Command:
    raw = json.dumps(value).encode()
    return records.parse_command(key.encode() if key is not None else None, raw, 3600, 86400)


def test_a_command_record_becomes_a_command_to_its_device():
    parsed = command("D1", command_id="c-1", name="set-status", args={"status": "Inactive"},
                     ttl_s=30)
    assert parsed == records.Command("D1", "c-1", "set-status", {"status": "Inactive"}, 30.0)
    assert parsed.routing_key == "webos.D1.command"
    body = json.loads(parsed.body(1000))
    assert body == {"command_id": "c-1", "name": "set-status", "args": {"status": "Inactive"},
                    "sent_at": 1000, "expires_at": 31000, "reply_to": "webos/D1/reply"}


def test_a_broadcast_goes_to_the_broadcast_key_and_names_no_reply_topic():
    parsed = command("broadcast", command_id="b-1", name="ping")
    assert parsed.broadcast and parsed.routing_key == "webos.broadcast.command"
    assert parsed.ttl_s == 3600 and "reply_to" not in json.loads(parsed.body(0))


@pytest.mark.parametrize("key, value, problem, command_id", [
    ("D1", b"not json", "not JSON", None),
    ("D1", b"[1]", "not a JSON object", None),
    ("D1", b'{"name": "ping"}', "command_id", None),
    ("D1", b'{"command_id": "has space", "name": "ping"}', "command_id", None),
    ("bad.key", b'{"command_id": "c", "name": "ping"}', "neither a device id", "c"),
    ("webos-admin", b'{"command_id": "c", "name": "ping"}', "neither a device id", "c"),
    ("D1", b'{"command_id": "c", "name": "Ping!"}', "name must be", "c"),
    ("D1", b'{"command_id": "c", "name": "ping", "args": [1]}', "args must be", "c"),
    ("D1", b'{"command_id": "c", "name": "ping", "ttl_s": 0}', "ttl_s", "c"),
    ("D1", b'{"command_id": "c", "name": "ping", "ttl_s": 90000}', "ttl_s", "c"),
    ("D1", b'{"command_id": "c", "name": "ping", "ttl_s": true}', "ttl_s", "c"),
])
def test_a_bad_command_record_is_refused_with_its_reason(key, value, problem, command_id):
    with pytest.raises(records.InvalidCommand, match=problem) as raised:
        records.parse_command(key.encode(), value, 3600, 86400)
    assert raised.value.command_id == command_id


def test_broadcast_is_a_reserved_device_id():
    assert not naming.is_valid_device_id("broadcast")
    assert naming.command_topic("broadcast") == "webos/broadcast/command"
    assert naming.command_topic("D1") == "webos/D1/command"


def test_a_reply_and_a_report_are_read():
    reply = records.parse_reply("D1", b'{"command_id": "c", "status": "failed", "detail": "x"}')
    assert (reply.command_id, reply.status, reply.detail, reply.reported) == ("c", "failed", "x", None)
    report = records.parse_reply("D1", b'{"reported": {"status": "Active"}}')
    assert report.command_id is None and report.reported == {"status": "Active"}


@pytest.mark.parametrize("body", [b"nope", b'"x"', b'{}', b'{"command_id": "c"}',
                                  b'{"command_id": "c", "status": "expired"}',
                                  b'{"reported": [1]}'])
def test_a_bad_reply_is_refused(body):
    with pytest.raises(ValueError):
        records.parse_reply("D1", body)


def test_an_expired_command_names_its_device_from_the_session_queue():
    headers = {"x-death": [{"reason": b"expired", "queue": b"mqtt-subscription-D1qos1"}]}
    body = b'{"command_id": "c", "name": "ping"}'
    assert records.expired_command(headers, body) == ("D1", "c", "ping")
    assert records.expired_command({"x-death": [{"reason": b"rejected",
                                                 "queue": b"mqtt-subscription-D1qos1"}]}, body) is None
    assert records.expired_command(None, body) is None


def test_the_feedback_record_has_the_documented_fields():
    value = json.loads(records.feedback("D1", "c", records.SUCCEEDED, "ok", name="ping",
                                        sent_at=1, completed_at=2))
    assert tuple(value) == records.FEEDBACK_FIELDS
    assert value["status"] == "succeeded" and value["broadcast"] is False


def test_a_desired_value_raises_the_version_and_travels_with_the_command():
    state, args = DeviceState().desire("set-status", {"status": "Inactive"}, 5)
    assert state.desired == {"status": "Inactive"} and state.version == 1
    assert args == {"status": "Inactive", "version": 1}
    assert state.delta() == {"status": "Inactive"}
    reported = state.report({"status": "Inactive", "interval": [1, 2]}, 6)
    assert reported.delta() == {} and reported.version == 1
    assert reported.report({"status": "Inactive"}, 7) is None  # nothing changed
    assert DeviceState().desire("ping", {}, 5) is None


def test_the_state_record_round_trips():
    state = DeviceState({"status": "Active"}, {"status": "Inactive"}, 3, 9)
    assert DeviceState.from_json(state.to_json()) == state
    assert DeviceState.from_json(b"garbage") == DeviceState()


class FakeDevice:
    def __init__(self):
        self.status, self.interval = "Active", (1.0, 2.0)
        self.commands = DeviceCommands(self.set_status, self.set_interval, self.reported)

    def set_status(self, status):
        self.status = status

    def set_interval(self, interval):
        self.interval = interval

    def reported(self):
        return {"status": self.status, "interval": list(self.interval)}


def message(command_id: str, name: str, **args) -> bytes:
    return json.dumps({"command_id": command_id, "name": name, "args": args}).encode()


def test_a_device_applies_a_command_once_and_answers_with_its_state():
    device = FakeDevice()
    answer = device.commands.handle(message("c1", "set-status", status="Inactive", version=1))
    assert (answer.status, answer.reported["status"]) == ("succeeded", "Inactive")
    device.status = "Active"  # the page's switch, on the device itself
    assert device.commands.handle(message("c1", "set-status", status="Inactive", version=1)) is None
    assert device.status == "Active"


def test_an_older_desired_value_is_never_applied_again():
    device = FakeDevice()
    device.commands.handle(message("c2", "set-status", status="Inactive", version=2))
    answer = device.commands.handle(message("c1", "set-status", status="Active", version=1))
    assert answer.status == "rejected" and answer.detail.startswith("stale-version")
    assert device.status == "Inactive"


@pytest.mark.parametrize("body, detail", [
    (message("c", "reboot"), "unknown-command"),
    (message("c", "set-status", status="Sleeping"), "invalid-args"),
    (message("c", "set-interval", interval=[0, 1]), "invalid-args"),
    (json.dumps({"command_id": "c", "name": "ping", "args": 3}).encode(), "invalid-args"),
])
def test_a_device_refuses_what_it_cannot_do(body, detail):
    answer = FakeDevice().commands.handle(body)
    assert answer.status == "rejected" and answer.detail.startswith(detail)


def test_a_message_without_a_command_id_gets_no_answer():
    assert FakeDevice().commands.handle(b'{"name": "ping"}') is None
    assert FakeDevice().commands.handle(b"junk") is None
