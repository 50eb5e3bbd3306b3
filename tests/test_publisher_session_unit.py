"""A device's MQTT connection against a stand-in broker on a local socket (no RabbitMQ): closing
it when the broker has stopped reading, through paho's public API only."""
from __future__ import annotations

import select
import socket
import time

import paho.mqtt.client as mqtt
import pytest

from publisher.device_client import close_now

CONNACK = bytes([0x20, 0x02, 0x00, 0x00])  # MQTT 3.1.1: session not present, accepted


@pytest.fixture
def stalled_connection():
    """A connected paho client (external loop) whose broker never reads again; its events."""
    listener = socket.create_server(("127.0.0.1", 0))
    events = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="close-now",
                         protocol=mqtt.MQTTv311)
    client.on_connect = lambda *_: events.append("connect")
    client.on_disconnect = lambda *_: events.append("disconnect")
    client.on_socket_close = lambda *_: events.append("socket closed")
    client.connect("127.0.0.1", listener.getsockname()[1], keepalive=60)
    broker, _ = listener.accept()
    broker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    broker.sendall(CONNACK)
    deadline = time.monotonic() + 5
    while "connect" not in events and time.monotonic() < deadline:
        select.select([client.socket()], [], [], 0.1)
        client.loop_read()
    assert "connect" in events
    try:
        yield client, events
    finally:
        broker.close()
        listener.close()


def test_close_now_closes_a_connection_whose_broker_stopped_reading(stalled_connection):
    client, events = stalled_connection
    payload = b"x" * 65536
    for _ in range(1000):  # until the kernel's buffers are full and paho holds the rest
        client.publish("webos/close-now/info", payload, qos=0)  # no in-flight limit on QoS 0
        if client.want_write():
            break
    assert client.want_write(), "the broker's side should have stopped taking bytes"
    close_now(client)
    assert client.socket() is None
    assert events[-2:] == ["socket closed", "disconnect"]


def test_close_now_on_a_closed_client_does_nothing():
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="never-connected")
    close_now(client)
    assert client.socket() is None
