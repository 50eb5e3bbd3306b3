"""The live page in headless Chromium: records produced to Kafka appear, status changes show on the map."""
import logging
import time
import uuid

import pytest
import requests

from common.devices import DeviceConfig
from publisher.simulator import Simulator
from rabbitmq import topology
from stack.process import AppProcess, free_port
from tests.helpers import answers, wait_for
from tests.support.bridge import BridgeProcess
from tests.support.commands import start_relay
from tests.support.consumer import LiveView, consumer_env, device_record, new_topic, produce

pytestmark = pytest.mark.browser
LOGGER = logging.getLogger(__name__)

GREEN = "rgb(46, 157, 74)"
GREY = "rgb(154, 160, 166)"
WALK = [(1, 1), (2, 1), (3, 2), (4, 4), (5, 5), (6, 5), (7, 3), (8, 2)]


@pytest.fixture
def live_view(settings):
    topic = new_topic(settings, "test.consumer.browser")
    view = LiveView(settings, topic)
    yield view, topic
    assert view.stop() == 0


def marker_fill(page, device: str) -> str:
    """The marker's fill, found and read in one script: the page redraws its markers every
    second, and a circle found in one call may be detached (its computed fill '') by the next."""
    return page.evaluate("""device => {
        const circle = document.querySelector(`#markers .device[data-device="${device}"] circle`);
        return circle ? getComputedStyle(circle).fill : null; }""", device)


def test_live_page_shows_records_and_turns_an_inactive_device_grey(settings, live_view, page,
                                                                   artifacts):
    view, topic = live_view
    page.goto(view.url + "/")
    page.wait_for_selector('#connection[data-state="open"]')

    walking, stopping = "3DF92-192", "4HHC2-392"
    records = []
    for seq, (x, y) in enumerate(WALK, start=1):
        records.append(device_record(walking, seq, x=x, y=y))
        records.append(device_record(stopping, seq, x=9 - x, y=y + 1,
                                     message_type="warning" if seq == 5 else "info"))
    records.append((walking, b"not JSON: a stray line", {"device": walking}))
    produce(settings, topic, records)

    page.wait_for_selector(f'#markers .device[data-device="{walking}"][data-status="Active"]')
    page.wait_for_selector(f'#markers .device[data-device="{stopping}"][data-status="Active"]')
    assert marker_fill(page, stopping) == GREEN
    page.wait_for_function("document.querySelectorAll('#log li').length === 17")
    log = page.inner_text("#log")
    assert "non-JSON" in log and "not JSON: a stray line" in log
    assert "seq=8 (8, 2)" in log
    row = page.locator(f'#devices tr[data-device="{walking}"]')
    assert "8, 2" in row.inner_text() and "Active" in row.inner_text()
    assert page.inner_text("#total-non-json") == "1"

    # the publisher toggles a device: it sends one last Inactive message, then stays silent
    produce(settings, topic, [device_record(stopping, 9, status="Inactive", x=1, y=7)])
    produced = time.monotonic()
    page.wait_for_function(
        """([device, grey]) => {
             const circle = document.querySelector(`#markers .device[data-device="${device}"] circle`);
             return circle && circle.parentNode.dataset.status === "Inactive"
                    && getComputedStyle(circle).fill === grey;
           }""", arg=[stopping, GREY], timeout=5000)
    # How fast is a figure, not a check (the 5 s above bounds the wait): it is logged.
    LOGGER.info("Inactive record confirmed by Kafka -> grey on the map: %.3f s",
                time.monotonic() - produced)
    assert marker_fill(page, walking) == GREEN
    assert "Inactive" in page.locator(f'#devices tr[data-device="{stopping}"]').inner_text()

    # the group's lag per partition: 6 partitions, all committed within a couple of seconds
    page.wait_for_function("document.querySelectorAll('#lag tbody tr').length === 6")
    page.wait_for_function("document.getElementById('lag-total').textContent === '0'",
                           timeout=10000)

    screenshot = artifacts / "consumer-live-view.png"
    # test-artifacts/ only: docs/ holds a reviewed copy, updated by hand.
    page.screenshot(path=str(screenshot), full_page=True)


def app_process(settings, log_path, *args: str) -> AppProcess:
    """A `python -m <package>` app with the consumer's environment, its output in `log_path`."""
    return AppProcess(list(args), consumer_env(settings), log_path)


def alive(process: AppProcess) -> bool:
    assert process.running, process.output()
    return True


