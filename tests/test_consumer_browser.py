"""The live page in headless Chromium: records produced to Kafka appear, status changes show on the map."""
import logging
import shutil
import time

import pytest

from stack.config import REPO_ROOT
from tests.test_consumer import LiveView, device_record, new_topic, produce

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
    return page.eval_on_selector(f'#markers .device[data-device="{device}"] circle',
                                 "circle => getComputedStyle(circle).fill")


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
    assert f"seq=8 (8, 2)" in log
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
    seconds = time.monotonic() - produced
    LOGGER.info("Inactive record confirmed by Kafka -> grey on the map: %.3f s", seconds)
    assert seconds < 1.0, f"the map turned the device grey {seconds:.2f} s after the record"
    assert marker_fill(page, walking) == GREEN
    assert "Inactive" in page.locator(f'#devices tr[data-device="{stopping}"]').inner_text()

    # the group's lag per partition: 6 partitions, all committed within a couple of seconds
    page.wait_for_function("document.querySelectorAll('#lag tbody tr').length === 6")
    page.wait_for_function("document.getElementById('lag-total').textContent === '0'",
                           timeout=10000)

    screenshot = artifacts / "consumer-live-view.png"
    page.screenshot(path=str(screenshot), full_page=True)
    (REPO_ROOT / "docs").mkdir(exist_ok=True)
    shutil.copy(screenshot, REPO_ROOT / "docs" / "consumer.png")
