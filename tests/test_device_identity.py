"""Device identity: each device logs in with its own certificate over TLS and speaks only as itself.

Real MQTT clients against the real broker: paho, and mosquitto_pub (Debian's mosquitto-clients),
which no one here wrote.
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pika
import pytest
import requests

from common.pki import PKI, client_context
from publisher.app import create_app
from common.devices import DeviceConfig
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from stack.process import free_port, port_open
from tests.helpers import MqttDevice, get_message, queue_depth, read_records, wait_for
from tests.support.bridge import BridgeProcess


def body(device: str, marker: str) -> bytes:
    return json.dumps({"id": device, "marker": marker, "msg_id": uuid.uuid4().hex}).encode()


def mosquitto_pub(settings, topic: str, payload: bytes, device: str | None = None,
                  client_id: str | None = None, cert=None, ca=None, port=None, extra=()):
    """One QoS 1 publish by mosquitto_pub over TLS (with `device`'s certificate, or `cert`)."""
    if shutil.which("mosquitto_pub") is None:
        pytest.fail("mosquitto_pub is missing: `make install-test` installs mosquitto-clients")
    identity = cert or (PKI(settings.pki_path).device(device) if device else None)
    command = ["mosquitto_pub", "-h", settings.rabbitmq_host, "-p", str(port or settings.mqtt_port),
               "-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload.decode(),
               "-i", client_id or device or f"probe-{uuid.uuid4().hex[:6]}", *extra]
    if ca is not False:
        command += ["--cafile", str(ca or settings.ca_file)]
    if identity is not None:
        command += ["--cert", str(identity.cert), "--key", str(identity.key)]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture
def pair(new_device):
    """Two enrolled devices with their queues: A and B."""
    return new_device("IDA"), new_device("IDB")


@pytest.fixture
def broker_log(brokers):
    """The session broker's log when it is a local process (None for other brokers)."""
    rabbitmq = getattr(brokers, "rabbitmq", None)
    return rabbitmq.log_path if rabbitmq is not None else None


def test_a_device_publishes_as_itself_and_reaches_kafka_keyed_by_its_id(settings, pair, tmp_path,
                                                                       kafka_topic):
    a, _ = pair
    bridge = BridgeProcess(settings, tmp_path, "--queues", naming.device_queue(a),
                           "--topic-template", kafka_topic)
    try:
        bridge.wait_consuming(1)
        marker = uuid.uuid4().hex
        done = mosquitto_pub(settings, naming.mqtt_topic(a, "info"), body(a, marker), device=a)
        assert done.returncode == 0, done.stderr
        records = read_records(settings, kafka_topic,
                               lambda got: any(marker.encode() in r.value() for r in got))
        [record] = [r for r in records if marker.encode() in r.value()]
        assert record.key() == a.encode()
    finally:
        bridge.kill()


def test_a_device_cannot_publish_to_another_devices_topic(settings, pair, admin_channel,
                                                         broker_log):
    a, b = pair
    forged = uuid.uuid4().hex
    # mosquitto_pub: the broker closes the connection instead of acknowledging.
    done = mosquitto_pub(settings, naming.mqtt_topic(b, "info"), body(b, forged), device=a)
    assert done.returncode != 0
    # paho: the same, seen as a lost connection and no PUBACK.
    client = MqttDevice(settings, a)
    try:
        assert client.connected.wait(10) and client.reason_code == 0, client.reason_code
        assert not client.publish(naming.mqtt_topic(b, "warning"), body(b, forged), timeout=3)
        assert client.disconnected.wait(5)
    finally:
        client.close()
    # B's own message arrives after the attempts: nothing forged came before it.
    genuine = uuid.uuid4().hex
    assert mosquitto_pub(settings, naming.mqtt_topic(b, "info"), body(b, genuine),
                         device=b).returncode == 0
    _, _, received = get_message(admin_channel, naming.device_queue(b))
    assert genuine.encode() in received
    assert admin_channel.basic_get(naming.device_queue(b))[0] is None
    if broker_log is not None:
        wait_for(lambda: f"webos.{b}.info" in broker_log.read_text()
                 and "authorization failure" in broker_log.read_text(), 10,
                 message="the broker to log the refused publish")


def test_a_device_asking_for_another_devices_client_id_is_refused_and_the_other_keeps_publishing(
        settings, pair, admin_channel):
    a, b = pair
    device_b = MqttDevice(settings, b, protocol=mqtt.MQTTv5)
    assert device_b.connected.wait(10) and device_b.reason_code == 0
    stop = threading.Event()
    published = []

    def keep_publishing():
        while not stop.is_set():
            if device_b.publish(naming.mqtt_topic(b, "info"), body(b, "steady"), timeout=5):
                published.append(time.monotonic())
            time.sleep(0.05)

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        wait_for(lambda: len(published) >= 5, 10, message="B publishing")
        attempt_started = time.monotonic()
        intruder = MqttDevice(settings, a, client_id=b, protocol=mqtt.MQTTv5)
        try:
            assert intruder.connected.wait(10)
            assert intruder.reason_code == "Client identifier not valid"
        finally:
            intruder.close()
        done = mosquitto_pub(settings, naming.mqtt_topic(b, "info"), body(b, "intruder"),
                             device=a, client_id=b)
        assert done.returncode != 0
        attempts_done = time.monotonic()
        wait_for(lambda: sum(t > attempts_done for t in published) >= 3, 15,
                 message="B still publishing after the attempts")
        assert not device_b.disconnected.is_set(), "B lost its connection"
        assert any(attempt_started < t < attempts_done for t in published) or \
            attempts_done - attempt_started < 1, "B published nothing during the attempts"
    finally:
        stop.set()
        publisher.join(10)
        device_b.close()
    wait_for(lambda: queue_depth(admin_channel, naming.device_queue(b)) >= len(published), 10,
             message="B's messages in its queue")
    while (message := admin_channel.basic_get(naming.device_queue(b), auto_ack=True))[0]:
        assert b"intruder" not in message[2]


def refused(client: MqttDevice) -> bool:
    """The broker refused the CONNECT, or the TLS handshake failed (no CONNACK at all)."""
    if client.connected.wait(5):
        return client.reason_code != 0
    return True


def test_no_certificate_another_authority_and_a_password_are_all_refused(settings, pair, tmp_path):
    a, _ = pair
    # No certificate and no credentials; a device's name with a password.
    assert refused(MqttDevice(settings))
    assert refused(MqttDevice(settings, user=a, password="anything"))
    assert mosquitto_pub(settings, naming.mqtt_topic(a, "info"), b"{}", client_id=a,
                         extra=["-u", a, "-P", "anything"]).returncode != 0
    # A certificate for the same id, from another authority: the TLS handshake fails.
    stranger = PKI(tmp_path / "other-ca").ensure_device(a)
    assert refused(MqttDevice(settings, a, identity=stranger))
    done = mosquitto_pub(settings, naming.mqtt_topic(a, "info"), b"{}", device=a, cert=stranger)
    assert done.returncode != 0
    # The client refuses a broker it cannot verify: here, against another authority.
    other_ca = PKI(tmp_path / "other-ca").ca_cert
    done = mosquitto_pub(settings, naming.mqtt_topic(a, "info"), b"{}", device=a, ca=other_ca)
    assert done.returncode != 0 and "TLS error" in done.stderr


def test_a_removed_device_is_disconnected_and_cannot_connect_again(settings, new_device):
    device = new_device("IDR")
    client = MqttDevice(settings, device)
    assert client.connected.wait(10) and client.reason_code == 0
    identity = PKI(settings.pki_path).device(device)
    kept = (identity.cert.read_bytes(), identity.key.read_bytes())
    topology.remove_enrolment(settings, device)
    assert client.disconnected.wait(10), "its connection stayed open"
    client.close()
    assert not identity.cert.exists() and not identity.key.exists()
    # Someone who kept a copy of its certificate and key is refused all the same.
    copy = PKI(settings.pki_path).device(device)
    copy.cert.parent.mkdir(exist_ok=True)
    copy.cert.write_bytes(kept[0])
    copy.key.write_bytes(kept[1])
    copy.key.chmod(0o600)
    try:
        again = MqttDevice(settings, device)
        assert refused(again)
        again.close()
    finally:
        PKI(settings.pki_path).remove_device(device)


def test_plain_listeners_are_off_by_default(settings):
    for port in (settings.mqtt_plain_port, settings.amqp_plain_port, settings.management_plain_port):
        assert not port_open(port, settings.rabbitmq_host), f"something listens on plain {port}"
    for port in (settings.mqtt_port, settings.amqp_port, settings.management_port):
        assert port_open(port, settings.rabbitmq_host)


def test_amqp_and_management_clients_verify_the_broker(settings, tmp_path):
    other = PKI(tmp_path / "other-ca")
    other.ensure()
    with pytest.raises(ssl.SSLCertVerificationError):
        pika.BlockingConnection(pika.ConnectionParameters(
            settings.rabbitmq_host, settings.amqp_port, connection_attempts=1,
            credentials=pika.PlainCredentials(settings.admin_user, settings.admin_password),
            ssl_options=pika.SSLOptions(client_context(other.ca_cert), settings.rabbitmq_host)))
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{settings.management_url}/api/overview", verify=str(other.ca_cert),
                     auth=(settings.admin_user, settings.admin_password), timeout=10)
    # With the stack's authority both work, and the management API is HTTPS.
    assert settings.management_url.startswith("https://")
    with endpoints.management_api(settings) as http:
        assert http.get(f"{settings.management_url}/api/whoami", timeout=10).json()["name"] == \
            settings.admin_user
    context = client_context(settings.ca_file)
    with context.wrap_socket(socket.create_connection(
            (settings.rabbitmq_host, settings.amqp_port), timeout=10),
            server_hostname=settings.rabbitmq_host) as tls:
        assert tls.version() in ("TLSv1.3", "TLSv1.2")


