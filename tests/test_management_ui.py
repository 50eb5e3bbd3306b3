"""The RabbitMQ management UI as its users use it: log in, Queues tab, Get messages."""
import json
import uuid

import pytest

from rabbitmq import naming
from tests.helpers import MqttDevice

pytestmark = pytest.mark.browser


@pytest.fixture
def ui_page(browser):
    """A page that accepts the broker's certificate, as a user who imported ca.crt would (the
    suite checks that certificate against the authority in test_device_identity.py)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, ignore_https_errors=True)
    page = context.new_page()
    page.set_default_timeout(15000)
    yield page
    context.close()


def test_admin_logs_in_finds_device_queue_and_reads_a_message(settings, admin_channel, ui_page,
                                                              artifacts):
    page = ui_page
    admin_channel.queue_purge("webos.3DF92-192")
    marker = uuid.uuid4().hex
    device = MqttDevice(settings, "3DF92-192")  # the registered device's own certificate
    try:
        body = json.dumps({"Producer": "3DF92-192", "command": "position", "marker": marker})
        assert device.publish(naming.mqtt_topic("3DF92-192", "info"), body.encode())
    finally:
        device.close()

    assert settings.management_url.startswith("https://")
    page.goto(settings.management_url + "/")
    page.fill("input[name=username]", settings.admin_user)
    page.fill("input[name=password]", settings.admin_password)
    page.click("input[type=submit]")
    # Stop the 5 s auto-refresh, which would redraw the page under the message we fetch.
    page.select_option("#update-every", label="Do not refresh")
    page.click("#tabs a[href='#/queues']")
    page.click("a:text-is('webos.3DF92-192')")
    page.wait_for_selector("h1:has-text('webos.3DF92-192')")
    page.click("h2:text-is('Get messages')")
    page.click("input[value='Get Message(s)']")
    page.wait_for_selector(f"#msg-wrapper >> text={marker}")
    page.wait_for_function("document.querySelector('#msg-wrapper').offsetHeight > 100")  # slid open
    page.locator("#msg-wrapper").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "management-ui-get-messages.png"))

    assert "webos.3DF92-192.info" in page.inner_text("#msg-wrapper")
