"""The MQTT side of the simulated devices: each device's session (DeviceLink: its paho client,
made in device_client.py, and what its connection holds), and what happens on the connections
(DeviceLinks): publishing with a backlog that keeps order across reconnects, connecting node by
node with back-off, command subscriptions (on_connect), answers, and paho's callbacks.
Everything here runs on the simulator's scheduler thread."""
from __future__ import annotations

import json
import logging
import random
import selectors
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.config import Settings
from common.devices import DeviceConfig
from common.pki import PKI
from publisher.device_client import (MQTT_VERSIONS, DeviceIdentity, close_now, new_client,
                                     session_options)
from publisher.connector import Connector
from publisher.device_commands import DeviceCommands
from publisher.device_model import DeviceState
from publisher.lateness import Lateness
from publisher.schedule import Job
from rabbitmq import naming

LOGGER = logging.getLogger("publisher.simulator")
# s before a device's first reconnect attempt; it doubles up to Settings.reconnect_max_seconds
RECONNECT_MIN = 1.0
# s a connect attempt may wait for the broker's CONNACK before the device tries the next node.
# Without it paho's keepalive gives up on the attempt after 60 s (no byte received): a node that
# takes CONNECTs and answers none (one recovering its queues after a restart, under make soak)
# would hold each of its devices that long, and again on each return to it.
CONNACK_TIMEOUT = 30.0
CONTENT_TYPE = "application/json"  # MQTT 5: reaches Kafka as the record header content_type


@dataclass
class DeviceLink:
    """One device's MQTT client and what its connection holds."""

    state: DeviceState
    client: mqtt.Client
    commands: DeviceCommands  # applies what the platform asks, once per command id
    backoff: float = RECONNECT_MIN
    topics: dict = field(default_factory=dict)
    write_registered: bool = False  # the selector also watches for writability
    # (topic, body) accepted while the connection is not up (or the backlog not yet handed on),
    # oldest first; see _publish for why paho does not get them at once.
    backlog: deque = field(default_factory=deque)
    node: int = 0  # which of the RabbitMQ nodes it connects to (the next one when that fails)
    reply_mids: set = field(default_factory=set)  # replies and reports in flight (not telemetry)
    subscribed: bool = False  # the broker granted its command subscriptions
    attempt: int = 0  # connect attempts so far: a CONNACK deadline belongs to one of them
    handed: dict = field(default_factory=dict)  # mid -> when paho got that message (monotonic)
    failed: int = 0  # connect attempts in a row that ended without a CONNACK
    # A worker thread is opening the connection (publisher/connector.py): until its outcome is
    # back, nothing on the scheduler thread touches the client.
    connecting: bool = False



