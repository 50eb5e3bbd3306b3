"""The device simulator: every device is its own MQTT client, all driven by one scheduler thread.

One thread owns everything that changes: the devices (their state machines and paho clients,
publisher/device_link.py), their schedule (publisher/schedule.py) and one `selectors` selector
over every client's socket (paho's external loop: `loop_read`/`loop_write`/`loop_misc`). Other
threads hand it calls through an Inbox (publisher/inbox.py) and wait on a Future; a toggle
takes effect within milliseconds. Connections open on worker threads (publisher/connector.py),
which hand each outcome back through the same Inbox.
"""
from __future__ import annotations

import json
import logging
import random
import selectors
import threading
import time
from concurrent.futures import Future

from common.config import Settings
from common.devices import ACTIVE, INACTIVE, DeviceConfig
from publisher.connector import Connector
from publisher.device_client import MQTT_VERSIONS  # the apps import it from here too
from publisher.device_link import DeviceLink, DeviceLinks
from publisher.device_model import DeviceState
from publisher.inbox import Inbox
from publisher.lateness import Lateness
from publisher.schedule import Job, Schedule
from rabbitmq import naming

LOGGER = logging.getLogger(__name__)

MISC_PERIOD = 5.0  # paho's loop_misc (keepalive pings, timeouts) per client, seconds
LONGEST_WAIT = 0.5  # seconds the loop waits for I/O at most, so that it sees a stop


class UnknownDevice(KeyError):
    """No device with that id runs here."""


class DuplicateDevice(ValueError):
    """A device with that id already runs here."""


