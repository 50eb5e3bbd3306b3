"""The publisher's REST API on test_client(), no broker: each bad input gets its status code, a
JSON message, and reaches neither the simulator nor RabbitMQ (tests/test_publisher.py shows the
same on the real broker for one case of each code)."""
from __future__ import annotations

from concurrent.futures import Future

import pytest

from publisher.app import create_app
from common.devices import ACTIVE, DEFAULT_ROUTE, DeviceConfig
from publisher.simulator import DuplicateDevice, UnknownDevice
from common.config import Settings
from tests.support.publisher_api import BAD_INPUT, fill

DEVICE = "UA-1"
NOWHERE = Settings(amqp_port=1, mqtt_port=1, management_port=1)  # nothing listens on port 1


def done(result) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


def failed(error: Exception) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


class RecordingSimulator:
    """The simulator's API over a dict of device snapshots; records every command it is given."""

    def __init__(self, devices):
        self.devices = {d.id: {"id": d.id, "status": d.status, "connected": True, "messages": 0,
                               "interval": list(d.interval), "route_length": len(d.route)}
                        for d in devices}
        self.commands: list[tuple] = []

    def __contains__(self, device):
        return device in self.devices

    def device(self, device):
        return dict(self.devices[device]) if device in self.devices else None

    def snapshot(self):
        return [dict(d) for d in self.devices.values()]

    def stats(self):
        return {"devices": len(self.devices),
                "active": sum(d["status"] == ACTIVE for d in self.devices.values())}

    def set_status(self, device, status):
        self.commands.append(("set_status", device, status))
        if device not in self.devices:
            return failed(UnknownDevice(device))
        changed = self.devices[device]["status"] != status
        self.devices[device]["status"] = status
        return done(changed)

    def add_device(self, config):
        self.commands.append(("add_device", config.id))
        if config.id in self.devices:
            return failed(DuplicateDevice(config.id))
        self.devices[config.id] = {"id": config.id, "status": config.status}
        return done(self.devices[config.id])

    def remove_device(self, device):
        self.commands.append(("remove_device", device))
        return done(self.devices.pop(device)) if device in self.devices else failed(UnknownDevice(device))

    def send_message(self, device, message_type, text):
        self.commands.append(("send_message", device, message_type, text))
        return done({"id": device, "type": message_type, "text": text})

    def close(self):
        self.commands.append(("close",))


class RecordingAdminLink:
    """The admin link's API; records every call instead of talking to RabbitMQ."""

    def __init__(self):
        self.calls: list[tuple] = []

    def enrol(self, devices):
        self.calls.append(("enrol", list(devices)))

    def remove_enrolment(self, device):
        self.calls.append(("remove_enrolment", device))

    def declare_devices(self, devices):
        self.calls.append(("declare_devices", list(devices)))

    def delete_device_queue(self, device):
        self.calls.append(("delete_device_queue", device))

    def broadcast(self, text):
        self.calls.append(("broadcast", text))
        return {"command": "emergency", "message": text, "devices_reached": True}

    def close(self):
        pass


@pytest.fixture
def app():
    """The app over a recording simulator with one Active device and a recording admin link."""
    app = create_app({"SETTINGS": NOWHERE, "TESTING": True, "API_TOKEN": None,
                      "START_SIMULATOR": False,
                      "SIMULATOR": RecordingSimulator([DeviceConfig(DEVICE, DEFAULT_ROUTE)]),
                      "ADMIN_LINK": RecordingAdminLink()})
    app.simulator = app.extensions["publisher"].simulator
    app.admin = app.extensions["publisher"].admin
    return app


@pytest.fixture
def client(app):
    return app.test_client()


# -- bad input: each gets its status code, a JSON message, and changes nothing ------------------


@pytest.mark.parametrize("case, method, path, kwargs, status", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_refused_with_json_and_changes_nothing(case, method, path, kwargs, status,
                                                            app, client):
    before = client.get("/devices").get_json()

    answer = client.open(fill(path, DEVICE, "UNEW-1"), method=method, **fill(kwargs, DEVICE, "UNEW-1"))

    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.mimetype == "application/json"
    assert answer.get_json()["message"]
    assert client.get("/devices").get_json() == before
    assert app.simulator.commands == [] and app.admin.calls == []  # nothing reached a device or RabbitMQ


def test_invalid_status_answer_keeps_the_seed_message(client):
    answer = client.post(f"/status/{DEVICE}", json={"status": "Paused"})
    assert answer.status_code == 400
    assert answer.get_json()["message"] == "Invalid status"


@pytest.mark.parametrize("header, status", [(None, 401), ("Bearer wrong", 401), ("secret-t0ken", 401),
                                            ("Bearer secret-t0ken", 200)])
def test_api_token_is_required_for_state_changes_when_set(app, client, header, status):
    app.config["API_TOKEN"] = "secret-t0ken"
    headers = {"Authorization": header} if header else {}
    answer = client.post(f"/status/{DEVICE}", json={"status": "Inactive"}, headers=headers)
    assert answer.status_code == status
    assert answer.is_json
    assert client.get("/devices").status_code == 200  # reading needs no token
    if status == 401:
        assert answer.headers["WWW-Authenticate"] == 'Bearer realm="publisher"'
        assert app.simulator.commands == [] and client.get(f"/status/{DEVICE}").get_json()["status"] == ACTIVE
    else:
        assert app.simulator.commands == [("set_status", DEVICE, "Inactive")]


def test_good_calls_reach_the_simulator_and_the_admin_link(app, client):
    """The guards let well-formed calls through: each view hands its command on."""
    assert client.post(f"/status/{DEVICE}", json={"status": "Inactive"}).status_code == 200
    assert client.post("/devices", json={"id": "UNEW-1"}).status_code == 201
    assert client.post(f"/devices/{DEVICE}/messages", json={"type": "warning", "text": "hot"}).status_code == 202
    assert client.delete("/devices/UNEW-1?delete_queue=true").status_code == 200
    assert client.post("/broadcast", json={"message": "leave"}).status_code == 202
    assert app.simulator.commands == [("set_status", DEVICE, "Inactive"), ("add_device", "UNEW-1"),
                                      ("send_message", DEVICE, "warning", "hot"),
                                      ("remove_device", "UNEW-1")]
    # A new device is enrolled (certificate, broker user) before its queue; a removed one is
    # revoked before its queue goes.
    assert app.admin.calls == [("enrol", ["UNEW-1"]), ("declare_devices", ["UNEW-1"]),
                               ("remove_enrolment", "UNEW-1"), ("delete_device_queue", "UNEW-1"),
                               ("broadcast", "leave")]


def test_the_app_builds_without_a_broker_when_the_simulator_is_not_started():
    """START_SIMULATOR=False: no queue declared (RabbitMQ here would refuse), no device runs."""
    app = create_app({"SETTINGS": NOWHERE, "TESTING": True, "START_SIMULATOR": False,
                      "DEVICES": [DeviceConfig(DEVICE)]})
    try:
        client = app.test_client()
        assert client.get("/devices").get_json()["devices"] == []
        assert client.post("/status/bad.id", json={"status": "Active"}).status_code == 400
        page = client.get("/")
        assert page.status_code == 200 and "Consumer live view" in page.get_data(as_text=True)
    finally:
        app.extensions["publisher"].close()


def test_the_favicon_is_served(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 200 and response.mimetype == "image/svg+xml"
    assert response.data.startswith(b"<svg")
