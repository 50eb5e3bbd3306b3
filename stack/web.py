"""Serving an app's pages the way `python -m publisher` and `python -m consumer serve` both do."""
from __future__ import annotations

import signal
import threading

from werkzeug.serving import BaseWSGIServer, make_server


def listen(app, host: str, port: int) -> BaseWSGIServer:
    """A threaded server for `app` on host:port. Raises OSError (port taken, address invalid)."""
    return make_server(host, port, app, threaded=True)


def serve_until_signal(server: BaseWSGIServer) -> None:
    """Serve on a thread of its own until SIGINT or SIGTERM, then stop serving; the caller
    closes what the app holds, then `server.server_close()`."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    while not stop.wait(0.5):  # short waits: the signal handler runs between them
        pass
    server.shutdown()
