"""Opening device connections off the scheduler thread: TCP connect, TLS handshake and MQTT
CONNECT run on a few worker threads, and each outcome is handed back to the scheduler thread.

Why: paho's connect() does all three blocking. On the one scheduler thread a ramp of 5,000 TLS
devices took 26-45 s during which no device published and no CONNACK was read; with the broker
slower to answer (a busy machine), connections made early waited out their 30 s CONNACK deadline
and started over, 1,832 of them in one run of `make bench`'s publisher scale. OpenSSL releases
the GIL while it waits for and computes a handshake, so workers overlap handshakes with each
other and with the scheduler's publishing.

While a device's connection opens, its worker alone touches the device's paho client; the
scheduler thread leaves it alone until the outcome arrives (DeviceLink.connecting).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

# Handshakes in flight at once. Each one mostly waits for the broker (its turn to answer, and
# its half of the key exchange); 16 keep a busy broker supplied without queueing thousands of
# half-open connections on it.
WORKERS = 16


class Connector:
    """Worker threads that open paho clients' connections; `hand_back(function, *args)` runs a
    function on the scheduler thread (the simulator's Inbox.submit)."""

    def __init__(self, hand_back, workers: int = WORKERS):
        self._hand_back = hand_back
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="device-connect")

    def open(self, client, host: str, port: int, connect_options: dict, opened) -> None:
        """Connect `client` to host:port (a reconnect when that is where it was last); then
        `opened(error)` on the scheduler thread, error None or what the attempt raised."""
        self._pool.submit(self._open, client, host, port, connect_options, opened)

    def _open(self, client, host, port, connect_options, opened) -> None:
        try:
            if client.host == host and client.port == port:
                client.reconnect()
            else:
                client.connect(host, port, **connect_options)
        except Exception as error:  # handed to the scheduler thread, which decides
            self._hand_back(opened, error)
        else:
            self._hand_back(opened, None)

    def close(self) -> None:
        """Start no more connections and wait for those under way (a handshake gives up after
        paho's connect timeout, 5 s)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
