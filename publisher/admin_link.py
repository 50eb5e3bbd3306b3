"""The publisher's one AMQP connection as webos-admin, owned by one thread.

Declaring a new device's queue (through `rabbitmq.topology`) and the emergency broadcast (on
`webos.fanout`, and to the devices on webos/broadcast/command) go through here, and so does enrolling a device (its certificate and broker user,
through the management API) or removing it. pika connections must not be shared across threads, so request
threads hand work over through a queue and wait on a Future.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import uuid
from concurrent.futures import Future

import pika
import pika.exceptions
import requests

from publisher.device_model import now_ms
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from common.command_records import Command
from common.config import Settings

LOGGER = logging.getLogger(__name__)


class BrokerUnavailable(RuntimeError):
    """RabbitMQ could not be reached or refused the operation."""


class AdminLink:
    """A thread that owns a pika BlockingConnection (connected on first use, reconnected on error)."""

    def __init__(self, settings: Settings, timeout: float = 10.0):
        self.settings = settings
        self.timeout = timeout
        self._work: queue.Queue = queue.Queue()
        self._connection: pika.BlockingConnection | None = None
        self._channel = None
        self._thread = threading.Thread(target=self._run, name="amqp-admin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread and close the connection."""
        self._work.put(None)
        self._thread.join(self.timeout)

    def call(self, function, *args):
        """Run `function(channel, *args)` on the link's thread; its result, or BrokerUnavailable."""
        future: Future = Future()
        self._work.put((function, args, future))
        return future.result(self.timeout + 5)

    # -- the operations -------------------------------------------------------------------

    def declare_devices(self, devices) -> None:
        """Queues and bindings for `devices` (idempotent), through the one topology module."""
        def declare(channel, devices):
            for device in devices:
                topology.declare_device(channel, device, self.settings.cluster)
        self.call(declare, list(devices))

    def enrol(self, devices) -> None:
        """Certificates and broker users for `devices` (idempotent; rabbitmq.topology)."""
        try:
            topology.enrol_devices(self.settings, list(devices), timeout=self.timeout + 50)
        except requests.RequestException as error:
            raise BrokerUnavailable(f"cannot enrol devices through the management API: {error}")

    def remove_enrolment(self, device: str) -> None:
        """Revoke a removed device: its broker user (and connections) and certificate go."""
        try:
            topology.remove_enrolment(self.settings, device, timeout=self.timeout)
        except requests.RequestException as error:
            raise BrokerUnavailable(f"cannot remove {device}'s broker user: {error}")

    def delete_device_queue(self, device: str) -> None:
        """Remove a device's queue and whatever is left in it."""
        self.call(topology.delete_device, device)

    def broadcast(self, text: str, message_type: str = "error") -> dict:
        """One emergency message: on `webos.fanout` into every device queue (so into Kafka), and
        as the command `emergency` on webos/broadcast/command to every device with a session
        (its replies become feedback, command id = the message's msg_id). The payload, with
        `devices_reached` False when no device session was subscribed."""
        payload = {"Producer": "publisher", "command": "emergency", "type": message_type,
                   "message": text, "msg_id": uuid.uuid4().hex, "ts": now_ms()}
        command = Command(naming.BROADCAST, payload["msg_id"], "emergency",
                          {"text": text, "type": message_type}, self.settings.command_ttl_seconds)

        def publish(channel, payload):
            channel.basic_publish(
                naming.FANOUT_EXCHANGE, "", json.dumps(payload).encode("utf-8"),
                pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                     message_id=payload["msg_id"]),
                mandatory=True)
            try:
                channel.basic_publish(
                    naming.TOPIC_EXCHANGE, command.routing_key, command.body(payload["ts"]),
                    pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                         correlation_id=command.command_id,
                                         expiration=str(int(command.ttl_s * 1000))),
                    mandatory=True)
            except pika.exceptions.UnroutableError:
                return False
            return True
        payload["devices_reached"] = self.call(publish, payload)
        LOGGER.info("broadcast %s sent on %s and to %s", payload["msg_id"], naming.FANOUT_EXCHANGE,
                    "the devices' sessions" if payload["devices_reached"] else "no device session")
        return payload

    # -- the thread -------------------------------------------------------------------------

    def _ensure_channel(self):
        if self._channel is None or self._channel.is_closed:
            if self._connection is None or self._connection.is_closed:
                self._connection = endpoints.open_connection(endpoints.admin_parameters(
                    self.settings, heartbeat=endpoints.HEARTBEAT_SECONDS, blocked_connection_timeout=10,
                    connection_attempts=2, retry_delay=0.5))
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()  # basic_publish returns after the broker confirmed
        return self._channel

    def _drop_connection(self) -> None:
        try:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()
        except pika.exceptions.AMQPError as error:
            LOGGER.debug("closing the admin connection: %s", error)
        self._connection = self._channel = None

    def _run(self) -> None:
        while True:
            try:
                work = self._work.get(timeout=1.0)
            except queue.Empty:
                if self._connection is not None and self._connection.is_open:
                    try:
                        self._connection.process_data_events(0)  # heartbeats
                    except pika.exceptions.AMQPError as error:
                        LOGGER.warning("admin connection lost: %s", error)
                        self._drop_connection()
                continue
            if work is None:
                self._drop_connection()
                return
            function, args, future = work
            for attempt in (1, 2):  # a stale connection gets one fresh retry
                try:
                    future.set_result(function(self._ensure_channel(), *args))
                    break
                except pika.exceptions.UnroutableError as error:
                    future.set_exception(BrokerUnavailable(f"no queue is bound: {error}"))
                    break
                except (pika.exceptions.AMQPError, OSError) as error:
                    self._drop_connection()
                    if attempt == 2:
                        LOGGER.error("RabbitMQ admin operation failed: %r", error)
                        future.set_exception(BrokerUnavailable(f"RabbitMQ: {error!r}"))
                except Exception as error:
                    future.set_exception(error)
                    break