def test_a_device_added_at_run_time_gets_a_certificate_before_connecting_and_removal_revokes_it(
        settings, admin_channel):
    first = f"IDP{uuid.uuid4().hex[:8]}"
    app = create_app({"SETTINGS": settings, "TESTING": True,
                      "DEVICES": [DeviceConfig(first, interval=(0.2, 0.2))]})
    client = app.test_client()
    added = f"IDN{uuid.uuid4().hex[:8]}"
    pki = PKI(settings.pki_path)
    try:
        assert client.post("/devices", json={"id": added, "interval": [0.2, 0.2]}).status_code == 201
        assert pki.device(added).cert.exists() and pki.device(added).key.stat().st_mode & 0o077 == 0
        wait_for(lambda: client.get(f"/devices/{added}").get_json()["acked"] >= 2, 15,
                 message="the added device's messages acknowledged")
        assert client.delete(f"/devices/{added}?delete_queue=true").status_code == 200
        assert not pki.device(added).cert.exists()
        with endpoints.management_api(settings) as http:
            assert http.get(f"{settings.management_url}/api/users/{added}",
                            timeout=10).status_code == 404
        assert refused(MqttDevice(settings, added, identity=pki.ensure_device(added)))
    finally:
        app.extensions["publisher"].close()
        for device in (first, added):
            topology.remove_enrolment(settings, device)
            topology.delete_device(admin_channel, device)


