"""The run loop both directions of the bridge share: a new session per RabbitMQ connection,
reconnects with capped back-off (reset only after a session worked), and the errors that no
reconnect cures turned into a ConfigurationError that says what to fix.

In the manner of pika's `asynchronous_consumer_example.py` / ReconnectingExampleConsumer: each
connection gets a fresh session object, so nothing is reset by hand.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from pika import exceptions as amqp_errors

from common.config import ConfigError, Settings

LOGGER = logging.getLogger(__name__)
AUTH_ERRORS = (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError,
               amqp_errors.ProbableAccessDeniedError)


class ConfigurationError(ConfigError):
    """Something only a person can fix (credentials, a missing queue or topic): stop, say what."""


class Session(Protocol):
    """One connection's state: `worked` once it did its job at least once (then the back-off
    starts again from 1 s), `close()` always."""

    worked: bool

    def close(self) -> None: ...


def run_sessions(open_session: Callable[[bool], Session], work: Callable[[Session], None],
                 settings: Settings, stop: threading.Event, retriable: tuple = ()) -> None:
    """Open a session (`open_session(first)`) and `work` it until `stop`; after a lost
    connection (or one of `retriable`) open a new one, after a wait that doubles up to
    WEBOS_RECONNECT_MAX_SECONDS. Raises ConfigurationError for what a reconnect cannot cure."""
    backoff, first = 1.0, True
    while not stop.is_set():
        session = None
        try:
            session = open_session(first)
            first = False
            work(session)
            what, lost = None, None
        except AUTH_ERRORS as error:
            raise ConfigurationError(
                f"RabbitMQ refused {settings.bridge_user!r} at {settings.rabbitmq_host}:"
                f"{settings.amqp_port} ({error!r}): check WEBOS_BRIDGE_PASSWORD (in the "
                "environment or .env) and that the user exists (python -m rabbitmq.topology "
                "creates it)") from None
        except amqp_errors.ChannelClosedByBroker as error:
            if error.reply_code == 403:
                raise ConfigurationError(
                    f"RabbitMQ refused {settings.bridge_user!r} something it needs: "
                    f"{error.reply_text}. Check its permissions (python -m rabbitmq.topology "
                    "sets them)") from None
            what, lost = "RabbitMQ closed the channel", error
        except (amqp_errors.AMQPError, OSError, *retriable) as error:
            what, lost = "connection lost", error
        finally:
            if session is not None:
                if session.worked:
                    backoff = 1.0  # only once it worked (pika's ReconnectingExampleConsumer)
                session.close()
        if stop.is_set() or what is None:
            return
        LOGGER.warning("%s (%r); reconnecting in %.0f s", what, lost, backoff)
        stop.wait(backoff)
        backoff = min(backoff * 2, settings.reconnect_max_seconds)
