"""The device simulator: every device is its own MQTT client, all driven by one scheduler thread.

One thread owns everything that changes: the device registry's state machines, a heap of due
times and every paho client (paho's external loop: `loop_read`/`loop_write`/`loop_misc` on a
`selectors` selector). Other threads (Flask's request threads) hand it commands and wait on a
`Future`; a socketpair wakes the loop at once, so a toggle takes effect within milliseconds.
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
import selectors
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.devices import ACTIVE, INACTIVE, STATUSES, DeviceConfig
from publisher.device_commands import DeviceCommands
from rabbitmq import naming
from common.config import Settings
from common.pki import PKI, client_context

LOGGER = logging.getLogger(__name__)

LATE_MS = 100  # a message published more than this after its due time counts as late
MISC_PERIOD = 5.0  # paho's loop_misc (keepalive pings, timeouts) per client, seconds
# s before a device's first reconnect attempt; it doubles up to Settings.reconnect_max_seconds
RECONNECT_MIN = 1.0
# MQTT versions a device can speak, the default first. With MQTT 5 each message says its content
# type, which reaches Kafka as the record header content_type.
MQTT_VERSIONS = ("5", "3.1.1")
_PAHO_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
CONTENT_TYPE = "application/json"
# How long the broker keeps a device's session (its command subscriptions and the commands sent
# while it is away) after it disconnects: RabbitMQ's default cap, one day.
SESSION_EXPIRY = 86400


class UnknownDevice(KeyError):
    """No device with that id runs here."""


class DuplicateDevice(ValueError):
    """A device with that id already runs here."""


# ---------------------------------------------------------------------------------------------
# One device's state machine (owned by the scheduler thread; pure, no I/O)

def now_ms() -> int:
    """Epoch milliseconds, the payload's `ts`."""
    return time.time_ns() // 1_000_000


class DeviceState:
    """Status, position and counters of one device, and the messages its transitions emit.

    `generation` changes on every status change: a publish scheduled under an older generation
    is stale and dropped, so a quick Inactive -> Active -> Inactive can neither double nor skip.
    """

    def __init__(self, config: DeviceConfig, rng: random.Random | None = None):
        self.config = config
        self.id = config.id
        self.status = config.status
        self.interval = tuple(config.interval)  # set-interval changes it
        self.generation = 0
        self.position_index = 0
        self.seq = 0
        self.rng = rng or random.Random()
        self.published = 0
        self.acked = 0
        self.dropped = 0
        self.refused = 0  # acknowledged with an MQTT 5 reason code other than Success
        self.last_message_ts: int | None = None
        self.connected = False
        self.removed = False

    def set_status(self, status: str) -> bool:
        """Apply a status; True when it changed (the caller then emits or schedules a message)."""
        if status not in STATUSES:
            raise ValueError(f"invalid status {status!r}")
        if status == self.status:
            return False
        self.status = status
        self.generation += 1
        return True

    def next_interval(self) -> float:
        """Seconds until the next position report: uniform in the configured [min, max]."""
        low, high = self.interval
        return self.rng.uniform(low, high)

    def position(self) -> tuple[float, float]:
        """The position the device reports next."""
        return self.config.route[self.position_index]

    def message(self, command: str = "position", **extra) -> dict:
        """The next payload (`seq` +1); a position report while Active moves along the route."""
        x, y = self.position()
        self.seq += 1
        payload = {"Producer": self.id, "command": command, "id": self.id, "x": x, "y": y,
                   "status": self.status}
        payload.update(extra)
        payload.update(seq=self.seq, msg_id=uuid.uuid4().hex, ts=now_ms())
        if command == "position" and self.status == ACTIVE:
            self.position_index = (self.position_index + 1) % len(self.config.route)
        return payload

    def snapshot(self) -> dict:
        """What the API and the page show about this device."""
        x, y = self.position()
        return {"id": self.id, "status": self.status, "connected": self.connected,
                "messages": self.published, "acked": self.acked, "dropped": self.dropped,
                "refused": self.refused,
                "seq": self.seq, "last_message_ts": self.last_message_ts, "position": [x, y],
                "interval": list(self.interval), "route_length": len(self.config.route)}

    def reported(self) -> dict:
        """What the device reports of itself to the platform (webos.state's `reported`)."""
        return {"status": self.status, "interval": list(self.interval)}