class Simulator:
    """Runs devices: one scheduler thread, one paho client per device, one selector for all."""

    def __init__(self, settings: Settings, devices: list[DeviceConfig], *, keepalive: int = 60,
                 max_queued_messages: int = 1000, seed: int | None = None, stagger: bool = True,
                 mqtt_version: str = MQTT_VERSIONS[0], plain: bool = False):
        self.settings = settings
        self.stagger = stagger
        self.rng = random.Random(seed)
        self.lateness = Lateness()
        self._devices: dict[str, DeviceLink] = {}
        self._registry_lock = threading.Lock()  # guards the dict for readers in other threads
        self._schedule = Schedule()
        self._inbox = Inbox()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._inbox.wakeup, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._connector = Connector(self._inbox.submit)
        # plain: the devices log in with their passwords on the plain listener (only there with
        # WEBOS_PLAIN_LISTENERS; make bench uses it to measure what TLS costs).
        self.links = DeviceLinks(settings, mqtt_version, plain, keepalive, max_queued_messages,
                                 self.rng, self._selector, self._schedule.add, self._connector,
                                 self._stop)
        self._thread = threading.Thread(target=self._run, name="device-scheduler", daemon=True)
        self._initial = list(devices)

    # -- thread-safe API (any thread) ---------------------------------------------------------

    def start(self) -> None:
        """Register every configured device (listed from now on), then connect them and start
        publishing in the scheduler thread."""
        for config in self._initial:
            self.call(self._begin, self._register(config), True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Let in-flight messages be acknowledged (up to 3 s), then disconnect every device."""
        self._stop.set()
        self._inbox.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                LOGGER.error("the device scheduler did not stop within %.0f s", timeout)
        elif self._thread.ident is None:  # never started
            self._connector.close()
            self._close_selector()

    def _close_selector(self) -> None:
        self._selector.close()
        self._inbox.close()

    def set_status(self, device: str, status: str) -> Future:
        """Make a device Active or Inactive, as its own switch does (the change is reported to
        the platform); the Future's result says whether it changed."""
        return self.call(self._toggle, device, status)

    def add_device(self, config: DeviceConfig) -> Future:
        """Start a new device (its queue must exist already); DuplicateDevice if it runs."""
        return self.call(self._add, config, False)

    def remove_device(self, device: str) -> Future:
        """Stop a device and disconnect its client; UnknownDevice if it does not run."""
        return self.call(self._remove, device)

    def send_message(self, device: str, message_type: str, text: str) -> Future:
        """Publish one operator message of `message_type` as the device; result: the payload."""
        return self.call(self._send_message, device, message_type, text)

    def call(self, function, *args) -> Future:
        """Run `function(*args)` on the scheduler thread (for consistent reads in tests/bench)."""
        if self._stop.is_set():
            future: Future = Future()
            future.set_exception(RuntimeError("the simulator is stopping"))
            return future
        return self._inbox.submit(function, *args)

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
        """Totals over all devices, the lateness of scheduled publishes (due to handed to paho)
        and the wait for RabbitMQ's acknowledgement (handed to paho to PUBACK)."""
        with self._registry_lock:
            entries = list(self._devices.values())
        states = [entry.state for entry in entries]
        return {"devices": len(states),
                "connected": sum(s.connected for s in states),
                "subscribed": sum(entry.subscribed for entry in entries),
                "active": sum(s.status == ACTIVE for s in states),
                "published": sum(s.published for s in states),
                "acked": sum(s.acked for s in states),
                "dropped": sum(s.dropped for s in states),
                "lateness": self.lateness.summary(),
                "ack_wait": self.links.ack_wait.summary()}

    # -- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._inbox.run_calls()
                self._run_due(time.monotonic())
                self._poll(self._schedule.seconds_to_next(time.monotonic(), LONGEST_WAIT))
            self._inbox.run_calls()
            self._drain()
        except Exception:
            LOGGER.exception("device scheduler crashed")
            raise
        finally:
            # Connections still opening first: then every client is the scheduler's again.
            self._connector.close()
            for entry in list(self._devices.values()):
                entry.connecting = False
                self.links.disconnect(entry)
            self._inbox.refuse_calls("the simulator stopped")
            self._close_selector()

    def _poll(self, timeout: float) -> None:
        for key, mask in self._selector.select(timeout):
            entry = key.data
            if entry is None:
                self._inbox.take_wakeups()
                continue
            client = entry.client
            if mask & selectors.EVENT_READ:
                client.loop_read()
                # A CONNACK read just now made paho resend its unacknowledged messages (after
                # on_connect): only now may the backlog follow them.
                if entry.backlog:
                    self.links.flush_backlog(entry)
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
            self.links.watch_writes(entry)

    def _run_due(self, now: float) -> None:
        while (due := self._schedule.pop_due(now)) is not None:
            entry = due.link
            if entry.state.removed:
                continue
            if due.job is Job.PUBLISH:
                self._publish_due(entry, due.due, due.generation, now)
            elif due.job is Job.MISC:
                if entry.client.socket() is not None and not entry.connecting:
                    entry.client.loop_misc()
                    self.links.watch_writes(entry)
                self._schedule.add(due.due + MISC_PERIOD, Job.MISC, entry)
            elif due.job is Job.CONNECT:
                self.links.connect(entry)
            elif due.job is Job.CONNACK:
                self.links.connack_due(entry, due.generation)

    def _publish_due(self, entry: DeviceLink, due: float, generation: int, now: float) -> None:
        """A scheduled position report, and the next one scheduled (unless it is stale)."""
        state = entry.state
        if generation != state.generation or state.status != ACTIVE:
            return  # stale: the device was toggled since this was scheduled
        self.lateness.add(time.monotonic() - due)
        self.links.publish(entry, state.message())
        next_due = due + state.next_interval()
        if next_due < now:  # far behind (a stall): restart the cadence from now
            next_due = now + state.next_interval()
        self._schedule.add(next_due, Job.PUBLISH, entry, state.generation)

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

    # -- the calls (scheduler thread) -----------------------------------------------------------

    def _entry(self, device: str) -> DeviceLink:
        entry = self._devices.get(device)
        if entry is None:
            raise UnknownDevice(device)
        return entry

    def _add(self, config: DeviceConfig, initial: bool) -> dict:
        return self._begin(self._register(config), initial)

    def _register(self, config: DeviceConfig) -> DeviceLink:
        """A device's state and MQTT client, in the registry; not connected yet."""
        if config.id in self._devices:
            raise DuplicateDevice(config.id)
        state = DeviceState(config, random.Random(self.rng.random()))
        entry = self.links.create(config, state, len(self._devices),
                                  lambda status: self._set_status(config.id, status))
        with self._registry_lock:
            self._devices[config.id] = entry
        return entry

    def _begin(self, entry: DeviceLink, initial: bool) -> dict:
        """Connect a registered device and schedule its first messages (scheduler thread)."""
        state, config = entry.state, entry.state.config
        now = time.monotonic()
        self.links.connect(entry)
        self._schedule.add(now + self.rng.uniform(0, MISC_PERIOD), Job.MISC, entry)
        if state.status == ACTIVE:
            # Devices started together are spread over one interval so they do not all report at
            # the same instant; a device added at runtime reports at once.
            offset = self.rng.uniform(0, config.interval[0]) if (initial and self.stagger) else 0.0
            self._schedule.add(now + offset, Job.PUBLISH, entry, state.generation)
        LOGGER.info("device %s added (%s, %d positions, every %.1f-%.1f s)", config.id,
                    state.status, len(config.route), *config.interval)
        return state.snapshot()

    def _remove(self, device: str) -> dict:
        entry = self._entry(device)
        entry.state.removed = True
        with self._registry_lock:
            del self._devices[device]
        self.links.disconnect(entry)
        LOGGER.info("device %s removed", device)
        return entry.state.snapshot()

    def _toggle(self, device: str, status: str) -> bool:
        """The device's own switch: change the status and report it (webos.state's reported)."""
        changed = self._set_status(device, status)
        entry = self._entry(device)
        if changed and entry.state.connected:
            self.links.reply(entry, json.dumps({"reported": entry.state.reported()}).encode())
        return changed

    def _set_status(self, device: str, status: str) -> bool:
        entry = self._entry(device)
        state = entry.state
        if not state.set_status(status):
            return False
        if status == INACTIVE:
            self.links.publish(entry, state.message())  # the one Inactive message, right now
        else:
            self._schedule.add(time.monotonic(), Job.PUBLISH, entry, state.generation)
            self._run_due(time.monotonic())
        LOGGER.info("device %s is now %s", device, status)
        return True

    def _send_message(self, device: str, message_type: str, text: str) -> dict:
        if message_type not in naming.MESSAGE_TYPES:
            raise ValueError(f"invalid message type {message_type!r}")
        entry = self._entry(device)
        payload = entry.state.message("message", type=message_type, text=text)
        self.links.publish(entry, payload, message_type)
        return payload
