"""The publisher's page in headless Chromium: toggle a device and see its stream stop in its queue."""
from __future__ import annotations

import json
import threading
import uuid

import pika
import pytest
from werkzeug.serving import make_server

from publisher.app import create_app
from common.devices import DeviceConfig
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from tests.helpers import wait_for

pytestmark = pytest.mark.browser


@pytest.fixture
def served_publisher(settings):
    """The publisher app over real HTTP on a free port, with three devices of its own."""
    suffix = uuid.uuid4().hex[:4].upper()
    devices = [DeviceConfig(f"3DF92-{suffix}1", interval=(0.3, 0.6)),
               DeviceConfig(f"4HHC2-{suffix}2", interval=(0.3, 0.6)),
               DeviceConfig(f"7QX01-{suffix}3", interval=(0.3, 0.6), status="Inactive")]
    app = create_app({"SETTINGS": settings, "DEVICES": devices, "CONSUMER_URL": "http://127.0.0.1:5001/"})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    created = [d.id for d in devices]
    yield f"http://127.0.0.1:{server.server_port}", list(created), created
    server.shutdown()
    app.extensions["publisher"].close()
    with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
        channel = connection.channel()
        for device in created:
            topology.delete_device(channel, device)


def read_queue(channel, device):
    payloads = []
    while True:
        method, _, body = channel.basic_get(naming.device_queue(device), auto_ack=True)
        if method is None:
            return payloads
        payloads.append(json.loads(body))


def message_count(channel, device) -> int:
    return channel.queue_declare(naming.device_queue(device), passive=True).method.message_count


def test_clicking_a_toggle_shows_inactive_and_stops_the_devices_messages(
        served_publisher, page, admin_channel, artifacts):
    base, (device, other, _), created = served_publisher
    page.goto(base + "/")
    row = page.locator(f"tr[data-device='{device}']")
    other_row = page.locator(f"tr[data-device='{other}']")
    row.locator(".status", has_text="Active").wait_for()

    def shown_count(locator) -> int:
        return int(locator.locator(".count").inner_text().split()[0])
    # The message counter moves without a reload.
    wait_for(lambda: shown_count(row) >= 3, 10, message="the counter to grow on the page")

    admin_channel.queue_purge(naming.device_queue(device))
    row.locator("button.toggle", has_text="Deactivate").click()
    row.locator(".status", has_text="Inactive").wait_for()
    row.locator("button.toggle", has_text="Activate").wait_for()
    assert f"Status of {device} updated to Inactive" in page.inner_text("#notice")

    received = []
    wait_for(lambda: received.extend(read_queue(admin_channel, device)) or
             any(m["status"] == "Inactive" for m in received), 5, message="the Inactive message")
    count_on_page = shown_count(row)
    admin_channel.queue_purge(naming.device_queue(other))
    other_on_page = shown_count(other_row)
    wait_for(lambda: message_count(admin_channel, other) >= 4, 10,
             message="the other device to keep reporting")
    wait_for(lambda: shown_count(other_row) >= other_on_page + 4, 10,
             message="the page to refresh the other device")
    received.extend(read_queue(admin_channel, device))
    assert [m["status"] for m in received].count("Inactive") == 1
    assert received[-1]["status"] == "Inactive"  # and nothing after it
    assert shown_count(row) == count_on_page  # the page agrees: no more messages

    new_device = "9NEW0-" + device[-5:]
    created.append(new_device)
    page.fill("#add-form input[name=id]", new_device)
    page.click("#add-form button[type=submit]")
    page.locator(f"tr[data-device='{new_device}'] .status", has_text="Active").wait_for()
    wait_for(lambda: message_count(admin_channel, new_device) >= 1, 5, message="the new device's queue")
    screenshot = artifacts / "publisher.png"
    # test-artifacts/ only: docs/ holds a reviewed copy, updated by hand.
    page.screenshot(path=str(screenshot), full_page=True)
