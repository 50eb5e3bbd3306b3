"""The whole RabbitMQ topology and its users, declared in this one place.

Every component imports its names from here. Applying it twice changes nothing.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import logging
import re
import secrets
from urllib.parse import quote

import pika
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from common.config import ConfigError, Settings, load_settings, run
from common.pki import PKI, client_context

LOGGER = logging.getLogger(__name__)

TOPIC_EXCHANGE = "webos.topic"
FANOUT_EXCHANGE = "webos.fanout"
UNROUTED_EXCHANGE = "webos.unrouted"
UNROUTED_QUEUE = "webos.unrouted"
DEAD_QUEUE = "webos.dead"
# Devices' MQTT connects and disconnects, from RabbitMQ's event exchange, for the bridge to
# forward to Kafka's webos.presence. Bounded: without a bridge, the oldest events go first.
PRESENCE_QUEUE = "webos.presence"
CONNECTION_EVENTS = ("connection.created", "connection.closed")
PRESENCE_MAX_LENGTH = 100_000
MESSAGE_TYPES = ("info", "warning", "error")
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A device logs in as the user its certificate names: no device may take a service user's name,
# nor a name whose queue would be one of the shared queues.
RESERVED_ID_PREFIX = "webos-"
DEVICE_QUEUE_PREFIX = "webos."
RESERVED_IDS = frozenset(name[len(DEVICE_QUEUE_PREFIX):]
                         for name in (UNROUTED_QUEUE, DEAD_QUEUE, PRESENCE_QUEUE))
# Where rabbitmq_event_exchange publishes what happens in the broker (headers name, vhost, ...),
# and the events the bridge finds new device queues by.
EVENT_EXCHANGE = "amq.rabbitmq.event"
QUEUE_EVENTS = ("queue.created", "queue.deleted")
# How often a quorum queue delivers a message before it dead-letters it to webos.dead (a
# message that makes its consumer crash each time, say). A classic queue has no such limit.
DELIVERY_LIMIT = 20
# What a message parked in webos.dead carries: why (and in detail), and where it came from.
DEAD_REASON_HEADER = "x-webos-dead-reason"
DEAD_DETAIL_HEADER = "x-webos-dead-detail"
DEAD_QUEUE_HEADER = "x-webos-queue"
DEAD_ROUTING_KEY_HEADER = "x-webos-routing-key"
DEAD_EXCHANGE_HEADER = "x-webos-exchange"
# What `python -m bridge dead redrive` adds when it puts a parked message back on its route: how
# often it was redriven, and each earlier parking (JSON list of {reason, detail, parked_at}).
REDRIVES_HEADER = "x-webos-redrives"
DEAD_HISTORY_HEADER = "x-webos-dead-history"

# Reasons a message is parked in webos.dead (the value of the x-webos-dead-reason header).
NOT_JSON = "not-json"
NOT_OBJECT = "not-a-json-object"
TOO_LARGE = "too-large"
KAFKA_REJECTED = "kafka-rejected"
DEAD_REASONS = (NOT_JSON, NOT_OBJECT, TOO_LARGE, KAFKA_REJECTED)


def header_text(value) -> str:
    """An AMQP header value as text: RabbitMQ sends strings as bytes (undecodable bytes replaced),
    a missing header is ''."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def is_valid_device_id(device: str) -> bool:
    """True when `device` may name a device: 1-64 of A-Z a-z 0-9 _ - (no `.`, `/`, `+`, `#`),
    not starting with `webos-` (the service users' names)."""
    return (isinstance(device, str) and DEVICE_ID_PATTERN.fullmatch(device) is not None
            and not device.startswith(RESERVED_ID_PREFIX) and device not in RESERVED_IDS)


def _checked(device: str) -> str:
    if not is_valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -, "
                         f"not starting with {RESERVED_ID_PREFIX} and not "
                         f"{', '.join(sorted(RESERVED_IDS))}")
    return device


def device_queue(device: str) -> str:
    """The queue that holds one device's messages."""
    return DEVICE_QUEUE_PREFIX + _checked(device)


def routing_key(device: str, message_type: str) -> str:
    """The routing key a device message carries on `webos.topic`."""
    return f"webos.{_checked(device)}.{message_type}"


