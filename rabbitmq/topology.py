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

from common.config import ConfigError, Settings, load_settings, run
from common.pki import PKI, client_context

LOGGER = logging.getLogger(__name__)

TOPIC_EXCHANGE = "webos.topic"
FANOUT_EXCHANGE = "webos.fanout"
UNROUTED_EXCHANGE = "webos.unrouted"
UNROUTED_QUEUE = "webos.unrouted"
DEAD_QUEUE = "webos.dead"
MESSAGE_TYPES = ("info", "warning", "error")
DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A device logs in as the user its certificate names: no device may take a service user's name.
RESERVED_ID_PREFIX = "webos-"
DEVICE_QUEUE_PREFIX = "webos."
# Fixed from a queue's first declaration: RabbitMQ refuses to redeclare with other arguments.
DEVICE_QUEUE_ARGUMENTS = {"x-queue-type": "classic", "x-single-active-consumer": True}
QUEUE_ARGUMENTS = {"x-queue-type": "classic"}
# What a message parked in webos.dead carries: why (and in detail), and where it came from.
DEAD_REASON_HEADER = "x-webos-dead-reason"
DEAD_DETAIL_HEADER = "x-webos-dead-detail"
DEAD_QUEUE_HEADER = "x-webos-queue"
DEAD_ROUTING_KEY_HEADER = "x-webos-routing-key"
DEAD_EXCHANGE_HEADER = "x-webos-exchange"

# Reasons a message is parked in webos.dead (the value of the x-webos-dead-reason header).
NOT_JSON = "not-json"
NOT_OBJECT = "not-a-json-object"
TOO_LARGE = "too-large"
KAFKA_REJECTED = "kafka-rejected"


def is_valid_device_id(device: str) -> bool:
    """True when `device` may name a device: 1-64 of A-Z a-z 0-9 _ - (no `.`, `/`, `+`, `#`),
    not starting with `webos-` (the service users' names)."""
    return (isinstance(device, str) and DEVICE_ID_PATTERN.fullmatch(device) is not None
            and not device.startswith(RESERVED_ID_PREFIX))


def _checked(device: str) -> str:
    if not is_valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -, "
                         f"not starting with {RESERVED_ID_PREFIX}")
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
    if queue in (UNROUTED_QUEUE, DEAD_QUEUE) or not is_valid_device_id(device):
        return None
    return device


def parse_routing_key(key: str) -> tuple[str, str] | None:
    """(device, type) from `webos.<device>.<type>`, or None when the key has another shape."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "webos" and is_valid_device_id(parts[1]):
        return parts[1], parts[2]
    return None


def declare_base(channel) -> None:
    """Exchanges and shared queues every deployment has."""
    channel.exchange_declare(UNROUTED_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(UNROUTED_QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)
    channel.queue_bind(UNROUTED_QUEUE, UNROUTED_EXCHANGE)
    channel.exchange_declare(TOPIC_EXCHANGE, "topic", durable=True,
                             arguments={"alternate-exchange": UNROUTED_EXCHANGE})
    channel.exchange_declare(FANOUT_EXCHANGE, "fanout", durable=True)
    channel.queue_declare(DEAD_QUEUE, durable=True, arguments=QUEUE_ARGUMENTS)


def declare_device(channel, device: str) -> str:
    """One device's durable queue, bound `webos.<device>.*` on the topic exchange and to the fanout."""
    queue = device_queue(device)
    channel.queue_declare(queue, durable=True, arguments=DEVICE_QUEUE_ARGUMENTS)
    channel.queue_bind(queue, TOPIC_EXCHANGE, routing_key=f"webos.{device}.*")
    channel.queue_bind(queue, FANOUT_EXCHANGE, routing_key="")
    return queue


def delete_device(channel, device: str) -> None:
    """Remove a device's queue (and with it its bindings and any messages left in it)."""
    channel.queue_delete(device_queue(device))


def declare(channel, devices) -> None:
    """The base topology plus a queue for every device."""
    declare_base(channel)
    for device in devices:
        declare_device(channel, device)


def amqp_parameters(settings: Settings, user: str, password: str, **extra) -> pika.ConnectionParameters:
    """pika connection parameters for one of the project's users: AMQPS, the broker's
    certificate checked against the stack's authority."""
    tls = pika.SSLOptions(client_context(settings.ca_file), server_hostname=settings.rabbitmq_host)
    return pika.ConnectionParameters(
        host=settings.rabbitmq_host, port=settings.amqp_port, virtual_host=settings.vhost,
        credentials=pika.PlainCredentials(user, password), ssl_options=tls, **extra)


def management_api(settings: Settings, user: str | None = None,
                   password: str | None = None) -> requests.Session:
    """An HTTPS session with the management API (default: as webos-admin), the broker's
    certificate checked against the stack's authority."""
    http = requests.Session()
    http.auth = (user or settings.admin_user,
                 settings.admin_password if password is None else password)
    http.verify = str(settings.ca_file)
    # Else REQUESTS_CA_BUNDLE in the environment would win over `verify` (a known requests
    # behaviour), and a proxy variable could route this loopback call elsewhere.
    http.trust_env = False
    return http


def admin_parameters(settings: Settings, **extra) -> pika.ConnectionParameters:
    """pika connection parameters for `webos-admin`."""
    return amqp_parameters(settings, settings.admin_user, settings.admin_password, **extra)


def user_definitions(settings: Settings) -> list[dict]:
    """The least-privilege users besides the administrator (who is created at broker start)."""
    return [
        {
            # Reads device queues; writes parked messages to webos.dead through the default
            # exchange; "management" lets it list queues to find new devices.
            "name": settings.bridge_user, "password": settings.bridge_password, "tags": "management",
            "permissions": {"configure": "^$", "write": r"^amq\.default$",
                            "read": r"^webos\..+$"},
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
    with management_api(settings) as http:
        response = http.delete(f"{settings.management_url}/api/users/{quote(_checked(device), safe='')}",
                               timeout=timeout)
        if response.status_code not in (204, 404):
            response.raise_for_status()
    PKI(settings.pki_path).remove_device(device)


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
        declare(connection.channel(), devices)
    LOGGER.info("topology applied: exchanges %s, %s; queues %s", TOPIC_EXCHANGE, FANOUT_EXCHANGE,
                ", ".join([device_queue(d) for d in devices] + [UNROUTED_QUEUE, DEAD_QUEUE]))


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
