"""`python -m consumer`."""
import logging
import signal
import threading

LOGGER = logging.getLogger("consumer")


def main(argv=None) -> int:
    """Placeholder until the consumer issue lands: wait for SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    LOGGER.info("consumer placeholder running")
    stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
