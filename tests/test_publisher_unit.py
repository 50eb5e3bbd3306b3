"""The publisher's pure logic: device configs, the per-device state machine, lateness counts."""
from __future__ import annotations

import json
import random

import pytest

from common.devices import (ACTIVE, INACTIVE, DeviceConfig, load_devices,
                                     parse_interval, parse_route)
from common.config import Settings
from publisher.device_model import DeviceState
from publisher.lateness import Lateness

ROUTE = ((0, 0), (1, 1), (2, 4))


def state(status=ACTIVE, interval=(1.0, 2.0)) -> DeviceState:
    return DeviceState(DeviceConfig("D1", ROUTE, interval, status), random.Random(7))


def test_the_default_file_has_the_seed_devices_active_every_1_to_2_seconds():
    devices = load_devices(Settings().devices_path)
    assert [d.id for d in devices] == ["3DF92-192", "4HHC2-392"]
    assert all(d.status == ACTIVE and d.interval == (1.0, 2.0) and len(d.route) > 2 for d in devices)


def test_command_line_interval_overrides_the_file(tmp_path):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"devices": [{"id": "A", "interval": [5, 6]}, {"id": "B"}]}))
    assert [d.interval for d in load_devices(path)] == [(5.0, 6.0), (1.0, 2.0)]
    assert [d.interval for d in load_devices(path, interval=(0.5, 0.7))] == [(0.5, 0.7)] * 2


@pytest.mark.parametrize("document, problem", [
    ("[]", "must hold an object"),
    ('{"devices": [{"id": "A"}, {"id": "A"}]}', "twice"),
    ('{"devices": [{"id": "a.b"}]}', "invalid device id"),
    ('{"devices": [{"id": "A", "route": "north"}]}', "route"),
    ('{"devices": [{"id": "A"}], "interval": [0, 1]}', "interval"),
    ("{not json", "cannot read"),
])
def test_a_broken_devices_file_is_refused_naming_the_problem(tmp_path, document, problem):
    path = tmp_path / "devices.json"
    path.write_text(document)
    with pytest.raises(ValueError, match=problem):
        load_devices(path)


@pytest.mark.parametrize("raw", [[], "x", [[1]], [[1, 2, 3]], [["a", 1]], [[True, 1]], None])
def test_parse_route_refuses_what_is_not_a_list_of_pairs(raw):
    with pytest.raises(ValueError):
        parse_route(raw)


@pytest.mark.parametrize("raw, expected", [([1, 2], (1.0, 2.0)), (0.5, (0.5, 0.5)), ([0.05, 3600], (0.05, 3600.0))])
def test_parse_interval_accepts(raw, expected):
    assert parse_interval(raw) == expected


@pytest.mark.parametrize("raw", [[2, 1], [0, 1], [1, 4000], "1-2", [1], [True, 2], None])
def test_parse_interval_refuses(raw):
    with pytest.raises(ValueError):
        parse_interval(raw)


def test_payload_has_the_contract_keys_in_order_and_walks_the_route_wrapping_around():
    device = state()
    messages = [device.message() for _ in range(5)]
    assert list(messages[0]) == ["Producer", "command", "id", "x", "y", "status", "seq", "msg_id", "ts"]
    assert [(m["x"], m["y"]) for m in messages] == [ROUTE[i % 3] for i in range(5)]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5]
    assert len({m["msg_id"] for m in messages}) == 5


def test_turning_inactive_changes_generation_and_the_inactive_message_keeps_the_position():
    device = state()
    device.message()
    generation = device.generation
    assert device.set_status(INACTIVE) is True
    assert device.generation == generation + 1
    inactive = device.message()
    assert (inactive["status"], inactive["x"], inactive["y"], inactive["seq"]) == (INACTIVE, 1, 1, 2)
    assert device.position() == (1, 1)  # an Inactive report does not move the device


def test_repeating_a_status_is_no_change():
    device = state()
    generation = device.generation
    assert device.set_status(ACTIVE) is False
    assert device.generation == generation


def test_quick_inactive_active_inactive_makes_three_generations():
    device = state()
    assert [device.set_status(s) for s in (INACTIVE, ACTIVE, INACTIVE)] == [True, True, True]
    assert device.generation == 3  # publishes scheduled in generations 0-2 are all stale


def test_unknown_status_is_refused_and_changes_nothing():
    device = state()
    with pytest.raises(ValueError):
        device.set_status("Paused")
    assert (device.status, device.generation) == (ACTIVE, 0)


def test_operator_message_carries_type_and_text_before_seq():
    payload = state().message("message", type="warning", text="low battery")
    assert list(payload) == ["Producer", "command", "id", "x", "y", "status", "type", "text",
                             "seq", "msg_id", "ts"]
    assert payload["command"] == "message"


def test_next_interval_stays_in_the_configured_range():
    device = state(interval=(1.0, 2.0))
    intervals = [device.next_interval() for _ in range(1000)]
    assert 1.0 <= min(intervals) < 1.1 and 1.9 < max(intervals) <= 2.0


@pytest.mark.parametrize("raw, problem", [
    ({"id": "A", "status": "Sleeping"}, "status"),
    ({"id": "A", "speed": 3}, "unknown device field"),
    ({"route": [[0, 0]]}, "missing device id"),
    ({"id": ""}, "invalid device id"),
    ("A", "JSON object"),
])
def test_device_config_from_json_names_the_problem(raw, problem):
    with pytest.raises(ValueError, match=problem):
        DeviceConfig.from_json(raw)


def test_lateness_counts_on_time_share_and_percentiles():
    lateness = Lateness()
    for late_ms in [0, 5, 50, 100, 101, 250, 2000, 20000]:
        lateness.add(late_ms / 1000)
    summary = lateness.summary()
    assert summary["scheduled"] == 8
    assert summary["on_time_share"] == pytest.approx(4 / 8)
    assert summary["p50_ms"] == 100
    assert summary["max_ms"] == 20000
    lateness.reset()
    assert lateness.summary()["scheduled"] == 0
