"""The publisher against the real RabbitMQ: what each device's queue shows after REST calls."""
from __future__ import annotations

import json
import os
import time
import uuid
from urllib.parse import quote

import pika
import pika.exceptions
import pytest
import requests

from publisher.app import create_app
from common.devices import DEFAULT_ROUTE, DeviceConfig
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from stack.process import AppProcess, free_port
from tests.helpers import RESTART_RECONNECT_MAX, answers, wait_for
from tests.support.publisher_api import BAD_INPUT, NEW, fill

PAYLOAD_KEYS = ["Producer", "command", "id", "x", "y", "status", "seq", "msg_id", "ts"]
FAST = (0.2, 0.4)  # seconds between reports in these tests (the default is 1-2 s)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def drain(channel, queue: str) -> list[tuple[str, dict]]:
    """Everything in `queue` now, as (routing key, payload)."""
    messages = []
    while True:
        method, _, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            return messages
        messages.append((method.routing_key, json.loads(body)))


class QueueReader:
    """Collects a device queue's messages across calls (reads as webos-admin)."""

    def __init__(self, channel, device: str):
        self.channel, self.queue, self.messages = channel, naming.device_queue(device), []

    def purge(self) -> None:
        self.channel.queue_purge(self.queue)
        self.messages = []

    def read(self) -> list[dict]:
        self.messages.extend(payload for _, payload in drain(self.channel, self.queue))
        return self.messages

    def wait(self, condition, timeout=10.0, message="messages"):
        return wait_for(lambda: condition(self.read()), timeout, message=message)


@pytest.fixture(scope="module")
def amqp(settings):
    """A module-wide admin channel for reading queues."""
    connection = pika.BlockingConnection(endpoints.admin_parameters(settings))
    yield connection.channel()
    connection.close()


@pytest.fixture(scope="module")
def publisher(settings, amqp):
    """The app under test with two devices of its own (unique ids), reporting every 0.2-0.4 s."""
    devices = [DeviceConfig(unique("PA"), ((0, 0), (1, 1), (2, 4)), FAST),
               DeviceConfig(unique("PB"), DEFAULT_ROUTE, FAST)]
    app = create_app({"SETTINGS": settings, "DEVICES": devices, "TESTING": True})
    app.device_ids = [d.id for d in devices]
    app.created = list(app.device_ids)
    wait_for(lambda: all(d["connected"] for d in app.extensions["publisher"].simulator.snapshot()),
             10, message="devices connected")
    yield app
    app.extensions["publisher"].close()
    for device in app.created:
        amqp.queue_delete(naming.device_queue(device))


@pytest.fixture
def client(publisher):
    return publisher.test_client()


@pytest.fixture
def device_a(publisher, amqp, client):
    """Device A's queue reader, A Active and its queue purged."""
    device = publisher.device_ids[0]
    client.post(f"/status/{device}", json={"status": "Active"})
    reader = QueueReader(amqp, device)
    reader.purge()
    return device, reader


def progress_of(amqp, device: str, count: int, timeout: float = 10.0) -> None:
    """Wait until `device` (Active) has put `count` more messages in its queue: time has passed."""
    reader = QueueReader(amqp, device)
    reader.purge()
    reader.wait(lambda m: len(m) >= count, timeout, f"{count} messages from {device}")


def test_active_device_reports_positions_in_order_with_the_contract_payload(device_a, publisher):
    device, reader = device_a
    reader.wait(lambda m: len(m) >= 4)
    messages = reader.messages
    for message in messages:
        assert list(message) == PAYLOAD_KEYS
        assert (message["Producer"], message["id"], message["command"], message["status"]) == \
            (device, device, "position", "Active")
    route = [[0, 0], [1, 1], [2, 4]]
    start = route.index([messages[0]["x"], messages[0]["y"]])
    walked = [[m["x"], m["y"]] for m in messages]
    assert walked == [route[(start + i) % 3] for i in range(len(messages))]  # wraps around
    assert len({m["msg_id"] for m in messages}) == len(messages)
    gaps = [b["ts"] - a["ts"] for a, b in zip(messages, messages[1:])]
    assert all(150 <= gap <= 550 for gap in gaps), gaps  # 0.2-0.4 s cadence, with slack


