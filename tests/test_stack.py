"""The stack against real brokers: routing, users, topology, Kafka topic, management API."""
from __future__ import annotations

import base64
import json
import signal
import uuid
from urllib.parse import quote

import pika
import pytest
import requests
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from rabbitmq import topology
from stack import __main__ as stack_main
from stack import config, kafka_server
from stack.kafka_server import ensure_topic
from tests.helpers import MqttDevice, consume, get_message, kafka_consumer, wait_for

DEVICE = "3DF92-192"


def payload(device: str, seq: int = 1) -> bytes:
    return json.dumps({"Producer": device, "command": "position", "id": device, "x": 3, "y": 4,
                       "status": "Active", "seq": seq, "msg_id": uuid.uuid4().hex}).encode()


@pytest.fixture
def device_client(settings):
    client = MqttDevice(settings, settings.device_user, settings.device_password)
    assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
    yield client
    client.close()


def test_mqtt_qos1_publish_lands_in_device_queue_with_routing_key(settings, admin_channel, device_client):
    admin_channel.queue_purge(topology.device_queue(DEVICE))
    body = payload(DEVICE)

    assert device_client.publish(topology.mqtt_topic(DEVICE, "info"), body), "no PUBACK"

    method, properties, received = get_message(admin_channel, "webos.3DF92-192")
    assert received == body
    assert method.exchange == "webos.topic"
    assert method.routing_key == "webos.3DF92-192.info"
    assert properties.delivery_mode == 2  # QoS 1 publishes are persistent


def test_publish_for_unknown_device_is_kept_in_unrouted(settings, admin_channel, device_client):
    admin_channel.queue_purge(topology.UNROUTED_QUEUE)
    stranger = f"nobody-{uuid.uuid4().hex[:6]}"
    body = payload(stranger)

    assert device_client.publish(f"webos/{stranger}/warning", body)

    method, _, received = get_message(admin_channel, "webos.unrouted")
    assert received == body
    assert method.routing_key == f"webos.{stranger}.warning"


def test_fanout_reaches_every_device_queue(admin_channel, new_device):
    devices = [new_device(), new_device()]
    default_queues = [topology.device_queue(d) for d in ("3DF92-192", "4HHC2-392")]
    for queue in default_queues:
        admin_channel.queue_purge(queue)
    body = b'{"Producer": "server", "command": "emergency"}'

    admin_channel.basic_publish("webos.fanout", "", body)

    for queue in default_queues + [topology.device_queue(d) for d in devices]:
        assert get_message(admin_channel, queue)[2] == body


def test_management_api_lists_queues_and_get_messages_returns_payload(settings, admin_channel, device_client):
    admin_channel.queue_purge(topology.device_queue(DEVICE))
    body = payload(DEVICE, seq=42)
    assert device_client.publish(topology.mqtt_topic(DEVICE, "error"), body)
    api = f"{settings.management_url}/api"
    auth = (settings.admin_user, settings.admin_password)

    def listed():
        queues = requests.get(f"{api}/queues/%2F", auth=auth, timeout=5).json()
        by_name = {q["name"]: q for q in queues}
        ready = by_name.get("webos.3DF92-192", {}).get("messages", 0)
        return "webos.4HHC2-392" in by_name and "webos.dead" in by_name and ready >= 1 and by_name
    by_name = wait_for(listed, 15, message="management API to list the device queue with a message")
    assert by_name["webos.3DF92-192"]["durable"] is True
    assert by_name["webos.3DF92-192"]["arguments"]["x-single-active-consumer"] is True

    response = requests.post(f"{api}/queues/%2F/{quote('webos.3DF92-192')}/get", auth=auth, timeout=5,
                             json={"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"})
    assert response.status_code == 200
    [message] = response.json()
    assert json.loads(message["payload"]) == json.loads(body)
    assert message["routing_key"] == "webos.3DF92-192.error"


def test_kafka_round_trip_on_events_topic(settings):
    key = f"k-{uuid.uuid4().hex[:8]}"
    body = payload(DEVICE)
    consumer = kafka_consumer(settings, [settings.kafka_topic])
    try:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all",
                             "enable.idempotence": True})
        producer.produce(settings.kafka_topic, key=key, value=body)
        assert producer.flush(10) == 0
        mine = []
        wait_for(lambda: mine.extend(r for r in consume(consumer, 1, 1) if r.key() == key.encode()) or mine,
                 30, message="the record back from Kafka")
        assert mine[0].value() == body
    finally:
        consumer.close()
    metadata = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(timeout=10)
    assert len(metadata.topics[settings.kafka_topic].partitions) == 6


def test_kafka_topic_creation_is_idempotent(settings):
    assert ensure_topic(settings.kafka_bootstrap, settings.kafka_topic, 6) is False


