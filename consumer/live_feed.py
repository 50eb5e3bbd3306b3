"""One Kafka consumer thread that keeps the live view's state and fans records out to clients.

The thread owns its confluent-kafka Consumer (group webos-live-view unless configured). On
assignment it rewinds each partition a little (`replay` records) so a freshly started page shows
where every device is, including devices that went Inactive and fell silent. Offsets are stored
after a record is handled and committed every second, so the group's lag is meaningful.

Each browser connection is a Client with a bounded queue. A client that cannot keep up is not
allowed to slow the feed or the other clients: its queue overflows, it is closed, and its
EventSource reconnects and starts again from a fresh snapshot.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException

from common.device_state import DeviceState as Shadow
from consumer.kafka_group import (LIVE_VIEW_GROUP, commit_and_close, consumer_config, group_lag,
                                  offset_tail)
from consumer.records import Record, SeqTracker

LOGGER = logging.getLogger(__name__)
RATE_WINDOW_SECONDS = 10.0
TRAIL_LENGTH = 20


class Client:
    """One connected page: a bounded queue of (event, data) pairs; None means "stream over"."""

    def __init__(self, max_queue: int):
        self.events: queue.Queue = queue.Queue(maxsize=max_queue)
        self.closed = False

    def offer(self, item) -> bool:
        """Queue an event without blocking; False (and the client closed) when it is full."""
        if self.closed:
            return False
        try:
            self.events.put_nowait(item)
            return True
        except queue.Full:
            self.close()
            return False

    def close(self) -> None:
        """End the stream: drop what is queued so the end marker always fits."""
        self.closed = True
        while True:
            try:
                self.events.get_nowait()
            except queue.Empty:
                break
        self.events.put_nowait(None)


class DeviceState:
    """What the page shows for one device."""

    def __init__(self, device: str):
        self.device = device
        self.status: str | None = None
        self.x = None
        self.y = None
        self.seq: int | None = None
        self.last_ts: int | None = None
        self.count = 0
        self.trail: deque = deque(maxlen=TRAIL_LENGTH)
        self.recent: deque = deque()  # Kafka timestamps (ms) inside the rate window
        self.online: bool | None = None  # from the presence topic; None: never heard of
        self.online_since: int | None = None  # ms: the connect or disconnect it was told of
        self.shadow: Shadow | None = None  # desired and reported, from the state topic

    def update_presence(self, payload: dict) -> None:
        """A `connected` or `disconnected` record of this device."""
        self.online = payload.get("type") == "connected"
        self.online_since = payload.get("ts") or None

    def update(self, record: Record) -> None:
        payload = record.payload if isinstance(record.payload, dict) else {}
        self.count += 1
        if record.status:
            self.status = record.status
        if isinstance(payload.get("x"), (int, float)) and isinstance(payload.get("y"), (int, float)):
            self.x, self.y = payload["x"], payload["y"]
            self.trail.append((self.x, self.y))
        if record.seq is not None:
            self.seq = record.seq
        ts = record.timestamp or int(time.time() * 1000)
        self.last_ts = max(self.last_ts or 0, ts)
        self.recent.append(ts)

    def rate(self, now_ms: int) -> float:
        """Records per second over the last RATE_WINDOW_SECONDS (by record timestamp)."""
        horizon = now_ms - RATE_WINDOW_SECONDS * 1000
        while self.recent and self.recent[0] < horizon:
            self.recent.popleft()
        return round(sum(1 for ts in self.recent if ts <= now_ms) / RATE_WINDOW_SECONDS, 2)

    def to_dict(self, now_ms: int) -> dict:
        return {"id": self.device, "status": self.status, "x": self.x, "y": self.y,
                "seq": self.seq, "last_ts": self.last_ts, "count": self.count,
                "rate": self.rate(now_ms), "trail": [list(point) for point in self.trail],
                "online": self.online, "online_since": self.online_since,
                "desired": self.shadow.desired if self.shadow else {},
                "reported": self.shadow.reported if self.shadow else {},
                "pending": bool(self.shadow and self.shadow.delta())}


def log_entry(record: Record, note: str | None) -> dict:
    """One line of the page's message log."""
    payload = record.payload if isinstance(record.payload, dict) else {}
    entry = {"device": record.device, "type": record.message_type, "partition": record.partition,
             "offset": record.offset, "ts": record.timestamp, "json": record.is_json,
             "status": record.status, "x": payload.get("x"), "y": payload.get("y"),
             "seq": record.seq, "command": payload.get("command")}
    if not record.is_json:
        entry["raw"] = record.raw_text[:200]
    if note:
        entry["note"] = note
    return entry