def test_with_plain_listeners_on_each_device_has_its_own_password(tmp_path):
    """WEBOS_PLAIN_LISTENERS=1 on a broker of its own: plain MQTT on 127.0.0.1, per-device
    passwords, the same per-device permissions."""
    from stack.local import fresh_settings
    from stack.rabbitmq_server import LocalRabbitMQ

    settings = fresh_settings(tmp_path, plain_listeners=True)
    broker = LocalRabbitMQ(tmp_path / "rabbitmq", settings, node_name=f"webos-plain-{free_port()}",
                           dist_port=free_port())
    broker.start()
    try:
        broker.wait_ready()
        a, b = "PLAIN-A", "PLAIN-B"
        topology.apply(settings, [a, b])
        password = PKI(settings.pki_path).device_password(a)
        assert PKI(settings.pki_path).devices_dir.joinpath(f"{a}.password").stat().st_mode & 0o077 == 0

        def plain(topic: str, user: str, secret: str) -> subprocess.CompletedProcess:
            return mosquitto_pub(settings, topic, b'{"plain": true}', client_id=user,
                                 port=settings.mqtt_plain_port, ca=False,
                                 extra=["-u", user, "-P", secret])

        assert plain(naming.mqtt_topic(a, "info"), a, password).returncode == 0
        assert plain(naming.mqtt_topic(b, "info"), a, password).returncode != 0
        assert plain(naming.mqtt_topic(a, "info"), a, "wrong").returncode != 0
        with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
            channel = connection.channel()
            assert queue_depth(channel, naming.device_queue(a)) == 1
            assert queue_depth(channel, naming.device_queue(b)) == 0
        assert port_open(settings.amqp_plain_port) and port_open(settings.management_plain_port)
    finally:
        broker.stop()


def test_a_device_id_may_not_take_a_service_users_name():
    for name in ("webos-admin", "webos-bridge", "webos-anything"):
        assert not naming.is_valid_device_id(name)
        with pytest.raises(ValueError, match="not starting with webos-"):
            naming.device_queue(name)
