"""A simulated device's paho client: the identity it logs in with, its persistent session, and
closing its connection at once. No state of its own; DeviceLinks (device_link.py) drives it."""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.pki import PKI, client_context

LOGGER = logging.getLogger("publisher.simulator")
# MQTT versions a device can speak, the default first.
MQTT_VERSIONS = ("5", "3.1.1")
PAHO_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
# How long the broker keeps a device's session (its command subscriptions and the commands sent
# while it is away) after it disconnects: RabbitMQ's default cap, one day.
SESSION_EXPIRY = 86400
READS_TO_CLOSE = 100  # loop_read calls that take a shut-down socket to its end (one does, mostly)


@dataclass(frozen=True)
class DeviceIdentity:
    """How every device logs in: its certificate (TLS), or its password on the plain listener
    (only there with WEBOS_PLAIN_LISTENERS; make bench uses it to measure what TLS costs)."""

    pki: PKI
    ca_file: Path
    plain: bool


def new_client(device: str, mqtt_version: str, identity: DeviceIdentity) -> mqtt.Client:
    """`device`'s paho client, not connected, for a persistent session with manual acks."""
    # A persistent session (MQTT 5: clean start off with a Session Expiry; 3.1.1: clean
    # session off): the broker keeps the device's command subscriptions, and what is sent to
    # it while it is away, until it is back. PUBACKs for commands leave only once the command
    # was applied and answered (manual_ack).
    protocol = PAHO_PROTOCOLS[mqtt_version]
    # Its own identity: the certificate the broker logs it in by, and the client id that
    # certificate names (the broker refuses any other).
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device,
                         protocol=protocol, manual_ack=True,
                         clean_session=False if protocol == mqtt.MQTTv311 else None)
    if identity.plain:
        client.username_pw_set(device, identity.pki.device_password(device))
    else:
        client.tls_set_context(client_context(identity.ca_file,
                                              identity.pki.ensure_device(device)))
    return client


def session_options(mqtt_version: str) -> dict:
    """connect()'s arguments for a persistent session (paho's reconnect() reuses them)."""
    if mqtt_version == "3.1.1":
        return {}  # clean_session=False is the client's own setting
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = SESSION_EXPIRY
    return {"clean_start": False, "properties": properties}


def close_now(client: mqtt.Client) -> None:
    """Disconnect `client` (external loop) and leave its socket closed, through public API only.

    paho writes the DISCONNECT at once and then closes the socket itself, unless the kernel's
    send buffer is full (a stalled broker, a long backlog): then it would close only on a later
    read. Shutting the socket down makes that read come now; paho sees the end of the stream,
    closes the socket and reports the disconnect through its callbacks as always.
    """
    if client.socket() is None:
        return
    client.disconnect()
    if client.socket() is not None:
        client.loop_write()
    sock = client.socket()
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already reset by the peer: the reads below find out all the same
    # Each read takes what was received before the shutdown, then the end of the stream.
    for _ in range(READS_TO_CLOSE):
        if client.socket() is None:
            return
        client.loop_read()
    LOGGER.warning("an MQTT connection did not close after its socket was shut down")