# ---------------------------------------------------------------------------------------------
# Lateness: how far after its due time each scheduled message went out

class Lateness:
    """Counts of scheduled publishes by lateness (1 ms buckets up to 10 s)."""

    BUCKETS = 10_000

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget everything counted so far (for example after a warm-up)."""
        self.counts = [0] * (self.BUCKETS + 1)
        self.total = 0
        self.on_time = 0
        self.worst_ms = 0.0

    def add(self, late_seconds: float) -> None:
        """Count one publish that went out `late_seconds` after its due time."""
        late_ms = max(0.0, late_seconds * 1000.0)
        self.total += 1
        if late_ms <= LATE_MS:
            self.on_time += 1
        self.worst_ms = max(self.worst_ms, late_ms)
        self.counts[min(int(late_ms), self.BUCKETS)] += 1

    def percentile(self, share: float) -> float:
        """The lateness (ms) under which `share` of the publishes went out."""
        if not self.total:
            return 0.0
        target, running = share * self.total, 0
        for bucket, count in enumerate(self.counts):
            running += count
            if running >= target:
                return float(bucket)
        return float(self.BUCKETS)

    def summary(self) -> dict:
        """Totals and percentiles, JSON-ready."""
        return {"scheduled": self.total,
                "on_time_share": (self.on_time / self.total) if self.total else None,
                "p50_ms": self.percentile(0.5), "p99_ms": self.percentile(0.99),
                "max_ms": round(self.worst_ms, 1)}


# ---------------------------------------------------------------------------------------------
# The simulator

PUBLISH, MISC, CONNECT = "publish", "misc", "connect"


@dataclass
class _Device:
    state: DeviceState
    client: mqtt.Client
    backoff: float = RECONNECT_MIN
    topics: dict = field(default_factory=dict)
    write_registered: bool = False  # the selector also watches for writability
    # (topic, body) accepted while the connection is not up (or the backlog not yet handed on),
    # oldest first; see _publish for why paho does not get them at once.
    backlog: deque = field(default_factory=deque)
    node: int = 0  # which of the RabbitMQ nodes it connects to (the next one when that fails)
    commands: DeviceCommands | None = None  # applies what the platform asks (set in _register)
    reply_mids: set = field(default_factory=set)  # replies and reports in flight (not telemetry)
    subscribed: bool = False  # the broker granted its command subscriptions


class Simulator:
    """Runs devices: one scheduler thread, one paho client per device, one selector for all."""

    def __init__(self, settings: Settings, devices: list[DeviceConfig], *, keepalive: int = 60,
                 max_queued_messages: int = 1000, seed: int | None = None, stagger: bool = True,
                 mqtt_version: str = MQTT_VERSIONS[0], plain: bool = False):
        if mqtt_version not in _PAHO_PROTOCOLS:
            raise ValueError(f"MQTT version {mqtt_version!r}: use one of {', '.join(MQTT_VERSIONS)}")
        # plain: the devices log in with their passwords on the plain listener (only there with
        # WEBOS_PLAIN_LISTENERS; make bench uses it to measure what TLS costs).
        self.plain = plain
        # Every RabbitMQ node's MQTT listener: devices are spread over them and move on to the
        # next when theirs fails.
        self.addresses = [(node.rabbitmq_host, node.mqtt_plain_port if plain else node.mqtt_port)
                          for node in settings.rabbitmq_addresses()]
        self.settings = settings
        self.pki = PKI(settings.pki_path)
        self.mqtt_version = mqtt_version
        self._publish_properties = None
        if mqtt_version == "5":
            self._publish_properties = Properties(PacketTypes.PUBLISH)
            self._publish_properties.ContentType = CONTENT_TYPE
        self.keepalive = keepalive
        self.max_queued_messages = max_queued_messages
        self.stagger = stagger
        self.rng = random.Random(seed)
        self.lateness = Lateness()
        self._devices: dict[str, _Device] = {}
        self._registry_lock = threading.Lock()  # guards the dict for readers in other threads
        self._heap: list = []
        self._counter = itertools.count()
        self._commands: deque = deque()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-scheduler", daemon=True)
        self._initial = list(devices)

    # -- thread-safe API (any thread) ---------------------------------------------------------

    def start(self) -> None:
        """Register every configured device (listed from now on), then connect them and start
        publishing in the scheduler thread."""
        for config in self._initial:
            self._submit(self._begin, self._register(config), True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Let in-flight messages be acknowledged (up to 3 s), then disconnect every device."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOGGER.error("the device scheduler did not stop within %.0f s", timeout)
        elif self._thread.ident is None:  # never started
            self._close_selector()

    def _close_selector(self) -> None:
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def set_status(self, device: str, status: str) -> Future:
        """Make a device Active or Inactive, as its own switch does (the change is reported to
        the platform); the Future's result says whether it changed."""
        return self._submit(self._toggle, device, status)

    def add_device(self, config: DeviceConfig) -> Future:
        """Start a new device (its queue must exist already); DuplicateDevice if it runs."""
        return self._submit(self._add, config, False)

    def remove_device(self, device: str) -> Future:
        """Stop a device and disconnect its client; UnknownDevice if it does not run."""
        return self._submit(self._remove, device)

    def send_message(self, device: str, message_type: str, text: str) -> Future:
        """Publish one operator message of `message_type` as the device; result: the payload."""
        return self._submit(self._send_message, device, message_type, text)

    def call(self, function, *args) -> Future:
        """Run `function(*args)` on the scheduler thread (for consistent reads in tests/bench)."""
        return self._submit(function, *args)

    def __contains__(self, device: str) -> bool:
        return device in self._devices

    def device(self, device: str) -> dict | None:
        """A snapshot of one device, or None."""
        entry = self._devices.get(device)
        return entry.state.snapshot() if entry else None

    def snapshot(self) -> list[dict]:
        """Snapshots of every device, in the order they were added."""
        with self._registry_lock:
            entries = list(self._devices.values())
        return [entry.state.snapshot() for entry in entries]

    def stats(self) -> dict:
        """Totals over all devices and the lateness of scheduled publishes."""
        with self._registry_lock:
            states = [entry.state for entry in self._devices.values()]
        with self._registry_lock:
            subscribed = sum(entry.subscribed for entry in self._devices.values())
        return {"devices": len(states),
                "connected": sum(s.connected for s in states),
                "subscribed": subscribed,
                "active": sum(s.status == ACTIVE for s in states),
                "published": sum(s.published for s in states),
                "acked": sum(s.acked for s in states),
                "dropped": sum(s.dropped for s in states),
                "lateness": self.lateness.summary()}

    # -- plumbing ---------------------------------------------------------------------------

    def _submit(self, function, *args) -> Future:
        future: Future = Future()
        if self._stop.is_set():
            future.set_exception(RuntimeError("the simulator is stopping"))
            return future
        self._commands.append((function, args, future))
        self._wake()
        return future

    def _wake(self) -> None:
        try:
            self._wake_write.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the buffer is full (a wake-up is pending anyway) or the loop is closed

    def _schedule(self, due: float, kind: str, entry: _Device, generation: int = 0) -> None:
        heapq.heappush(self._heap, (due, next(self._counter), kind, entry, generation))

    # -- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                self._run_due(time.monotonic())
                timeout = 0.5
                if self._heap:
                    timeout = min(timeout, max(0.0, self._heap[0][0] - time.monotonic()))
                self._poll(timeout)
            self._run_commands()
            self._drain()
        except Exception:
            LOGGER.exception("device scheduler crashed")
            raise
        finally:
            for entry in list(self._devices.values()):
                self._disconnect(entry)
            while self._commands:
                _, _, future = self._commands.popleft()
                future.set_exception(RuntimeError("the simulator stopped"))
            self._close_selector()

    def _poll(self, timeout: float) -> None:
        for key, mask in self._selector.select(timeout):
            entry = key.data
            if entry is None:
                try:
                    while self._wake_read.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            client = entry.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
                # A CONNACK read just now made paho resend its unacknowledged messages (after
                # on_connect): only now may the backlog follow them.
                if entry.backlog:
                    self._flush_backlog(entry)
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
            self._watch_writes(entry)

    def _watch_writes(self, entry: _Device) -> None:
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
            self._selector.modify(sock, events, entry)
            entry.write_registered = wanted

    def _run_commands(self) -> None:
        while self._commands:
            function, args, future = self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except Exception as error:  # handed to the caller, who answers 4xx/5xx
                future.set_exception(error)

    def _run_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, kind, entry, generation = heapq.heappop(heap)
            if entry.state.removed:
                continue
            if kind == PUBLISH:
                state = entry.state
                if generation != state.generation or state.status != ACTIVE:
                    continue  # stale: the device was toggled since this was scheduled
                self.lateness.add(time.monotonic() - due)
                self._publish(entry, state.message())
                next_due = due + state.next_interval()
                if next_due < now:  # far behind (a stall): restart the cadence from now
                    next_due = now + state.next_interval()
                self._schedule(next_due, PUBLISH, entry, state.generation)
            elif kind == MISC:
                if entry.client.socket() is not None:
                    entry.client.loop_misc()
                    self._watch_writes(entry)
                self._schedule(due + MISC_PERIOD, MISC, entry)
            elif kind == CONNECT:
                self._connect(entry)

    def _drain(self, timeout: float = 3.0) -> None:
        """On stop: keep doing I/O until every published message is acknowledged, or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [e for e in self._devices.values()
                       if e.state.connected and e.state.published - e.state.acked > 0]
            if not pending:
                return
            self._poll(0.05)
        LOGGER.warning("stopping with unacknowledged messages on %d device(s)", len(pending))

    # -- commands (scheduler thread) ------------------------------------------------------------

    def _entry(self, device: str) -> _Device:
        entry = self._devices.get(device)
        if entry is None:
            raise UnknownDevice(device)
        return entry

    def _add(self, config: DeviceConfig, initial: bool) -> dict:
        return self._begin(self._register(config), initial)

    def _register(self, config: DeviceConfig) -> _Device:
        """A device's state and MQTT client, in the registry; not connected yet."""
        if config.id in self._devices:
            raise DuplicateDevice(config.id)
        state = DeviceState(config, random.Random(self.rng.random()))
        # A persistent session (MQTT 5: clean start off with a Session Expiry; 3.1.1: clean
        # session off): the broker keeps the device's command subscriptions, and what is sent to
        # it while it is away, until it is back. PUBACKs for commands leave only once the command
        # was applied and answered (manual_ack).
        protocol = _PAHO_PROTOCOLS[self.mqtt_version]
        # Its own identity: the certificate the broker logs it in by, and the client id that
        # certificate names (the broker refuses any other).
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.id,
                             protocol=protocol, manual_ack=True,
                             clean_session=False if protocol == mqtt.MQTTv311 else None)
        if self.plain:
            client.username_pw_set(config.id, self.pki.device_password(config.id))
        else:
            client.tls_set_context(client_context(self.settings.ca_file,
                                                  self.pki.ensure_device(config.id)))
        entry = _Device(state, client,
                        topics={t: naming.mqtt_topic(config.id, t)
                                for t in (*naming.MESSAGE_TYPES, naming.REPLY_TYPE)},
                        node=len(self._devices) % len(self.addresses))
        entry.commands = DeviceCommands(
            set_status=lambda status: self._set_status(config.id, status),
            set_interval=lambda interval: setattr(state, "interval", tuple(interval)),
            reported=state.reported)
        client.user_data_set(entry)
        client.max_queued_messages_set(self.max_queued_messages)
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_publish = self.on_publish
        client.on_subscribe = self.on_subscribe
        client.on_message = self.on_message
        client.on_socket_open = self.on_socket_open
        client.on_socket_close = self.on_socket_close
        with self._registry_lock:
            self._devices[config.id] = entry
        return entry

    def _begin(self, entry: _Device, initial: bool) -> dict:
        """Connect a registered device and schedule its first messages (scheduler thread)."""
        state, config = entry.state, entry.state.config
        now = time.monotonic()
        self._connect(entry)
        self._schedule(now + self.rng.uniform(0, MISC_PERIOD), MISC, entry)
        if state.status == ACTIVE:
            # Devices started together are spread over one interval so they do not all report at
            # the same instant; a device added at runtime reports at once.
            offset = self.rng.uniform(0, config.interval[0]) if (initial and self.stagger) else 0.0
            self._schedule(now + offset, PUBLISH, entry, state.generation)
        LOGGER.info("device %s added (%s, %d positions, every %.1f-%.1f s)", config.id,
                    state.status, len(config.route), *config.interval)
        return state.snapshot()

    def _remove(self, device: str) -> dict:
        entry = self._entry(device)
        entry.state.removed = True
        with self._registry_lock:
            del self._devices[device]
        self._disconnect(entry)
        LOGGER.info("device %s removed", device)
        return entry.state.snapshot()

    def _toggle(self, device: str, status: str) -> bool:
        """The device's own switch: change the status and report it (webos.state's reported)."""
        changed = self._set_status(device, status)
        entry = self._entry(device)
        if changed and entry.state.connected:
            self._reply(entry, json.dumps({"reported": entry.state.reported()}).encode())
        return changed

    def _set_status(self, device: str, status: str) -> bool:
        entry = self._entry(device)
        state = entry.state
        if not state.set_status(status):
            return False
        if status == INACTIVE:
            self._publish(entry, state.message())  # the one Inactive message, right now
        else:
            self._schedule(time.monotonic(), PUBLISH, entry, state.generation)
            self._run_due(time.monotonic())
        LOGGER.info("device %s is now %s", device, status)
        return True

    def _send_message(self, device: str, message_type: str, text: str) -> dict:
        if message_type not in naming.MESSAGE_TYPES:
            raise ValueError(f"invalid message type {message_type!r}")
        entry = self._entry(device)
        payload = entry.state.message("message", type=message_type, text=text)
        self._publish(entry, payload, message_type)
        return payload

    # -- MQTT (scheduler thread) ----------------------------------------------------------------

    def _publish(self, entry: _Device, payload: dict, message_type: str = "info") -> None:
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
            info = entry.client.publish(topic, body, qos=1, properties=self._publish_properties)
            self._watch_writes(entry)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                self._dropped(state, payload["seq"])
                return
            # MQTT_ERR_NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
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

    def _flush_backlog(self, entry: _Device) -> None:
        """Hand the backlog to paho in order, once connected (paho resent its own messages)."""
        client = entry.client
        while entry.backlog and entry.state.connected and client.socket() is not None:
            topic, body = entry.backlog[0]
            info = client.publish(topic, body, qos=1, properties=self._publish_properties)
            if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
                break  # paho is full after all: the rest waits for acknowledgements, in order
            entry.backlog.popleft()
        self._watch_writes(entry)

    def _connect(self, entry: _Device) -> None:
        if entry.state.removed or self._stop.is_set():
            return
        host, port = self.addresses[entry.node]
        try:
            if entry.client.socket() is None:
                if entry.client.host == host and entry.client.port == port:
                    entry.client.reconnect()
                else:
                    entry.client.connect(host, port, keepalive=self.keepalive,
                                         **self._session_options())
                self._watch_writes(entry)
        except OSError as error:
            LOGGER.warning("device %s cannot connect to %s:%s (%s); retrying in %.0f s%s",
                           entry.state.id, host, port, error, entry.backoff,
                           " on the next node" if len(self.addresses) > 1 else "")
            self._next_node(entry)
            self._retry_later(entry)

    def _session_options(self) -> dict:
        """connect()'s arguments for a persistent session (paho's reconnect() reuses them)."""
        if self.mqtt_version == "3.1.1":
            return {}  # clean_session=False is the client's own setting
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY
        return {"clean_start": False, "properties": properties}

    def _next_node(self, entry: _Device) -> None:
        entry.node = (entry.node + 1) % len(self.addresses)

    def _retry_later(self, entry: _Device) -> None:
        delay = entry.backoff * self.rng.uniform(0.8, 1.2)  # jitter: no reconnect stampede
        entry.backoff = min(entry.backoff * 2, self.settings.reconnect_max_seconds)
        self._schedule(time.monotonic() + delay, CONNECT, entry)

    def _disconnect(self, entry: _Device) -> None:
        client = entry.client
        if client.socket() is not None:
            client.disconnect()
            if client.socket() is not None:
                client.loop_write()
            if client.socket() is not None:
                client._sock_close()  # paho closes on its own only when it reads the socket
        entry.state.connected = False

    def on_connect(self, client, entry, flags, reason_code, properties):
        if reason_code.is_failure:
            LOGGER.error("device %s: broker refused the connection: %s", entry.state.id, reason_code)
            return
        if entry.backoff > RECONNECT_MIN:
            LOGGER.info("device %s reconnected", entry.state.id)
        entry.state.connected = True
        entry.backoff = RECONNECT_MIN
        # Subscribing again on a resumed session is harmless, and makes a lost session whole.
        client.subscribe([(naming.command_topic(entry.state.id), 1),
                          (naming.command_topic(naming.BROADCAST), 1)])
        self._reply(entry, json.dumps({"reported": entry.state.reported()}).encode())

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
            self._reply(entry, answer.to_json())
            LOGGER.info("device %s: command %s %s: %s %s", entry.state.id, answer.name,
                        answer.command_id, answer.status, answer.detail)
        client.ack(message.mid, message.qos)
        self._watch_writes(entry)

    def _reply(self, entry: _Device, body: bytes) -> None:
        """An answer or a report on the device's reply topic (QoS 1; not counted as telemetry)."""
        info = entry.client.publish(entry.topics[naming.REPLY_TYPE], body, qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN:
            entry.reply_mids.add(info.mid)
        self._watch_writes(entry)

    def on_disconnect(self, client, entry, flags, reason_code, properties):
        was_connected = entry.state.connected
        entry.state.connected = False
        entry.subscribed = False
        if entry.state.removed or self._stop.is_set():
            return
        if was_connected:
            LOGGER.warning("device %s lost its connection (%s); reconnecting", entry.state.id,
                           reason_code)
        self._next_node(entry)
        self._retry_later(entry)

    def on_publish(self, client, entry, mid, reason_code, properties):
        if mid in entry.reply_mids:
            entry.reply_mids.discard(mid)
            return
        entry.state.acked += 1
        if reason_code != 0:  # MQTT 5 only: a 3.1.1 PUBACK carries no reason
            # 16 "No matching subscribers": routed nowhere, so the topology (webos.topic's
            # alternate exchange) is missing; 135 "Not authorized": the permissions are wrong.
            entry.state.refused += 1
            if entry.state.refused == 1 or entry.state.refused % 100 == 0:
                LOGGER.warning("device %s: RabbitMQ acknowledged a message with %s (%d so far)",
                               entry.state.id, reason_code, entry.state.refused)

    def on_socket_open(self, client, entry, sock):
        self._selector.register(sock, selectors.EVENT_READ, entry)
        entry.write_registered = False

    def on_socket_close(self, client, entry, sock):
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError):
            pass  # never registered (the connection failed before it opened)
