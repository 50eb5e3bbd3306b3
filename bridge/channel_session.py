"""One RabbitMQ connection of the forwarder and what lives and dies with it: its channels, the
consumers of the device queues, this turn's deliveries, its Settlement and its presence
forwarding. A reconnect builds a new one: delivery tags belong to a channel."""
from __future__ import annotations

import logging
import os
import time
from functools import partial

from pika import exceptions as amqp_errors

from bridge.backoff import QueueBackoff
from bridge.discovery import QueueDiscovery, bridge_consumer_tag
from bridge.metrics import BridgeStats
from bridge.options import BridgeOptions, share_priority
from bridge.presence import PresenceForwarder
from bridge.reconnect import ConfigurationError
from bridge.settlement import Settlement
from common.config import Settings
from rabbitmq import endpoints, naming

LOGGER = logging.getLogger(__name__)
# Fewest deliveries in flight per queue however many queues share --prefetch (the window is per
# consumer: RabbitMQ 4 quorum queues have no channel-wide one).
MIN_QUEUE_PREFETCH = 20
SYNC_INTERVAL = 1.0  # s between looks at discovery's queue list (a queue event: at once)


class ChannelSession:
    """A connection's channels and consumers; see the module docstring."""

    def __init__(self, settings: Settings, options: BridgeOptions, producer, stats: BridgeStats,
                 discovery: QueueDiscovery, missing_warned: set[str], presence: bool,
                 backoff: QueueBackoff, last_node: str = ""):
        self.settings = settings
        self.options = options
        self.stats = stats
        self.discovery = discovery
        self.missing_warned = missing_warned  # the forwarder's: a warning per missing queue
        self.connection, node = endpoints.connect(endpoints.amqp_parameters(
            settings, settings.bridge_user, settings.bridge_password,
            heartbeat=endpoints.HEARTBEAT_SECONDS, blocked_connection_timeout=60,
            connection_attempts=1,
            # Which bridge process a connection is, in the management UI and API.
            client_properties={"connection_name": f"webos-bridge pid {os.getpid()}"}),
            last=last_node)
        self.node = f"{node.host}:{node.port}"
        dead_channel = self.connection.channel()
        dead_channel.confirm_delivery()
        self.probe_channel = self.connection.channel()
        self._check_dead_queue()
        self.channel = self.connection.channel()
        self.channel.add_on_cancel_callback(self.on_consumer_cancelled)
        self.settlement = Settlement(self.channel, dead_channel, producer, stats,
                                     options.prefetch, options.flush_timeout, backoff)
        self.consumers: dict[str, str] = {}       # queue -> consumer tag
        self.deliveries: list[tuple] = []         # (queue, method, properties, body) this turn
        self.queue_prefetch = 0                   # the basic.qos set for the next consumers
        self.worked = False                       # a basic_consume went through
        self.sync_requested = False               # a queue event changed the queues
        self.next_sync = 0.0                      # when to look at the wanted queues again
        self.backoff = backoff
        self.presence = (PresenceForwarder.start(self.connection, producer,
                                                 settings.presence_topic, options.instance, stats,
                                                 options.retry_max_seconds)
                         if presence else None)
        self.events_channel = None if options.queues else self._watch_queue_events()

    def on_message(self, queue: str, channel, method, properties, body: bytes) -> None:
        """One delivery: noted for the forwarder, which produces this turn's deliveries at once."""
        self.deliveries.append((queue, method, properties, body))

    def wait_for_listing(self, timeout: float = 10.0) -> None:
        """Until discovery's first listing arrived (never start blind on a reconnect)."""
        deadline = time.monotonic() + timeout
        while self.discovery.queues is None and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.1)

    # ---- which queues ---------------------------------------------------------------------

    def after_turn(self, now: float) -> None:
        """Between two turns of the loop: what backs off, and which queues to consume."""
        if self.backoff.waiting or self.backoff.probing or self.stats.retrying:
            self.settlement.release_due(now)
        if self.presence is not None and self.presence.backing_off:
            self.presence.release_due(now)
        self.sync_when_due(now)

    def sync_when_due(self, now: float) -> None:
        """Consume the queues wanted now: every SYNC_INTERVAL s, at once after a queue event."""
        if now >= self.next_sync or self.sync_requested:
            self.next_sync, self.sync_requested = now + SYNC_INTERVAL, False
            self.sync_queues(self.options.queues or self.discovery.queues or ())

    def sync_queues(self, wanted, strict: bool = False) -> None:
        """Consume every queue in `wanted` not yet consumed (queues only come, cancels remove)."""
        wanted = set(wanted)
        new = sorted(wanted - self.consumers.keys())
        if not new:
            return
        # The window is per consumer: --prefetch shared out over the queues, so that what is in
        # flight stays about --prefetch however many queues there are (MIN_QUEUE_PREFETCH each at
        # least). It applies to consumers made from now on.
        queue_prefetch = max(MIN_QUEUE_PREFETCH, self.options.prefetch // len(wanted))
        if queue_prefetch != self.queue_prefetch:
            self.channel.basic_qos(prefetch_count=queue_prefetch)
            self.queue_prefetch = queue_prefetch
        for queue in new:
            if not self._queue_exists(queue, strict):
                continue
            self.consumers[queue] = self.channel.basic_consume(
                queue, partial(self.on_message, queue), auto_ack=False,
                consumer_tag=bridge_consumer_tag(self.options.instance, queue),
                arguments={"x-priority": share_priority(self.options.instance, queue)})
            self.worked = True
            self.missing_warned.discard(queue)
            LOGGER.info("consuming %s", queue)
        self.stats.queues = len(self.consumers)

    def _queue_exists(self, queue: str, strict: bool) -> bool:
        # A passive declare of a missing queue closes its channel: use the throwaway probe channel.
        if not self.probe_channel.is_open:
            self.probe_channel = self.connection.channel()
        try:
            self.probe_channel.queue_declare(queue, passive=True)
            return True
        except amqp_errors.ChannelClosedByBroker as error:
            if strict:
                raise ConfigurationError(
                    f"cannot consume queue {queue!r}: {error.reply_code} {error.reply_text}. "
                    f"Declare it (python -m rabbitmq.topology "
                    f"{naming.device_of_queue(queue) or '<device>'}) or fix --queues") from None
            if queue not in self.missing_warned:
                LOGGER.warning("queue %s is not there (%s); will look again", queue, error.reply_text)
                self.missing_warned.add(queue)
            return False

    def on_consumer_cancelled(self, method_frame) -> None:
        """The broker cancelled a consumer (its queue was deleted): forget it; discovery re-adds."""
        tag = method_frame.method.consumer_tag
        for queue, consumer_tag in list(self.consumers.items()):
            if consumer_tag == tag:
                del self.consumers[queue]
                self.missing_warned.add(queue)  # discovery may list it a while yet: no warning
                LOGGER.info("broker cancelled the consumer of %s (queue deleted?)", queue)
        self.stats.queues = len(self.consumers)

    def _watch_queue_events(self):
        """Receive queue.created and queue.deleted from RabbitMQ's event exchange, into an
        exclusive queue of this connection; without them (plugin off, no permission) the
        discovery lists queues more often instead. The channel, or None."""
        channel = self.connection.channel()
        try:
            events = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            for key in naming.QUEUE_EVENTS:
                channel.queue_bind(events, naming.EVENT_EXCHANGE, routing_key=key)
            channel.basic_consume(events, self.on_queue_event, auto_ack=True)
        except amqp_errors.ChannelClosedByBroker as error:
            LOGGER.warning("no queue events from %s (%s): finding new queues by listing them "
                           "every %.0f s", naming.EVENT_EXCHANGE, error.reply_text,
                           self.discovery.fallback_interval)
            self.discovery.events_stopped()
            return None
        self.discovery.events_started()
        return channel

    def on_queue_event(self, channel, method, properties, body) -> None:
        """One queue event: a device queue made or deleted; consume a new one at once."""
        headers = properties.headers or {}
        name = naming.header_text(headers.get("name"))
        if not name or naming.header_text(headers.get("vhost")) != self.settings.vhost:
            return
        if self.discovery.on_event(name, method.routing_key == "queue.created"):
            self.sync_requested = True

    def _check_dead_queue(self) -> None:
        try:
            self.probe_channel.queue_declare(naming.DEAD_QUEUE, passive=True)
        except amqp_errors.ChannelClosedByBroker as error:
            raise ConfigurationError(
                f"queue {naming.DEAD_QUEUE} is missing ({error.reply_text}): apply the "
                "topology first (python -m rabbitmq.topology)") from None

    def close(self) -> None:
        """Forget the channels (their delivery tags die with them) and close the connection."""
        self.settlement.open = False
        # Held deliveries die with the channel: RabbitMQ delivers them again, to be held again.
        self.stats.held -= sum(len(held) for held in self.settlement.held.values())
        if self.presence is not None:
            self.presence.open = False
        if self.events_channel is not None:
            self.discovery.events_stopped()
        self.stats.connected = False
        self.stats.queues = 0
        if self.connection.is_open:
            try:
                self.connection.close()
            except amqp_errors.AMQPError as error:
                LOGGER.debug("closing the connection: %r", error)
