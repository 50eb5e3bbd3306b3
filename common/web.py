"""Serving an app's pages the way `python -m publisher` and `python -m consumer serve` both do."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from werkzeug.serving import make_server

LOGGER = logging.getLogger(__name__)


class _Families:
    """A prometheus_client collector of metric families built for one scrape."""

    def __init__(self, families):
        self.families = list(families)

    def collect(self):
        return self.families


def prometheus_text(families) -> tuple[bytes, int, dict]:
    """A Flask answer with `families` (prometheus_client metric families) as Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}


def add_listen_arguments(parser, host: str, port: int, port_variable: str) -> None:
    """--host and --port of a page's command line, their defaults from the settings."""
    parser.add_argument("--host", default=host,
                        help="address to listen on (default %(default)s, WEBOS_BIND_HOST)")
    parser.add_argument("--port", type=int, default=port,
                        help=f"HTTP port (default %(default)s, {port_variable})")


def serve(app, host: str, port: int, close: Callable[[], None], name: str, detail: str = "") -> int:
    """Serve `app` on host:port (threaded) until SIGINT or SIGTERM, then `close()` what the app
    holds. 0 after that stop; 1 when host:port cannot be had (port taken, address invalid)."""
    try:
        server = make_server(host, port, app, threaded=True)
    except OSError as error:
        close()
        LOGGER.error("%s cannot listen on %s:%s: %s", name, host, port, error)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    LOGGER.info("%s on http://%s:%s/%s", name, host, server.port, detail)
    while not stop.wait(0.5):  # short waits: the signal handler runs between them
        pass
    LOGGER.info("%s stopping", name)
    server.shutdown()
    close()
    server.server_close()
    return 0