def test_routing_key_is_the_device_info_key(device_a, amqp):
    device, _ = device_a
    routing_key, payload = wait_for(lambda: drain(amqp, naming.device_queue(device)), 5)[0]
    assert routing_key == naming.routing_key(device, "info")
    assert payload["Producer"] == device


def test_toggle_stops_then_restarts_the_stream_with_exactly_one_inactive_message(
        device_a, client, publisher, amqp):
    device, reader = device_a
    other = publisher.device_ids[1]
    reader.wait(lambda m: len(m) >= 2)
    before = time.time() * 1000
    answer = client.post(f"/status/{device}", json={"status": "Inactive"})
    assert answer.status_code == 200
    assert answer.get_json() == {"message": f"Status of {device} updated to Inactive"}
    assert client.get(f"/status/{device}").get_json() == {"id": device, "status": "Inactive"}

    reader.wait(lambda m: any(x["status"] == "Inactive" for x in m), 5, "the Inactive message")
    inactive = [m for m in reader.messages if m["status"] == "Inactive"][0]
    assert inactive["ts"] - before < 100  # went out at once, not after the 1-2 s sleep
    progress_of(amqp, other, 4)  # the other device reported 4 times meanwhile
    messages = list(reader.read())
    assert [m["status"] for m in messages].count("Inactive") == 1
    assert messages[-1] is inactive  # nothing after it

    assert client.post(f"/status/{device}", json={"status": "Active"}).status_code == 200
    reader.wait(lambda m: len(m) >= len(messages) + 3, 5, "the stream to restart")
    assert all(m["status"] == "Active" for m in reader.messages[len(messages):])
    seqs = [m["seq"] for m in reader.messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_quick_inactive_active_inactive_is_neither_missed_nor_doubled(device_a, client, publisher, amqp):
    device, reader = device_a
    reader.wait(lambda m: len(m) >= 1)
    for status in ("Inactive", "Active", "Inactive"):
        assert client.post(f"/status/{device}", json={"status": status}).status_code == 200
    reader.wait(lambda m: [x["status"] for x in m].count("Inactive") >= 2, 5)
    progress_of(amqp, publisher.device_ids[1], 4)
    statuses = [m["status"] for m in reader.read()]
    assert statuses[-3:] == ["Inactive", "Active", "Inactive"]
    assert statuses.count("Inactive") == 2
    seqs = [m["seq"] for m in reader.messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_repeating_the_current_status_sends_nothing_extra(device_a, client, publisher, amqp):
    device, reader = device_a
    for _ in range(2):
        assert client.post(f"/status/{device}", json={"status": "Inactive"}).status_code == 200
    progress_of(amqp, publisher.device_ids[1], 3)
    assert [m["status"] for m in reader.read()].count("Inactive") == 1


def test_seq_has_no_gaps_per_device(publisher, amqp, client):
    for device in publisher.device_ids:
        client.post(f"/status/{device}", json={"status": "Active"})
    readers = [QueueReader(amqp, d) for d in publisher.device_ids]
    for reader in readers:
        reader.purge()
    for reader in readers:
        reader.wait(lambda m: len(m) >= 10, 15)
        seqs = [m["seq"] for m in reader.messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_metrics_give_each_device_its_interval_status_and_counts(client, publisher):
    from prometheus_client.parser import text_string_to_metric_families

    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    samples = {(sample.name, sample.labels.get("device")): sample.value
               for family in text_string_to_metric_families(answer.get_data(as_text=True))
               for sample in family.samples}
    for row in client.get("/devices").get_json()["devices"]:
        device = row["id"]
        assert samples[("webos_publisher_device_interval_seconds", device)] == max(row["interval"])
        assert samples[("webos_publisher_device_active", device)] == (row["status"] == "Active")
        assert samples[("webos_publisher_messages_total", device)] >= row["messages"]


def test_devices_list_and_page_show_every_device(client, publisher):
    answer = client.get("/devices").get_json()
    listed = {d["id"]: d for d in answer["devices"]}
    for device in publisher.device_ids:
        assert listed[device]["status"] in ("Active", "Inactive")
        assert listed[device]["messages"] > 0 and listed[device]["last_message_ts"]
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert all(device in html for device in publisher.device_ids)
    assert "Consumer live view" in html


def test_runtime_added_device_publishes_into_its_own_queue_from_its_first_message(
        client, publisher, amqp):
    device = unique("PN")
    publisher.created.append(device)
    answer = client.post("/devices", json={"id": device, "route": [[5, 5], [6, 6]],
                                           "interval": list(FAST)})
    assert answer.status_code == 201, answer.get_json()
    assert answer.headers["Location"] == f"/devices/{device}"
    reader = QueueReader(amqp, device)
    reader.wait(lambda m: len(m) >= 3)
    assert reader.messages[0]["seq"] == 1  # the queue was bound before the first message
    assert [(m["x"], m["y"]) for m in reader.messages[:3]] == [(5, 5), (6, 6), (5, 5)]
    assert {m["Producer"] for m in reader.messages} == {device}
    assert any(d["id"] == device for d in client.get("/devices").get_json()["devices"])

    answer = client.delete(f"/devices/{device}")
    assert answer.status_code == 200
    assert client.get(f"/status/{device}").status_code == 404
    count = len(reader.read())
    progress_of(amqp, publisher.device_ids[1], 3)
    assert len(reader.read()) == count  # removed: silent


@pytest.mark.parametrize("message_type", ["info", "warning", "error"])
def test_operator_message_goes_to_the_device_queue_with_its_type(
        device_a, client, amqp, message_type):
    device, _ = device_a
    answer = client.post(f"/devices/{device}/messages", json={"type": message_type, "text": "check pump"})
    assert answer.status_code == 202
    msg_id = answer.get_json()["payload"]["msg_id"]

    def found():
        return [(key, p) for key, p in drain(amqp, naming.device_queue(device)) if p["msg_id"] == msg_id]
    routing_key, payload = wait_for(found, 5, message="the operator message")[0]
    assert routing_key == naming.routing_key(device, message_type)
    assert (payload["command"], payload["type"], payload["text"]) == ("message", message_type, "check pump")
    assert list(payload)[:2] == ["Producer", "command"]


def test_broadcast_reaches_every_device_queue(client, publisher, amqp, new_device):
    queues = [naming.device_queue(d) for d in publisher.device_ids + [new_device()]]
    answer = client.post("/broadcast", json={"message": "evacuate hall 3"})
    assert answer.status_code == 202
    msg_id = answer.get_json()["payload"]["msg_id"]
    for queue in queues:
        def found(queue=queue):
            return [p for _, p in drain(amqp, queue) if p.get("msg_id") == msg_id]
        payload = wait_for(found, 5, message=f"the broadcast in {queue}")[0]
        assert (payload["command"], payload["message"]) == ("emergency", "evacuate hall 3")


def mqtt_connection(settings, client_id: str) -> dict | None:
    """The management API's view of the MQTT connection with `client_id`, if there is one."""
    connections = requests.get(f"{settings.management_url}/api/connections",
                               auth=(settings.admin_user, settings.admin_password),
                         verify=str(settings.ca_file), timeout=5).json()
    for connection in connections:
        # RabbitMQ 4 reports an MQTT client id under client_properties (3.x: variable_map).
        if (connection.get("client_properties") or {}).get("client_id") == client_id:
            return connection
    return None


@pytest.mark.parametrize("version, protocol, content_type", [
    ("5", "MQTT 5-0", "application/json"),   # the default
    ("3.1.1", "MQTT 3-1-1", None),           # a 3.1.1 message has no properties
])
def test_devices_speak_the_configured_mqtt_version(settings, amqp, version, protocol, content_type):
    device = unique("PV")
    config = {"SETTINGS": settings, "DEVICES": [DeviceConfig(device, DEFAULT_ROUTE, FAST)],
              "TESTING": True}
    if version != "5":
        config["MQTT_VERSION"] = version
    app = create_app(config)
    try:
        connection = wait_for(lambda: mqtt_connection(settings, device), 15,
                              interval=0.5, message="the device's MQTT connection")
        assert connection["protocol"] == protocol
        method, properties, body = wait_for(
            lambda: (lambda got: got if got[0] else None)(
                amqp.basic_get(naming.device_queue(device), auto_ack=True)),
            10, message="a message from the device")
        assert json.loads(body)["id"] == device
        assert properties.content_type == content_type
    finally:
        app.extensions["publisher"].close()
        amqp.queue_delete(naming.device_queue(device))


def test_device_reconnects_after_the_broker_drops_its_connection(publisher, settings, amqp):
    device = publisher.device_ids[1]
    simulator = publisher.extensions["publisher"].simulator
    reader = QueueReader(amqp, device)
    reader.purge()
    api = f"{settings.management_url}/api"
    auth = (settings.admin_user, settings.admin_password)

    name = wait_for(lambda: mqtt_connection(settings, device), 15, interval=0.5,
                    message="the device's MQTT connection")["name"]
    requests.delete(f"{api}/connections/{quote(name, safe='')}", auth=auth, verify=str(settings.ca_file), timeout=5).raise_for_status()
    wait_for(lambda: not simulator.device(device)["connected"], 5, message="the drop noticed")
    wait_for(lambda: simulator.device(device)["connected"], 15, message="the device reconnected")
    reader.wait(lambda m: len(m) >= 8, 15)
    seqs = sorted({m["seq"] for m in reader.messages})  # a resent message may come twice
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


# -- bad input: refused before anything reaches RabbitMQ ------------------------------------------
# Every bad-input case runs without a broker in tests/test_publisher_api_unit.py; here one case of
# each status code (and each view that would touch RabbitMQ) shows the real broker sees nothing.

ON_THE_BROKER = ["unknown device", "invalid id in path", "wrong content type", "too large",
                 "add: invalid id", "add: duplicate", "add: interval reversed", "add: too large",
                 "remove: body not JSON", "message: unknown type", "broadcast: missing message"]
BROKER_CASES = [case for case in BAD_INPUT if case[0] in ON_THE_BROKER]


def queue_exists(amqp, queue: str) -> bool:
    """Whether RabbitMQ has `queue` (a passive declare on a channel of its own)."""
    channel = amqp.connection.channel()
    try:
        channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    channel.close()
    return True


@pytest.mark.parametrize("case, method, path, kwargs, status",
                         BROKER_CASES, ids=[case[0] for case in BROKER_CASES])
def test_bad_input_changes_nothing_on_the_broker(case, method, path, kwargs, status, client,
                                                 publisher, amqp):
    device = publisher.device_ids[0]
    client.post(f"/status/{device}", json={"status": "Active"})
    new = unique("PX")
    reader = QueueReader(amqp, device)
    reader.purge()
    before = {d["id"]: d["status"] for d in client.get("/devices").get_json()["devices"]}

    answer = client.open(fill(path, device, new), method=method, **fill(kwargs, device, new))

    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.get_json()["message"]
    after = {d["id"]: d["status"] for d in client.get("/devices").get_json()["devices"]}
    assert after == before
    progress_of(amqp, publisher.device_ids[1], 2)  # time for a stray message to arrive
    assert all(m["command"] == "position" and m["status"] == "Active" for m in reader.read())
    if NEW in repr((path, kwargs)):
        assert not queue_exists(amqp, naming.device_queue(new))  # no queue declared for it


def test_a_state_change_without_the_token_changes_nothing_on_the_broker(
        client, publisher, amqp, monkeypatch):
    device = publisher.device_ids[0]
    client.post(f"/status/{device}", json={"status": "Active"})
    reader = QueueReader(amqp, device)
    reader.purge()
    monkeypatch.setitem(publisher.config, "API_TOKEN", "secret-t0ken")
    assert client.post(f"/status/{device}", json={"status": "Inactive"}).status_code == 401
    assert client.post("/broadcast", json={"message": "no token"},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(f"/status/{device}").get_json()["status"] == "Active"
    progress_of(amqp, publisher.device_ids[1], 2)
    assert all(m["command"] == "position" and m["status"] == "Active" for m in reader.read())


# -- the real command line ------------------------------------------------------------------

def test_cli_runs_the_configured_devices_and_stops_cleanly_on_sigterm(settings, amqp, tmp_path):
    device = unique("PC")
    devices_file = tmp_path / "devices.json"
    devices_file.write_text(json.dumps({"interval": [1, 2], "devices": [{"id": device}]}))
    port = free_port()
    env = {**os.environ, **settings.to_env(), "PUBLISHER_API_TOKEN": "cli-token"}
    publisher = AppProcess(["publisher", "--port", str(port), "--devices-file", str(devices_file)],
                           env, tmp_path / "publisher.log")
    base = f"http://127.0.0.1:{port}"
    reader = QueueReader(amqp, device)
    try:
        wait_for(lambda: answers(f"{base}/devices"), 20, interval=0.2,
                 message="the publisher to answer", watch=[publisher])
        reader.wait(lambda m: len(m) >= 3, 15)
        gaps = [b["ts"] - a["ts"] for a, b in zip(reader.messages, reader.messages[1:])]
        assert all(900 <= gap <= 2150 for gap in gaps), gaps  # the seed's 1-2 s cadence

        url = f"{base}/status/{device}"
        assert requests.post(url, json={"status": "Inactive"}, timeout=5).status_code == 401
        answer = requests.post(url, json={"status": "Inactive"}, timeout=5,
                               headers={"Authorization": "Bearer cli-token"})
        assert answer.status_code == 200
        reader.wait(lambda m: m[-1]["status"] == "Inactive", 5)
    finally:
        code = publisher.stop(20)
        amqp.queue_delete(naming.device_queue(device))
    assert code == 0, publisher.output()
    assert "stopped" in publisher.output()


def test_refused_credentials_are_reported_and_the_api_keeps_answering(settings, caplog):
    import dataclasses

    # A device never enrolled (no broker user for its certificate) and a wrong admin password.
    wrong = dataclasses.replace(settings, admin_password="wrong")
    device = unique("PW")
    app = create_app({"SETTINGS": wrong, "DEVICES": [DeviceConfig(device, interval=FAST)],
                      "PREPARE_DEVICES": False})
    client = app.test_client()
    try:
        wait_for(lambda: any("refused the connection" in r.getMessage() for r in caplog.records),
                 10, message="the refusal logged")
        assert client.get(f"/devices/{device}").get_json()["connected"] is False
        assert client.post(f"/status/{device}", json={"status": "Inactive"}).status_code == 200
        answer = client.post("/devices", json={"id": unique("PW")})
        assert answer.status_code == 503 and "RabbitMQ" in answer.get_json()["error"]
        assert [d["id"] for d in client.get("/devices").get_json()["devices"]] == [device]
    finally:
        app.extensions["publisher"].close()


def test_devices_reconnect_after_a_rabbitmq_restart_and_lose_nothing(tmp_path):
    """A RabbitMQ of its own (the session's stays up): stop it, let devices queue, start it again."""
    from stack.local import fresh_settings
    from stack.rabbitmq_server import LocalRabbitMQ
    from publisher.simulator import Simulator

    settings = fresh_settings(tmp_path, reconnect_max_seconds=RESTART_RECONNECT_MAX)
    broker = LocalRabbitMQ(tmp_path / "rabbitmq", settings, node_name=f"webos-restart-{os.getpid()}",
                           dist_port=free_port())
    device = unique("PR")
    broker.start()
    simulator = None
    try:
        broker.wait_ready()
        topology.apply(settings, [device])
        simulator = Simulator(settings, [DeviceConfig(device, interval=FAST)])
        simulator.start()
        wait_for(lambda: simulator.device(device)["acked"] >= 3, 10, message="first messages acked")

        broker.stop()
        wait_for(lambda: not simulator.device(device)["connected"], 10, message="the outage noticed")
        seq_at_outage = simulator.device(device)["seq"]
        wait_for(lambda: simulator.device(device)["seq"] >= seq_at_outage + 5, 10,
                 message="messages made during the outage")
        broker.start()
        broker.wait_ready()
        wait_for(lambda: simulator.device(device)["connected"], 40, interval=0.2,
                 message="the device reconnected by itself")
        last_seq = simulator.device(device)["seq"]
        wait_for(lambda: simulator.device(device)["acked"] >= last_seq, 10,
                 message="the queued messages acknowledged")
        simulator.close()
        simulator = None

        with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
            seqs = {payload["seq"] for _, payload in drain(connection.channel(), naming.device_queue(device))}
        assert set(range(1, last_seq + 1)) <= seqs  # every message, the outage's included
    finally:
        if simulator is not None:
            simulator.close()
        broker.stop()


class HoldingProxy:
    """A TCP proxy to the broker's MQTT port that can cut its connections and hold the replies.

    Holding the broker's replies keeps a reconnecting client between CONNECT and CONNACK for as
    long as the test needs: the window in which paho 2.2 would already write new messages. The
    connection is TLS, so what is held is what the broker sends after the client's second write
    (its TLS Finished): the handshake completes, the CONNACK waits.
    """

    def __init__(self, target: tuple[str, int]):
        import socket
        import threading

        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._lock = threading.Lock()
        self._holding = False
        self._held: list[tuple[object, bytes]] = []
        self._sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets += [downstream, upstream]
                self.accepted += 1
            writes = [0]  # the client's writes on this connection
            threading.Thread(target=self._pump, args=(downstream, upstream, False, writes),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, True, writes),
                             daemon=True).start()

    def _pump(self, source, sink, reply: bool, writes: list) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if not reply:
                        writes[0] += 1
                    if reply and self._holding and writes[0] >= 2:
                        self._held.append((sink, data))
                    else:
                        sink.sendall(data)
        except OSError:
            pass  # cut
        finally:
            self._shut(sink)

    @staticmethod
    def _shut(sock) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed
        sock.close()

    def hold_replies(self) -> None:
        with self._lock:
            self._holding = True

    def release_replies(self) -> None:
        with self._lock:
            self._holding = False
            for sink, data in self._held:
                try:
                    sink.sendall(data)
                except OSError:
                    pass  # that connection was cut or closed meanwhile
            self._held.clear()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            self._shut(sock)

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_messages_published_before_the_connack_wait_behind_the_outage_backlog(settings, amqp, new_device):
    """Regression: paho writes at once after CONNECT but resends the backlog only on CONNACK."""
    import dataclasses

    from common.devices import INACTIVE
    from publisher.simulator import Simulator

    device = new_device("PO")
    proxy = HoldingProxy((settings.rabbitmq_host, settings.mqtt_port))
    simulator = Simulator(dataclasses.replace(settings, mqtt_port=proxy.port),
                          [DeviceConfig(device, status=INACTIVE)])  # sends only what we ask
    try:
        simulator.start()
        wait_for(lambda: simulator.device(device)["connected"], 10, message="the device connected")
        def send(count: int) -> None:
            for _ in range(count):
                simulator.send_message(device, "info", "ordered").result(5)

        send(3)
        wait_for(lambda: simulator.device(device)["acked"] == 3, 10, message="seq 1-3 acknowledged")

        proxy.hold_replies()
        proxy.cut()
        wait_for(lambda: not simulator.device(device)["connected"], 10, message="the cut noticed")
        send(3)  # seq 4-6: the outage's backlog
        wait_for(lambda: proxy.accepted == 2, 10, message="the device's reconnect (CONNECT sent)")
        send(1)  # seq 7: while the CONNACK is held
        assert simulator.device(device)["connected"] is False
        proxy.release_replies()
        wait_for(lambda: simulator.device(device)["acked"] == 7, 10, message="seq 1-7 acknowledged")
        assert simulator.device(device)["dropped"] == 0

        seqs = [payload["seq"] for _, payload in drain(amqp, naming.device_queue(device))]
        first_seen = list(dict.fromkeys(seqs))  # QoS 1 may repeat a message, never reorder it
        assert first_seen == list(range(1, 8)), seqs
    finally:
        simulator.close()
        proxy.close()


def test_a_connect_the_broker_never_answers_is_given_up_and_tried_again(
        settings, amqp, new_device, monkeypatch, caplog):
    """A node that takes the CONNECT and never sends the CONNACK (a node recovering its queues)
    holds the device CONNACK_TIMEOUT (2 s here), not paho's keepalive (60 s)."""
    import dataclasses

    from common.devices import INACTIVE
    from publisher import device_link
    from publisher.simulator import Simulator

    monkeypatch.setattr(device_link, "CONNACK_TIMEOUT", 2.0)
    device = new_device("PC")
    proxy = HoldingProxy((settings.rabbitmq_host, settings.mqtt_port))
    proxy.hold_replies()  # the TLS handshake completes, the CONNACK is held
    simulator = Simulator(dataclasses.replace(settings, mqtt_port=proxy.port),
                          [DeviceConfig(device, status=INACTIVE)])
    try:
        simulator.start()
        wait_for(lambda: proxy.accepted >= 2, 15, message="a second connect attempt")
        assert simulator.device(device)["connected"] is False
        assert f"device {device}: no CONNACK from" in caplog.text
        assert "ended connect attempt 1 without a CONNACK" in caplog.text
        proxy.release_replies()
        wait_for(lambda: simulator.device(device)["connected"], 15, message="the device connected")
        simulator.send_message(device, "info", "after").result(5)
        wait_for(lambda: simulator.device(device)["acked"] == 1, 10, message="its message acked")
    finally:
        simulator.close()
        proxy.close()


def test_a_handshake_that_never_ends_does_not_hold_up_the_other_devices(
        settings, amqp, new_device, monkeypatch):
    """Connections open on worker threads (publisher/connector.py): while one device waits in a
    TLS handshake nobody answers, another connects and has its message acknowledged."""
    import socket

    from common.devices import INACTIVE
    from publisher import device_link
    from publisher.simulator import Simulator

    def patient_client(*args):  # the silent listener holds its handshake for a minute
        client = new_client(*args)
        client.connect_timeout = 60.0
        return client

    new_client = device_link.new_client
    monkeypatch.setattr(device_link, "new_client", patient_client)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    stuck, healthy = new_device("HS"), new_device("HH")
    simulator = Simulator(settings, [DeviceConfig(stuck, status=INACTIVE),
                                     DeviceConfig(healthy, status=INACTIVE)])
    # Device 0 tries the first address first, device 1 the second.
    simulator.links.addresses = [("127.0.0.1", silent.getsockname()[1]),
                                 simulator.links.addresses[0]]
    held = None
    try:
        simulator.start()
        silent.settimeout(10)
        held, _ = silent.accept()
        held.settimeout(10)
        assert held.recv(65536)  # the stuck device's ClientHello, never answered
        wait_for(lambda: simulator.device(healthy)["connected"], 15,
                 message="the other device connected")
        simulator.send_message(healthy, "info", "while another handshakes").result(5)
        wait_for(lambda: simulator.device(healthy)["acked"] == 1, 10, message="its message acked")
        held.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open: the stuck handshake still waits
            held.recv(65536)
        assert simulator.device(stuck)["connected"] is False
    finally:
        if held is not None:
            held.close()  # ends the stuck handshake, so that close() need not wait for it
        silent.close()
        simulator.close()


def test_the_simulator_reports_the_brokers_acknowledgement_wait_apart_from_its_own_lateness(
        settings, amqp, new_device):
    """GET /devices' stats: `lateness` (due until handed to paho) is the simulator's share of a
    device's delay, `ack_wait` (handed to paho until RabbitMQ's PUBACK) the broker's."""
    from common.devices import INACTIVE
    from publisher.simulator import Simulator

    device = new_device("PW")
    simulator = Simulator(settings, [DeviceConfig(device, status=INACTIVE)])
    try:
        simulator.start()
        wait_for(lambda: simulator.device(device)["connected"], 10, message="the device connected")
        for _ in range(5):
            simulator.send_message(device, "info", "timed").result(5)
        wait_for(lambda: simulator.device(device)["acked"] == 5, 10, message="5 acknowledged")
        ack_wait = simulator.stats()["ack_wait"]
        assert ack_wait["scheduled"] == 5  # one per acknowledged message, none for the replies
        assert 0 < ack_wait["max_ms"] < 5_000, ack_wait
        assert simulator.stats()["lateness"]["scheduled"] == 0  # nothing was due: all sent by hand
    finally:
        simulator.close()