def test_toggle_on_the_publisher_page_turns_the_device_grey_on_the_live_page(
        settings, page, artifacts, tmp_path, admin_channel):
    """End to end: publisher -> MQTT -> RabbitMQ -> bridge -> Kafka -> live view, both pages driven."""
    suffix = uuid.uuid4().hex[:4].upper()
    stopping, walking = f"3DF92-{suffix}1", f"4HHC2-{suffix}2"
    topic = new_topic(settings, "test.consumer.e2e")
    publisher_port = free_port()
    publisher = app_process(settings, tmp_path / "publisher.log", "publisher", "--port",
                            str(publisher_port), "--devices", f"{stopping},{walking}",
                            "--interval", "0.3", "0.6")
    bridge = view = None
    try:
        publisher_url = f"http://127.0.0.1:{publisher_port}/"
        wait_for(lambda: alive(publisher) and answers(publisher_url), 30,
                 message="the publisher page")
        bridge = BridgeProcess(settings, tmp_path, "--queues", f"webos.{stopping},webos.{walking}",
                               "--topic-template", topic, env=consumer_env(settings))
        view = LiveView(settings, topic)

        page.goto(view.url + "/")
        for device in (stopping, walking):
            page.wait_for_selector(f'#markers .device[data-device="{device}"][data-status="Active"]',
                                   timeout=30000)
        assert alive(bridge.app)
        publisher_page = page.context.new_page()
        publisher_page.goto(publisher_url)
        publisher_page.locator(f"tr[data-device='{stopping}'] button.toggle",
                               has_text="Deactivate").click()
        clicked = time.monotonic()
        page.wait_for_function(
            """([device, grey]) => {
                 const circle = document.querySelector(`#markers .device[data-device="${device}"] circle`);
                 return circle && getComputedStyle(circle).fill === grey;
               }""", arg=[stopping, GREY], timeout=10000)
        # How fast is a figure, not a check: it is logged (1.1 s once on a busy CI machine,
        # where a 1 s limit failed the suite); the 10 s above bounds the wait.
        LOGGER.info("publisher toggle click -> grey on the live map: %.3f s",
                    time.monotonic() - clicked)

        # it stopped: its record count stands still while the other device keeps moving
        count = page.locator(f'#devices tr[data-device="{stopping}"] td.count')
        stopped_at = count.inner_text()
        other = page.locator(f'#devices tr[data-device="{walking}"] td.count')
        walking_at = int(other.inner_text())
        wait_for(lambda: int(other.inner_text()) >= walking_at + 3, 10,
                 message="the other device to keep reporting")
        assert count.inner_text() == stopped_at
        assert marker_fill(page, walking) == GREEN

        # presence, from RabbitMQ's connection events through the bridge and webos.presence:
        # both devices online; removing one on the publisher disconnects it, and it shows offline
        for device in (stopping, walking):
            page.wait_for_selector(f'#devices tr[data-device="{device}"] [data-online="online"]',
                                   timeout=15000)
        removed = requests.delete(f"{publisher_url}devices/{stopping}", timeout=10)
        assert removed.status_code == 200, removed.text
        page.wait_for_selector(f'#devices tr[data-device="{stopping}"] [data-online="offline"]',
                               timeout=15000)
        assert "offline since" in page.locator(f'#devices tr[data-device="{stopping}"]').inner_text()
        assert page.locator(f'#devices tr[data-device="{walking}"] [data-online="online"]').count() == 1
        # Every column fits the page at 1280 px: nothing to scroll sideways to (the exact times
        # are in the cells' titles).
        widths = page.evaluate("""() => {
            const panel = document.querySelector(".devices-panel");
            return [panel.scrollWidth, panel.clientWidth,
                    document.documentElement.scrollWidth, window.innerWidth,
                    [...document.querySelectorAll("#devices th, #devices tr:last-child td")]
                      .map(cell => `${cell.textContent}:${cell.offsetWidth}`)]; }""")
        assert widths[0] <= widths[1] and widths[2] <= widths[3], f"wider than the page: {widths}"
        page.screenshot(path=str(artifacts / "consumer-live-view-end-to-end.png"), full_page=True)
    finally:
        statuses = {name: process.stop() for name, process in
                    (("view", view), ("bridge", bridge), ("publisher", publisher)) if process}
        for device in (stopping, walking):
            topology.delete_device(admin_channel, device)
    assert statuses == {"view": 0, "bridge": 0, "publisher": 0}


def test_the_live_page_switch_turns_a_simulated_device_inactive_through_kafka(
        settings, page, tmp_path, new_device, artifacts):
    """Live page switch -> POST -> Kafka webos.commands -> relay -> the device's MQTT session ->
    the simulated device applies set-status and reports -> webos.state -> the live page."""
    device = new_device("LIVE")
    relay = start_relay(settings, tmp_path / "relay.log")
    simulator = Simulator(settings, [DeviceConfig(device, interval=(0.5, 0.5))])
    simulator.start()
    view = None
    try:
        wait_for(lambda: simulator.stats()["subscribed"] == 1, 15, message="its subscriptions")
        view = LiveView(settings, new_topic(settings, "test.consumer.switch"))
        page.goto(view.url + "/")
        row = f'#devices tr[data-device="{device}"]'
        page.locator(f'{row} button.switch[data-target="Inactive"]').click(timeout=30000)
        page.wait_for_selector(f'{row} td.desired[data-desired="Inactive"][data-reported="Inactive"]',
                               timeout=15000)
        assert simulator.device(device)["status"] == "Inactive"
        assert page.locator(f"{row} .badge.pending").count() == 0
        assert "asked" in page.inner_text("#command-notice")
        page.screenshot(path=str(artifacts / "consumer-live-view-switch.png"), full_page=True)
        # and back, from the same switch
        page.locator(f'{row} button.switch[data-target="Active"]').click(timeout=10000)
        page.wait_for_selector(f'{row} td.desired[data-desired="Active"][data-reported="Active"]',
                               timeout=15000)
        assert simulator.device(device)["status"] == "Active"
    finally:
        simulator.close()
        if view:
            assert view.stop() == 0
        assert relay.stop() == 0, relay.output(30)