class DeviceLinks:
    """The MQTT connections of all devices; see the module docstring."""

    def __init__(self, settings: Settings, mqtt_version: str, plain: bool, keepalive: int,
                 max_queued_messages: int, rng: random.Random, selector, schedule,
                 connector: Connector, stopping: threading.Event):
        if mqtt_version not in MQTT_VERSIONS:
            raise ValueError(f"MQTT version {mqtt_version!r}: use one of {', '.join(MQTT_VERSIONS)}")
        self.settings = settings
        self.mqtt_version = mqtt_version
        # Every RabbitMQ node's MQTT listener: devices are spread over them and move on to the
        # next when theirs fails.
        self.addresses = [(node.rabbitmq_host, node.mqtt_plain_port if plain else node.mqtt_port)
                          for node in settings.rabbitmq_addresses()]
        self.identity = DeviceIdentity(PKI(settings.pki_path), settings.ca_file, plain)
        self.keepalive = keepalive
        self.max_queued_messages = max_queued_messages
        self.rng = rng
        self.selector = selector
        self.schedule = schedule    # schedule(due, job, link): Schedule.add of the simulator's
        self.connector = connector
        self.stopping = stopping
        # From handing a message to paho to RabbitMQ's PUBACK: the broker's share of a device's
        # delay (the simulator's own is Simulator.lateness: from due to handed to paho).
        self.ack_wait = Lateness()
        self.publish_properties = None
        if mqtt_version == "5":
            self.publish_properties = Properties(PacketTypes.PUBLISH)
            self.publish_properties.ContentType = CONTENT_TYPE

    def create(self, config: DeviceConfig, state: DeviceState, index: int,
               set_status) -> DeviceLink:
        """A device's client and link, not connected yet; commands set its status through
        `set_status` (the simulator's, which emits what the change must)."""
        client = new_client(config.id, self.mqtt_version, self.identity)
        commands = DeviceCommands(
            set_status=set_status,
            set_interval=lambda interval: setattr(state, "interval", tuple(interval)),
            reported=state.reported)
        entry = DeviceLink(state, client, commands,
                           topics={t: naming.mqtt_topic(config.id, t)
                                   for t in (*naming.MESSAGE_TYPES, naming.REPLY_TYPE)},
                           node=index % len(self.addresses))
        client.user_data_set(entry)
        client.max_queued_messages_set(self.max_queued_messages)
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_publish = self.on_publish
        client.on_subscribe = self.on_subscribe
        client.on_message = self.on_message
        client.on_socket_close = self.on_socket_close
        return entry

    def watch_writes(self, entry: DeviceLink) -> None:
        """Watch the socket for writability only while paho has bytes it could not send yet.

        paho writes at once when no write callback is set (the common case costs no extra
        system call); what the kernel did not take is sent when the selector says it can be.
        """
        sock = entry.client.socket()
        if sock is None:
            return
        wanted = entry.client.want_write()
        if wanted != entry.write_registered:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
            self.selector.modify(sock, events, entry)
            entry.write_registered = wanted

    def publish(self, entry: DeviceLink, payload: dict, message_type: str = "info") -> None:
        """Hand one message to paho, or to the device's backlog while it is not connected.

        Why the backlog: paho 2.2's reconnect() opens the socket and sends CONNECT at once, and
        from then on publish() writes immediately, while the messages left unacknowledged by the
        lost connection are only resent when the CONNACK arrives. A message published between
        the two would overtake that backlog. So until on_connect has run and the backlog has
        been handed on (_flush_backlog, after loop_read), messages wait here, in order.
        """
        state = entry.state
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        topic = entry.topics[message_type]
        # published - acked: what waits for the broker, in paho and in the backlog alike.
        if self.max_queued_messages > 0 and state.published - state.acked >= self.max_queued_messages:
            self._dropped(state, payload["seq"])
            return
        if state.connected and not entry.backlog:
            info = entry.client.publish(topic, body, qos=1, properties=self.publish_properties)
            self.watch_writes(entry)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._dropped(state, payload["seq"])
                return
            # MQTT_ERR_NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
            entry.handed[info.mid] = time.monotonic()
        else:
            entry.backlog.append((topic, body))
        state.published += 1
        state.last_message_ts = payload["ts"]

    def _dropped(self, state: DeviceState, seq: int) -> None:
        state.dropped += 1
        if state.dropped == 1 or state.dropped % 100 == 0:
            LOGGER.warning("device %s: %d messages wait for the broker already; dropped seq %d "
                           "(%d dropped so far)", state.id, self.max_queued_messages, seq,
                           state.dropped)

    def flush_backlog(self, entry: DeviceLink) -> None:
        """Hand the backlog to paho in order, once connected (paho resent its own messages)."""
        client = entry.client
        while entry.backlog and entry.state.connected and client.socket() is not None:
            topic, body = entry.backlog[0]
            info = client.publish(topic, body, qos=1, properties=self.publish_properties)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                break  # paho is full after all: the rest waits for acknowledgements, in order
            entry.handed[info.mid] = time.monotonic()
            entry.backlog.popleft()
        self.watch_writes(entry)

    def connect(self, entry: DeviceLink) -> None:
        """Start a connect attempt to the device's node on a worker thread (opened() goes on)."""
        if (entry.state.removed or self.stopping.is_set() or entry.connecting
                or entry.client.socket() is not None):
            return
        host, port = self.addresses[entry.node]
        entry.connecting = True
        self.connector.open(entry.client, host, port,
                            {"keepalive": self.keepalive, **session_options(self.mqtt_version)},
                            lambda error: self.opened(entry, host, port, error))

    def opened(self, entry: DeviceLink, host: str, port: int, error: Exception | None) -> None:
        """A connect attempt's outcome, back on the scheduler thread: watch the new connection
        and give it a CONNACK deadline, or try the next node later."""
        entry.connecting = False
        sock = entry.client.socket()
        if error is None and sock is not None:
            if entry.state.removed or self.stopping.is_set():
                close_now(entry.client)  # removed while it connected
                return
            self.selector.register(sock, selectors.EVENT_READ, entry)
            entry.write_registered = False
            self.watch_writes(entry)
            entry.attempt += 1
            self.schedule(time.monotonic() + CONNACK_TIMEOUT, Job.CONNACK, entry, entry.attempt)
            return
        if entry.state.removed or self.stopping.is_set():
            return
        if not isinstance(error, OSError):  # not the network's doing: say so loudly
            LOGGER.error("device %s: connecting to %s:%s failed: %r", entry.state.id, host, port,
                         error)
        else:
            LOGGER.warning("device %s cannot connect to %s:%s (%s); retrying in %.0f s%s",
                           entry.state.id, host, port, error, entry.backoff,
                           " on the next node" if len(self.addresses) > 1 else "")
        self.next_node(entry)
        self.retry_later(entry)

    def connack_due(self, entry: DeviceLink, attempt: int) -> None:
        """The deadline of connect attempt `attempt`: still no CONNACK, so close the connection
        (its disconnect moves the device to the next node and schedules the next attempt)."""
        if (attempt != entry.attempt or entry.state.connected or entry.client.socket() is None
                or entry.state.removed or self.stopping.is_set()):
            return
        host, port = self.addresses[entry.node]
        LOGGER.warning("device %s: no CONNACK from %s:%s within %.0f s; trying the next node",
                       entry.state.id, host, port, CONNACK_TIMEOUT)
        close_now(entry.client)

    def next_node(self, entry: DeviceLink) -> None:
        entry.node = (entry.node + 1) % len(self.addresses)

    def retry_later(self, entry: DeviceLink) -> None:
        delay = entry.backoff * self.rng.uniform(0.8, 1.2)  # jitter: no reconnect stampede
        entry.backoff = min(entry.backoff * 2, self.settings.reconnect_max_seconds)
        self.schedule(time.monotonic() + delay, Job.CONNECT, entry)

    def disconnect(self, entry: DeviceLink) -> None:
        """Send DISCONNECT and close the connection now, even when the DISCONNECT cannot go out.
        A connection still opening is closed when its outcome arrives (opened())."""
        if not entry.connecting:
            close_now(entry.client)
        entry.state.connected = False

    def on_connect(self, client, entry, flags, reason_code, properties):
        if reason_code.is_failure:
            LOGGER.error("device %s: broker refused the connection: %s", entry.state.id, reason_code)
            return
        if entry.backoff > RECONNECT_MIN:
            LOGGER.info("device %s reconnected", entry.state.id)
        entry.state.connected = True
        entry.backoff = RECONNECT_MIN
        entry.failed = 0
        # Subscribing again on a resumed session is harmless, and makes a lost session whole.
        client.subscribe([(naming.command_topic(entry.state.id), 1),
                          (naming.command_topic(naming.BROADCAST), 1)])
        self.reply(entry, json.dumps({"reported": entry.state.reported()}).encode())

    def on_subscribe(self, client, entry, mid, reason_codes, properties):
        entry.subscribed = all(not code.is_failure for code in reason_codes)
        if not entry.subscribed:
            LOGGER.error("device %s: the broker refused its command subscriptions (%s): check "
                         "its permissions (python -m rabbitmq.topology)", entry.state.id,
                         ", ".join(str(code) for code in reason_codes))

    def on_message(self, client, entry, message):
        """A command: apply it (once per command id), answer, then acknowledge it."""
        answer = entry.commands.handle(message.payload)
        if answer is not None:
            self.reply(entry, answer.to_json())
            LOGGER.info("device %s: command %s %s: %s %s", entry.state.id, answer.name,
                        answer.command_id, answer.status, answer.detail)
        client.ack(message.mid, message.qos)
        self.watch_writes(entry)

    def reply(self, entry: DeviceLink, body: bytes) -> None:
        """An answer or a report on the device's reply topic (QoS 1; not counted as telemetry)."""
        info = entry.client.publish(entry.topics[naming.REPLY_TYPE], body, qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN:
            entry.reply_mids.add(info.mid)
        self.watch_writes(entry)

    def on_disconnect(self, client, entry, flags, reason_code, properties):
        was_connected = entry.state.connected
        entry.state.connected = False
        entry.subscribed = False
        if entry.state.removed or self.stopping.is_set():
            return
        if was_connected:
            LOGGER.warning("device %s lost its connection (%s); reconnecting", entry.state.id,
                           reason_code)
        else:
            # An attempt that ended before its CONNACK: said on the 1st, 2nd, 4th, 8th... in a
            # row, so that a device that cannot get in is seen without flooding the log.
            entry.failed += 1
            if entry.failed & (entry.failed - 1) == 0:
                host, port = self.addresses[entry.node]
                LOGGER.warning("device %s: %s:%s ended connect attempt %d without a CONNACK "
                               "(%s); trying the next node", entry.state.id, host, port,
                               entry.failed, reason_code)
        self.next_node(entry)
        self.retry_later(entry)

    def on_publish(self, client, entry, mid, reason_code, properties):
        if mid in entry.reply_mids:
            entry.reply_mids.discard(mid)
            return
        entry.state.acked += 1
        handed = entry.handed.pop(mid, None)
        if handed is not None:
            self.ack_wait.add(time.monotonic() - handed)
        if reason_code != 0:  # MQTT 5 only: a 3.1.1 PUBACK carries no reason
            # 16 "No matching subscribers": routed nowhere, so the topology (webos.topic's
            # alternate exchange) is missing; 135 "Not authorized": the permissions are wrong.
            entry.state.refused += 1
            if entry.state.refused == 1 or entry.state.refused % 100 == 0:
                LOGGER.warning("device %s: RabbitMQ acknowledged a message with %s (%d so far)",
                               entry.state.id, reason_code, entry.state.refused)

    def on_socket_close(self, client, entry, sock):
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass  # never registered (the connection failed before it opened)

