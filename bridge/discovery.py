"""Finding the device queues to consume: RabbitMQ's queue events, and the management HTTP API's
listing as a safety net; and how many of them deliver to this bridge instance."""
from __future__ import annotations

import logging
import re
import threading
import time
from urllib.parse import quote

import requests

from rabbitmq import naming
from rabbitmq import endpoints
from common.config import Settings

LOGGER = logging.getLogger(__name__)


def select_queues(names, pattern: re.Pattern | None) -> frozenset[str]:
    """The device queues among `names` (optionally only those matching `pattern`)."""
    return frozenset(name for name in names
                     if naming.device_of_queue(name) is not None
                     and (pattern is None or pattern.search(name)))


# Every bridge consumer's tag: this, the instance, a space, the queue.
CONSUMER_TAG_PREFIX = "webos-bridge "


def bridge_consumer_tag(instance: str, queue: str) -> str:
    """How the broker names bridge `instance`'s consumer of `queue` (count_active reads it)."""
    return f"{CONSUMER_TAG_PREFIX}{instance} {queue}"


def count_active(consumers, tag_prefix: str, by_priority: bool = True) -> int:
    """How many queues deliver to this instance, of the consumers listed (consumer_tag
    "webos-bridge <instance> <queue>", arguments with x-priority, active).

    `by_priority` (quorum queues): where this instance's consumer has the highest priority of the
    bridges' consumers, which is what single active consumer picks (the API's `active` flag is
    not updated when a quorum queue switches to a consumer of higher priority). Otherwise
    (classic queues, where the first consumer stays active): the consumers flagged active."""
    if not by_priority:
        return sum(1 for consumer in consumers if consumer.get("active")
                   and str(consumer.get("consumer_tag", "")).startswith(tag_prefix))
    best: dict[str, tuple[int, bool]] = {}
    for consumer in consumers:
        tag = str(consumer.get("consumer_tag", ""))
        if not tag.startswith(CONSUMER_TAG_PREFIX):
            continue
        queue = tag.rsplit(" ", 1)[-1]
        priority = int((consumer.get("arguments") or {}).get("x-priority", 0))
        if queue not in best or priority > best[queue][0]:
            best[queue] = (priority, tag.startswith(tag_prefix))
    return sum(1 for _, ours in best.values() if ours)


class QueueDiscovery:
    """Which device queues there are: RabbitMQ's queue events as they happen, and a full listing
    through the management HTTP API in its own thread (HTTP must not stall the loop).

    The forwarder consumes `queue.created` and `queue.deleted` from the event exchange
    (rabbitmq_event_exchange) on its own connection and hands each to `on_event`, so a new
    device queue is known within a loop turn. The listing is the safety net (events published
    while the bridge was disconnected, a broker without the plugin): every `interval` s while
    events flow, every `fallback_interval` s while they do not (`events_working`).

    The loop thread reads `queues`, a frozenset replaced whole on each change. Every
    `count_interval` s the thread also lists the vhost's consumers and counts into
    `stats.active_queues` the queues whose single active consumer is this instance's (see
    count_active; the listing follows the statistics, up to about 5 s late). With `list_queues`
    off (explicit --queues) only that count is kept.
    """

    def __init__(self, settings: Settings, pattern: re.Pattern | None, interval: float = 30.0,
                 instance: str = "", list_queues: bool = True, stats=None,
                 fallback_interval: float = 2.0, count_interval: float = 5.0,
                 timeout: float = 10.0):
        self.pattern = pattern
        self.interval = interval
        self.fallback_interval = min(fallback_interval, interval)
        self.count_interval = count_interval
        self.timeout = timeout
        self.tag_prefix = bridge_consumer_tag(instance, "")  # this instance's consumers' tags
        self.list_queues = list_queues
        self.stats = stats
        vhost = quote(settings.vhost, safe='')
        self.url = f"{settings.management_url}/api/queues/{vhost}"
        self.consumers_url = f"{settings.management_url}/api/consumers/{vhost}"
        self.settings = settings
        self.queues: frozenset[str] | None = None
        self.events_working = False  # True while a connection receives queue events
        self._lock = threading.Lock()
        self._since_listing: dict[str, bool] = {}  # queue -> created (True) or deleted, by events
        self._stop = threading.Event()
        self._wake = threading.Event()  # stop() or request_listing()
        self._list_now = False
        self._thread = threading.Thread(target=self._run, name="queue-discovery", daemon=True)
        self._failing = False

    def events_started(self) -> None:
        """A connection receives queue events now: a full listing now and then is enough."""
        self.events_working = True

    def events_stopped(self) -> None:
        """No queue events (a connection lost, or none allowed): list queues more often."""
        self.events_working = False

    def on_event(self, queue: str, created: bool) -> bool:
        """A queue.created or queue.deleted event; True when it changed the known device queues."""
        if not select_queues([queue], self.pattern):
            return False
        with self._lock:
            self._since_listing[queue] = created
            known = self.queues or frozenset()
            updated = known | {queue} if created else known - {queue}
            if updated == known:
                return False
            self.queues = updated
        return True

    def request_listing(self) -> None:
        """List at once (after a reconnect: events published meanwhile were missed)."""
        self._list_now = True
        self._wake.set()

    def list_once(self, http: requests.Session) -> frozenset[str]:
        """One listing of the matching device queues."""
        response = http.get(self.url, params={"columns": "name"}, timeout=self.timeout)
        response.raise_for_status()
        return select_queues((queue["name"] for queue in response.json()), self.pattern)

    def count_active(self, http: requests.Session) -> int:
        """How many queues deliver to this instance (see count_active)."""
        response = http.get(self.consumers_url,
                            params={"columns": "consumer_tag,arguments,active"},
                            timeout=self.timeout)
        response.raise_for_status()
        return count_active(response.json(), self.tag_prefix, by_priority=self.settings.cluster)

    def _list(self, http: requests.Session) -> None:
        with self._lock:
            self._since_listing = {}
        listed = self.list_once(http)
        with self._lock:
            # What the events said while the listing was on its way is newer than the listing.
            created = {queue for queue, made in self._since_listing.items() if made}
            deleted = {queue for queue, made in self._since_listing.items() if not made}
            self.queues = (listed | created) - deleted

    def _run(self) -> None:
        next_listing = next_count = 0.0
        with endpoints.management_api(self.settings, self.settings.bridge_user,
                                     self.settings.bridge_password) as http:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    if self.list_queues and (now >= next_listing or self._list_now):
                        self._list_now = False
                        self._list(http)
                        next_listing = now + (self.interval if self.events_working
                                              else self.fallback_interval)
                    if self.stats is not None and now >= next_count:
                        self.stats.active_queues = self.count_active(http)
                        next_count = now + self.count_interval
                    if self._failing:
                        LOGGER.info("queue listing works again (%s)", self.url)
                        self._failing = False
                except (requests.RequestException, ValueError) as error:
                    if not self._failing:
                        LOGGER.warning("cannot list queues at %s (%s); consuming the ones known, "
                                       "retrying every %.0f s", self.url, error,
                                       self.fallback_interval)
                        self._failing = True
                    next_listing = next_count = now + self.fallback_interval
                self._wake.wait(max(0.05, min(next_listing if self.list_queues else next_count,
                                              next_count) - time.monotonic()))
                self._wake.clear()

    def start(self) -> "QueueDiscovery":
        """List in the background until stop()."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listing (returns at once; the thread is a daemon)."""
        self._stop.set()
        self._wake.set()