class LiveFeed:
    """The Kafka consumer thread of the live view, its state, and the connected clients."""

    def __init__(self, kafka: dict, topic: str, group: str = LIVE_VIEW_GROUP, replay: int = 200,
                 log_size: int = 200, max_client_queue: int = 1000, stats_interval: float = 1.0,
                 presence_topic: str = "", state_topic: str = ""):
        self.kafka = kafka
        self.topic = topic
        self.presence_topic = presence_topic  # read from its beginning: who is online
        self.state_topic = state_topic  # read from its beginning: desired and reported
        self.group = group
        self.replay = replay
        self.max_client_queue = max_client_queue
        self.stats_interval = stats_interval
        self.devices: dict[str, DeviceState] = {}
        self.log: deque = deque(maxlen=log_size)
        self.seq = SeqTracker()
        self.totals = {"records": 0, "non_json": 0}
        self.lag: list[dict] = []
        self.lag_error: str | None = None
        self.assigned: list[int] = []
        self.clients: set[Client] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="live-feed", daemon=True)

    # lifecycle
    def start(self) -> "LiveFeed":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread (it commits and closes its consumer) and end every client stream."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)
        with self.lock:
            for client in list(self.clients):
                client.close()
            self.clients.clear()

    # clients
    def subscribe(self) -> tuple[Client, dict]:
        """A new client and the snapshot it starts from (taken atomically with registering)."""
        client = Client(self.max_client_queue)
        with self.lock:
            snapshot = self._snapshot()
            self.clients.add(client)
        return client, snapshot

    def unsubscribe(self, client: Client) -> None:
        with self.lock:
            self.clients.discard(client)

    def snapshot(self) -> dict:
        """Everything the page shows right now."""
        with self.lock:
            return self._snapshot()

    def _snapshot(self) -> dict:
        now_ms = int(time.time() * 1000)
        return {"topic": self.topic, "group": self.group, "now": now_ms,
                "devices": [state.to_dict(now_ms) for state in self.devices.values()],
                "log": list(self.log), "lag": self.lag, "lag_error": self.lag_error,
                "totals": dict(self.totals), "connected_clients": len(self.clients)}

    def _publish(self, event: str, data: dict) -> None:
        """Hand one event to every client (caller holds the lock); slow clients are closed."""
        for client in list(self.clients):
            if not client.offer((event, data)):
                LOGGER.warning("a live-view client fell %d events behind: closed, it will resync",
                               self.max_client_queue)
                self.clients.discard(client)

    # the consumer thread
    def on_assign(self, consumer, partitions) -> None:
        """Rewind each partition `replay` records so the page starts with every device's state."""
        for partition in partitions:
            partition.offset = (offset_tail(self.replay) if partition.topic == self.topic
                                else OFFSET_BEGINNING)
        consumer.assign(partitions)
        self.assigned = sorted(p.partition for p in partitions if p.topic == self.topic)
        LOGGER.info("live view assigned %s[%s], replaying up to %d records each", self.topic,
                    ",".join(map(str, self.assigned)), self.replay)

    def on_revoke(self, consumer, partitions) -> None:
        self.assigned = []

    def run(self) -> None:
        consumer = Consumer(consumer_config(self.kafka, self.group, from_beginning=True,
                                            **{"auto.commit.interval.ms": 1000}))
        # Lag comes from a second client in the same group that never joins it: asking the
        # fetching consumer for watermarks waits behind its fetch requests (~0.5 s each).
        lag_reader = Consumer({**self.kafka, "group.id": self.group,
                               "enable.auto.commit": False,
                               "logger": logging.getLogger("consumer.librdkafka")})
        next_stats = 0.0
        try:
            topics = [self.topic, *filter(None, (self.presence_topic, self.state_topic))]
            consumer.subscribe(topics, on_assign=self.on_assign, on_revoke=self.on_revoke)
            while not self.stopping.is_set():
                message = consumer.poll(0.1)
                if message is not None:
                    if message.error():
                        if message.error().code() != KafkaError._PARTITION_EOF:
                            LOGGER.warning("Kafka: %s", message.error())
                    elif message.topic() == self.presence_topic:
                        self.handle_presence(Record.from_message(message))
                        consumer.store_offsets(message)
                    elif message.topic() == self.state_topic:
                        self.handle_state(message.key(), message.value())
                        consumer.store_offsets(message)
                    else:
                        self.handle(Record.from_message(message))
                        consumer.store_offsets(message)
                if time.monotonic() >= next_stats:
                    next_stats = time.monotonic() + self.stats_interval
                    self.publish_stats(lag_reader)
        except Exception:  # the page must say the feed died rather than freeze silently
            LOGGER.exception("live feed stopped by an error")
            self.lag_error = "live feed stopped: see the server log"
            with self.lock:
                self._publish("stats", self._stats())
        finally:
            commit_and_close(consumer)
            lag_reader.close()

    def handle(self, record: Record) -> None:
        """Update the device, the log and the totals; send the record to every client."""
        device = record.device or "?"
        with self.lock:
            self.totals["records"] += 1
            if not record.is_json:
                self.totals["non_json"] += 1
            note = {"gap": "seq gap", "out-of-order": "seq out of order"}.get(
                self.seq.observe(device, record.seq))
            state = self.devices.get(device)
            if state is None:
                state = self.devices[device] = DeviceState(device)
            state.update(record)
            entry = log_entry(record, note)
            self.log.append(entry)
            now_ms = int(time.time() * 1000)
            self._publish("record", {"record": entry, "device": state.to_dict(now_ms),
                                     "totals": dict(self.totals)})

    def handle_presence(self, record: Record) -> None:
        """A device connected or disconnected: its state says so, every client is told."""
        if not record.device or not isinstance(record.payload, dict):
            return
        with self.lock:
            state = self.devices.get(record.device)
            if state is None:
                state = self.devices[record.device] = DeviceState(record.device)
            state.update_presence(record.payload)
            self._publish("presence", {"device": state.to_dict(int(time.time() * 1000))})

    def handle_state(self, key: bytes | None, value: bytes | None) -> None:
        """A device's desired and reported state changed: its row says so, every client is
        told (as a presence event: the page redraws the device)."""
        if not key:
            return
        device = key.decode(errors="replace")
        with self.lock:
            state = self.devices.get(device)
            if state is None:
                state = self.devices[device] = DeviceState(device)
            state.shadow = Shadow.from_json(value)
            self._publish("presence", {"device": state.to_dict(int(time.time() * 1000))})

    def publish_stats(self, lag_reader: Consumer) -> None:
        """Once a second: rates per device and the group's lag per partition."""
        try:
            self.lag = [lag.to_dict() for lag in group_lag(lag_reader, self.topic, timeout=2.0)]
            self.lag_error = None
        except KafkaException as error:
            self.lag_error = str(error)
        with self.lock:
            self._publish("stats", self._stats())

    def _stats(self) -> dict:
        now_ms = int(time.time() * 1000)
        return {"now": now_ms, "rates": {d: s.rate(now_ms) for d, s in self.devices.items()},
                "lag": self.lag, "lag_error": self.lag_error, "totals": dict(self.totals)}