def test_guest_is_refused_over_amqp(settings):
    params = pika.ConnectionParameters(settings.rabbitmq_host, settings.amqp_port,
                                       credentials=pika.PlainCredentials("guest", "guest"),
                                       connection_attempts=1)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(params)
    users = requests.get(f"{settings.management_url}/api/users",
                         auth=(settings.admin_user, settings.admin_password), timeout=5).json()
    assert "guest" not in {u["name"] for u in users}


@pytest.mark.parametrize("user,password", [(None, None), ("guest", "guest"),
                                           ("webos-device", "wrong-password")])
def test_mqtt_without_valid_credentials_is_refused(settings, user, password):
    client = MqttDevice(settings, user, password)
    try:
        assert client.connected.wait(10) or client.disconnected.wait(1)
        assert client.reason_code is None or client.reason_code != 0
    finally:
        client.close()


def test_device_user_cannot_publish_outside_webos(settings, admin_channel, device_client):
    admin_channel.queue_purge(topology.UNROUTED_QUEUE)

    acked = device_client.publish("other/3DF92-192/info", b'{"x": 1}', timeout=3)

    # RabbitMQ refuses the routing key `other.3DF92-192.info` and drops the connection.
    assert not acked
    assert device_client.disconnected.wait(5)
    assert admin_channel.basic_get(topology.UNROUTED_QUEUE, auto_ack=True)[0] is None


def test_device_user_cannot_read_queues_over_amqp(settings):
    connection = pika.BlockingConnection(topology.amqp_parameters(
        settings, settings.device_user, settings.device_password))
    channel = connection.channel()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
        channel.basic_get(topology.device_queue(DEVICE))
    assert refused.value.reply_code == 403
    connection.close()


def test_applying_topology_twice_is_harmless(settings, admin_channel, device_client):
    queue = topology.device_queue(DEVICE)
    admin_channel.queue_purge(queue)
    assert device_client.publish(topology.mqtt_topic(DEVICE, "info"), payload(DEVICE))
    wait_for(lambda: admin_channel.queue_declare(queue, passive=True).method.message_count == 1, 10)

    topology.apply(settings)
    topology.apply(settings)

    assert admin_channel.queue_declare(queue, passive=True).method.message_count == 1
    bindings = requests.get(f"{settings.management_url}/api/queues/%2F/{queue}/bindings",
                            auth=(settings.admin_user, settings.admin_password), timeout=5).json()
    assert sorted((b["source"], b["routing_key"]) for b in bindings if b["source"]) == [
        ("webos.fanout", ""), ("webos.topic", "webos.3DF92-192.*")]
    # the device user still works after its password was re-set to the same value
    assert device_client.publish(topology.mqtt_topic(DEVICE, "info"), payload(DEVICE))


def test_cluster_id_never_starts_with_a_dash(monkeypatch):
    # 0xF8 encodes to "-" as the first URL-safe base64 character: kafka-storage would read it as a flag.
    draws = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(kafka_server.uuid, "uuid4", lambda: next(draws))

    cluster_id = kafka_server.new_cluster_id()

    assert cluster_id == base64.urlsafe_b64encode(b"\x01" * 16).decode().rstrip("=")
    assert len(cluster_id) == 22


def test_environment_wins_over_dotenv_and_dotenv_fills_the_rest(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("WEBOS_AMQP_PORT=5999\nPUBLISHER_API_TOKEN=from-dotenv\nWEBOS_MQTT_PORT=1999\n")
    env = {"WEBOS_AMQP_PORT": "6111"}

    merged = config.environment(env, dotenv)
    settings = config.load_settings(env, dotenv)

    assert merged["PUBLISHER_API_TOKEN"] == "from-dotenv"  # what the publisher's token is read from
    assert (settings.amqp_port, settings.mqtt_port) == (6111, 1999)


class FakeHoncho:
    """Stands in for honcho's process: `wait` is interrupted `interrupts` times, then returns `code`."""

    def __init__(self, code: int, interrupts: int):
        self.code, self.interrupts, self.signals = code, interrupts, []

    def wait(self):
        if self.interrupts:
            self.interrupts -= 1
            raise KeyboardInterrupt
        return self.code

    def send_signal(self, signum):
        self.signals.append(signum)


@pytest.mark.parametrize("interrupts, honcho_code, expected, forwarded", [
    (0, 2, 2, []),                            # an app died on its own: its failure shows
    (0, 130, 0, []),                          # only honcho got the Ctrl-C: still a requested stop
    (1, 130, 0, [signal.SIGINT]),             # Ctrl-C or SIGTERM: a requested stop succeeds
    (2, 130, 0, [signal.SIGINT]),             # impatient second Ctrl-C: still one stop
])
def test_run_apps_exit_code(monkeypatch, interrupts, honcho_code, expected, forwarded):
    honcho = FakeHoncho(honcho_code, interrupts)
    monkeypatch.setattr(stack_main.subprocess, "Popen", lambda *args, **kwargs: honcho)

    assert stack_main.run_apps(config.Settings()) == expected
    assert honcho.signals == forwarded
