"""Finding the device queues to consume, through RabbitMQ's management HTTP API."""
from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote

import requests

from rabbitmq import topology
from common.config import Settings

LOGGER = logging.getLogger(__name__)


def select_queues(names, pattern: re.Pattern | None) -> frozenset[str]:
    """The device queues among `names` (optionally only those matching `pattern`)."""
    return frozenset(name for name in names
                     if topology.device_of_queue(name) is not None
                     and (pattern is None or pattern.search(name)))


class QueueDiscovery:
    """Lists the vhost's queues every `interval` s in its own thread (HTTP must not stall the loop).

    The loop thread reads `queues`, a frozenset replaced whole on each successful listing.
    """

    def __init__(self, settings: Settings, pattern: re.Pattern | None, interval: float = 2.0,
                 timeout: float = 5.0):
        self.pattern = pattern
        self.interval = interval
        self.timeout = timeout
        self.url = f"{settings.management_url}/api/queues/{quote(settings.vhost, safe='')}"
        self.settings = settings
        self.queues: frozenset[str] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-discovery", daemon=True)
        self._failing = False

    def list_once(self, http: requests.Session) -> frozenset[str]:
        """One listing of the matching device queues."""
        response = http.get(self.url, params={"columns": "name"}, timeout=self.timeout)
        response.raise_for_status()
        return select_queues((queue["name"] for queue in response.json()), self.pattern)

    def _run(self) -> None:
        with topology.management_api(self.settings, self.settings.bridge_user,
                                     self.settings.bridge_password) as http:
            while not self._stop.is_set():
                try:
                    self.queues = self.list_once(http)
                    if self._failing:
                        LOGGER.info("queue listing works again (%s)", self.url)
                        self._failing = False
                except (requests.RequestException, ValueError) as error:
                    if not self._failing:
                        LOGGER.warning("cannot list queues at %s (%s); consuming the ones known, "
                                       "retrying every %.0f s", self.url, error, self.interval)
                        self._failing = True
                self._stop.wait(self.interval)

    def start(self) -> "QueueDiscovery":
        """List in the background until stop()."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listing (returns at once; the thread is a daemon)."""
        self._stop.set()
