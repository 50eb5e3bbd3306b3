"""RabbitMQ 4: the version every test here runs, MQTT 5 next to 3.1.1, and the runtime's own logic."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from urllib.parse import quote

import paho.mqtt.client as mqtt
import pika
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import queue_depth
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from stack import rabbitmq_runtime
from stack.rabbitmq_runtime import DATA_MOUNT, Runtime
from tests.helpers import MqttDevice, get_message

PROTOCOLS = pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])


def overview(settings) -> dict:
    with endpoints.management_api(settings) as http:
        response = http.get(f"{settings.management_url}/api/overview", timeout=10)
    response.raise_for_status()
    return response.json()


def test_the_broker_is_rabbitmq_4_0(settings):
    assert overview(settings)["rabbitmq_version"].startswith("4.0."), overview(settings)


@pytest.fixture
def device(settings):
    clients = []

    def connect(protocol: int, as_device: str) -> MqttDevice:
        client = MqttDevice(settings, as_device, protocol=protocol)
        assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@PROTOCOLS
def test_qos1_publish_reaches_the_device_queue(settings, admin_channel, new_device, device, protocol):
    target = new_device()
    client = device(protocol, target)
    body = json.dumps({"id": target, "seq": 1}).encode()

    assert client.publish(naming.mqtt_topic(target, "warning"), body), "no PUBACK"

    assert client.last_puback_reason == 0
    method, properties, received = get_message(admin_channel, naming.device_queue(target))
    assert (received, method.routing_key) == (body, naming.routing_key(target, "warning"))
    assert properties.delivery_mode == 2


@PROTOCOLS
def test_publish_for_a_device_without_queue_is_acknowledged_and_kept(settings, admin_channel,
                                                                     device, protocol, request):
    # MQTT 5's PUBACK would say 16 "No matching subscribers" for a message routed nowhere (a
    # 3.1.1 PUBACK cannot say it); webos.topic's alternate exchange routes it to webos.unrouted,
    # so it is a plain Success and the message waits there.
    admin_channel.queue_purge(naming.UNROUTED_QUEUE)
    stranger = f"nobody-{uuid.uuid4().hex[:8]}"
    topology.enrol_devices(settings, [stranger])  # a device that may log in, with no queue
    request.addfinalizer(lambda: topology.remove_enrolment(settings, stranger))
    client = device(protocol, stranger)

    assert client.publish(naming.mqtt_topic(stranger, "info"), b'{"stray": true}')

    assert client.last_puback_reason == 0, client.last_puback_reason
    method, _, received = get_message(admin_channel, naming.UNROUTED_QUEUE)
    assert (received, method.routing_key) == (b'{"stray": true}', naming.routing_key(stranger, "info"))


def test_mqtt5_user_properties_and_content_type_arrive_as_amqp_properties(admin_channel, new_device,
                                                                          device):
    target = new_device()
    client = device(mqtt.MQTTv5, target)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ContentType = "application/json"
    properties.UserProperty = [("site", "hall 3"), ("firmware", "2.1")]

    assert client.publish(naming.mqtt_topic(target, "info"), b"{}", properties=properties)

    _, received, _ = get_message(admin_channel, naming.device_queue(target))
    assert received.content_type == "application/json"
    assert received.headers == {"site": "hall 3", "firmware": "2.1"}


def test_a_new_queue_is_answered_as_one_object_without_a_column_filter(settings, admin_channel):
    # For a queue whose statistics do not exist yet, RabbitMQ (3.10 and 4.0 alike) answers a
    # column-filtered query with an empty list; unfiltered, it is the queue's object (without
    # "messages" until the first statistics). bench's queue_depth asks unfiltered.
    api = f"{settings.management_url}/api/queues/{quote(settings.vhost, safe='')}"
    http = endpoints.management_api(settings)
    for _ in range(5):
        queue = f"test.new.{uuid.uuid4().hex[:8]}"
        admin_channel.queue_declare(queue, durable=False, exclusive=True)
        response = http.get(f"{api}/{queue}", timeout=10)
        assert response.status_code == 200
        assert response.json()["name"] == queue
        assert queue_depth(settings, queue) == 0


def test_deprecated_features_the_product_does_not_use_are_refused(settings):
    # rabbitmq.conf refuses them, so the suite passing shows none is used; a transient
    # non-exclusive queue (deprecated in 4.0) is one.
    with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
        with pytest.raises(pika.exceptions.ConnectionClosedByBroker, match="transient_nonexcl_queues"):
            connection.channel().queue_declare(f"test.transient.{uuid.uuid4().hex[:8]}",
                                               durable=False, exclusive=False)


# -- the runtime (pure logic; the suite's brokers show that it runs) --------------------------------

def test_mirror_is_read_from_apt_sources_in_both_formats(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    assert rabbitmq_runtime.debian_mirror(tmp_path) == "http://mirror.example/debian"

    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg] http://other.example/debian bookworm main\n")
    assert rabbitmq_runtime.debian_mirror(tmp_path) == "http://other.example/debian"

    (tmp_path / "sources.list").write_text("deb http://example/ubuntu noble main\n")
    assert rabbitmq_runtime.debian_mirror(tmp_path) is None


def test_a_built_root_runs_the_broker_in_a_namespace_with_its_data_mounted(tmp_path):
    runtime = Runtime(root=Path("/cache/root"), version="4.0.5")
    command = runtime.command(["/usr/lib/rabbitmq/bin/rabbitmq-server"], tmp_path)

    assert command[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert ("--map-root-user" in command) == (os.geteuid() != 0)  # no root needed to run it
    assert command[-3:] == ["/cache/root", str(tmp_path), "/usr/lib/rabbitmq/bin/rabbitmq-server"]
    assert runtime.data_path(tmp_path) == DATA_MOUNT

    host = Runtime(root=None, version="4.1.0")
    assert host.command(["rabbitmq-server"], tmp_path) == ["rabbitmq-server"]
    assert host.data_path(tmp_path) == str(tmp_path)


def test_a_changed_recipe_builds_into_another_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("WEBOS_RUNTIME_CACHE", str(tmp_path))
    before = rabbitmq_runtime.runtime_dir()
    monkeypatch.setitem(rabbitmq_runtime.RECIPE, "packages", ["rabbitmq-server", "less"])

    assert rabbitmq_runtime.runtime_dir() != before
    assert rabbitmq_runtime.runtime_dir().parent == before.parent == tmp_path
    assert rabbitmq_runtime.built_runtime() is None  # nothing complete there: it would be built
