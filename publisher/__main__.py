"""`python -m publisher`."""
import logging
import signal
import threading

LOGGER = logging.getLogger("publisher")


def main(argv=None) -> int:
    """Placeholder until the publisher issue lands: wait for SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    LOGGER.info("publisher placeholder running")
    stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