def mqtt_topic(device: str, message_type: str) -> str:
    """The MQTT topic a device publishes to; the MQTT plugin maps `/` to `.`."""
    return f"webos/{_checked(device)}/{message_type}"


def device_of_queue(queue: str) -> str | None:
    """The device id a queue belongs to, or None for a queue that is not a device queue."""
    if not queue.startswith(DEVICE_QUEUE_PREFIX):
        return None
    device = queue[len(DEVICE_QUEUE_PREFIX):]
    if not is_valid_device_id(device):
        return None
    return device


def parse_routing_key(key: str) -> tuple[str, str] | None:
    """(device, type) from `webos.<device>.<type>`, or None when the key has another shape."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "webos" and is_valid_device_id(parts[1]):
        return parts[1], parts[2]
    return None


def queue_arguments(quorum: bool, device: bool = True) -> dict:
    """What a queue is, fixed at its first declaration (RabbitMQ refuses to redeclare a queue
    with other arguments).

    Single node: classic queues. Cluster (`quorum`): quorum queues, replicated over the nodes, a
    publish confirmed once a majority has it, leaders spread over the nodes. A device queue has
    one consumer at a time (the bridge's per-device order), and on a cluster dead-letters a
    message delivered DELIVERY_LIMIT times into webos.dead, at least once (the broker keeps it
    until webos.dead confirms it). webos.dead and webos.unrouted keep every message, and have no
    single active consumer: on a quorum queue that would refuse basic.get, which the management
    UI's "Get messages" is.
    """
    if not quorum:
        return {"x-queue-type": "classic", **({"x-single-active-consumer": True} if device else {})}
    # balanced: leaders spread over the nodes (the default puts each on the declaring node).
    arguments = {"x-queue-type": "quorum", "x-queue-leader-locator": "balanced"}
    if device:
        return {**arguments, "x-single-active-consumer": True, "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": DEAD_QUEUE,
                "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return {**arguments, "x-delivery-limit": -1}


def declare_base(channel, quorum: bool = False) -> None:
    """Exchanges and shared queues every deployment has (`quorum`: on a cluster)."""
    channel.exchange_declare(UNROUTED_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(UNROUTED_QUEUE, durable=True, arguments=queue_arguments(quorum, False))
    channel.queue_bind(UNROUTED_QUEUE, UNROUTED_EXCHANGE)
    channel.exchange_declare(TOPIC_EXCHANGE, "topic", durable=True,
                             arguments={"alternate-exchange": UNROUTED_EXCHANGE})
    channel.exchange_declare(FANOUT_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(DEAD_QUEUE, durable=True, arguments=queue_arguments(quorum, False))
    # One bridge at a time forwards presence (so a device's events stay in order).
    channel.queue_declare(PRESENCE_QUEUE, durable=True, arguments={
        **queue_arguments(quorum, False), "x-single-active-consumer": True,
        "x-max-length": PRESENCE_MAX_LENGTH, "x-overflow": "drop-head"})
    for event in CONNECTION_EVENTS:
        channel.queue_bind(PRESENCE_QUEUE, EVENT_EXCHANGE, routing_key=event)


def declare_device(channel, device: str, quorum: bool = False) -> str:
    """One device's durable queue, bound `webos.<device>.*` on the topic exchange and to the
    fanout (`quorum`: on a cluster)."""
    queue = device_queue(device)
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(quorum))
    channel.queue_bind(queue, TOPIC_EXCHANGE, routing_key=f"webos.{device}.*")
    channel.queue_bind(queue, FANOUT_EXCHANGE, routing_key="")
    return queue


def delete_device(channel, device: str) -> None:
    """Remove a device's queue (and with it its bindings and any messages left in it)."""
    channel.queue_delete(device_queue(device))


def declare(channel, devices, quorum: bool = False) -> None:
    """The base topology plus a queue for every device (`quorum`: on a cluster)."""
    declare_base(channel, quorum)
    for device in devices:
        declare_device(channel, device, quorum)


def declare_devices(settings: Settings, devices) -> None:
    """Queues and bindings for `devices` on the RabbitMQ `settings` names (quorum queues on a
    cluster), over one connection as webos-admin."""
    with pika.BlockingConnection(admin_parameters(settings)) as connection:
        channel = connection.channel()
        for device in devices:
            declare_device(channel, device, settings.cluster)


def amqp_parameters(settings: Settings, user: str, password: str,
                    **extra) -> list[pika.ConnectionParameters]:
    """pika connection parameters for one of the project's users, one per RabbitMQ node (pika
    tries them in order): AMQPS, the broker's certificate checked against the stack's authority."""
    tls = pika.SSLOptions(client_context(settings.ca_file), server_hostname=settings.rabbitmq_host)
    return [pika.ConnectionParameters(
                host=node.rabbitmq_host, port=node.amqp_port, virtual_host=settings.vhost,
                credentials=pika.PlainCredentials(user, password), ssl_options=tls, **extra)
            for node in settings.rabbitmq_addresses()]


class _ClusterSession(requests.Session):
    """A requests session that sends a call meant for the first node's management API to the
    other nodes when that one does not answer (any node's API serves the whole cluster), and then
    to the node that answered first."""

    def __init__(self, bases: list[str]):
        super().__init__()
        self.primary = bases[0]
        self.bases = list(bases)
        # The API closes a kept-alive connection now and then (every minute or two in a run
        # here): a call that finds it closed is sent again, once, on a new connection, if it is
        # idempotent (GET, PUT, DELETE, not POST). A node that does not answer fails at once.
        adapter = HTTPAdapter(max_retries=Retry(total=1, connect=0, redirect=0, status=0))
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(self, method, url, *args, **kwargs):
        if len(self.bases) == 1 or not url.startswith(self.primary):
            return super().request(method, url, *args, **kwargs)
        path = url[len(self.primary):]
        for base in list(self.bases):
            try:
                response = super().request(method, base + path, *args, **kwargs)
            except requests.ConnectionError as error:
                failure = error
                continue
            self.bases.remove(base)
            self.bases.insert(0, base)
            return response
        raise failure


def management_api(settings: Settings, user: str | None = None,
                   password: str | None = None) -> requests.Session:
    """An HTTPS session with the management API (default: as webos-admin), the broker's
    certificate checked against the stack's authority; on a cluster a call moves to the next
    node when one does not answer."""
    http = _ClusterSession([node.management_url for node in settings.rabbitmq_addresses()])
    http.auth = (user or settings.admin_user,
                 settings.admin_password if password is None else password)
    http.verify = str(settings.ca_file)
    # Else REQUESTS_CA_BUNDLE in the environment would win over `verify` (a known requests
    # behaviour), and a proxy variable could route this loopback call elsewhere.
    http.trust_env = False
    return http


def admin_parameters(settings: Settings, **extra) -> list[pika.ConnectionParameters]:
    """pika connection parameters for `webos-admin`, one per node."""
    return amqp_parameters(settings, settings.admin_user, settings.admin_password, **extra)


def user_definitions(settings: Settings) -> list[dict]:
    """The least-privilege users besides the administrator (who is created at broker start)."""
    return [
        {
            # Reads device queues; writes parked messages to webos.dead through the default
            # exchange; learns of new device queues from the event exchange, into a server-named
            # exclusive queue (amq.gen-*) of its own; "management" lets it list queues and
            # consumers.
            "name": settings.bridge_user, "password": settings.bridge_password, "tags": "management",
            "permissions": {"configure": r"^amq\.gen-.*$",
                            "write": r"^(amq\.default|amq\.gen-.*)$",
                            "read": r"^(webos\..+|amq\.gen-.*|amq\.rabbitmq\.event)$"},
            "topic_permissions": None,
        },
    ]


def apply_users(settings: Settings, timeout: float = 10.0) -> None:
    """Create or update the project's users through the management HTTP API; remove `guest`."""
    api = f"{settings.management_url}/api"
    vhost = quote(settings.vhost, safe="")
    with management_api(settings) as http:
        for user in user_definitions(settings):
            if not user["password"]:
                raise ConfigError(f"no password for {user['name']}: set it in the environment or .env")
            name = quote(user["name"], safe="")
            http.put(f"{api}/users/{name}", json={"password": user["password"], "tags": user["tags"]},
                     timeout=timeout).raise_for_status()
            http.put(f"{api}/permissions/{vhost}/{name}", json=user["permissions"],
                     timeout=timeout).raise_for_status()
            if user["topic_permissions"]:
                http.put(f"{api}/topic-permissions/{vhost}/{name}", json=user["topic_permissions"],
                         timeout=timeout).raise_for_status()
        response = http.delete(f"{api}/users/guest", timeout=timeout)
        if response.status_code not in (204, 404):
            response.raise_for_status()


# A device's rights: publish on webos.topic (write on the exchange), only to its own topics.
# {username} is the certificate's CN, which the broker checked: a device cannot choose it.
DEVICE_PERMISSIONS = {"configure": "^$", "write": f"^{re.escape(TOPIC_EXCHANGE)}$", "read": "^$"}
DEVICE_TOPIC_WRITE = r"^webos\.{username}\.(" + "|".join(MESSAGE_TYPES) + r")$"


def enrol_devices(settings: Settings, devices, timeout: float = 60.0) -> None:
    """Give each device what it needs to connect: its certificate (issued when missing) and its
    broker user with its permissions, in one definitions import however many devices. The user
    has no password (it logs in with its certificate) unless the plain listeners are on."""
    devices = [_checked(device) for device in devices]
    if not devices:
        return
    pki = PKI(settings.pki_path)
    for device in devices:
        pki.ensure_device(device)
    vhost = settings.vhost
    definitions = {
        "users": [{"name": device, "tags": [], "hashing_algorithm": PASSWORD_HASHING,
                   "password_hash": (password_hash(pki.device_password(device))
                                     if settings.plain_listeners else "")}
                  for device in devices],
        "permissions": [{"user": device, "vhost": vhost, **DEVICE_PERMISSIONS}
                        for device in devices],
        "topic_permissions": [{"user": device, "vhost": vhost, "exchange": TOPIC_EXCHANGE,
                               "write": DEVICE_TOPIC_WRITE, "read": "^$"} for device in devices],
    }
    with management_api(settings) as http:
        http.post(f"{settings.management_url}/api/definitions", json=definitions,
                  timeout=timeout).raise_for_status()


def remove_enrolment(settings: Settings, device: str, timeout: float = 10.0) -> None:
    """Revoke a device: delete its broker user (RabbitMQ closes its connections and refuses its
    certificate from then on) and its certificate files."""
    remove_enrolments(settings, [device], timeout)


def remove_enrolments(settings: Settings, devices, timeout: float = 10.0) -> None:
    """remove_enrolment for each of `devices`, over one management API session."""
    pki = PKI(settings.pki_path)
    with management_api(settings) as http:
        for device in devices:
            response = http.delete(
                f"{settings.management_url}/api/users/{quote(_checked(device), safe='')}",
                timeout=timeout)
            if response.status_code not in (204, 404):
                response.raise_for_status()
            pki.remove_device(device)


PASSWORD_HASHING = "rabbit_password_hashing_sha256"


def password_hash(password: str) -> str:
    """RabbitMQ's stored form of a password (rabbit_password_hashing_sha256): base64 of a
    4-byte salt and SHA-256(salt + password)."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def registered_devices(settings: Settings) -> list[str]:
    """The ids in the devices file (WEBOS_DEVICES_FILE); ConfigError if it cannot be read."""
    from publisher.device_config import load_devices  # publisher imports this module

    try:
        return [device.id for device in load_devices(settings.devices_path)]
    except ValueError as error:
        raise ConfigError(str(error)) from None


def apply(settings: Settings, devices=None) -> None:
    """Users, exchanges, queues and bindings for `devices` (default: the registered ones)."""
    apply_users(settings)
    devices = registered_devices(settings) if devices is None else devices
    enrol_devices(settings, devices)
    with pika.BlockingConnection(admin_parameters(settings)) as connection:
        declare(connection.channel(), devices, quorum=settings.cluster)
    LOGGER.info("topology applied: exchanges %s, %s; queues %s", TOPIC_EXCHANGE, FANOUT_EXCHANGE,
                ", ".join([device_queue(d) for d in devices]
                          + [UNROUTED_QUEUE, DEAD_QUEUE, PRESENCE_QUEUE]))


def main(argv=None) -> int:
    """Apply the topology to the RabbitMQ named by the environment and `.env`."""
    parser = argparse.ArgumentParser(
        prog="python -m rabbitmq.topology",
        description="Declare webos exchanges, queues, bindings and users (idempotent).")
    parser.add_argument("devices", nargs="*", help="device ids (default: those in WEBOS_DEVICES_FILE)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    settings = load_settings()
    apply(settings, args.devices or None)
    return 0


if __name__ == "__main__":
    run(main)
