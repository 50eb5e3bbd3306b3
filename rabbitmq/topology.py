"""Provisioning: the RabbitMQ topology (exchanges, queues, bindings) and its users and
permissions, declared in this one place from the names in rabbitmq/naming.py. Applying it twice
changes nothing.
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

from common.config import ConfigError, Settings, load_settings, run
from common.devices import load_devices
from common.pki import PKI
from rabbitmq.endpoints import admin_parameters, management_api, open_connection
from rabbitmq.naming import (BROADCAST, COMMAND_TYPE, CONNECTION_EVENTS, DEAD_QUEUE,
                             DELIVERY_LIMIT, EVENT_EXCHANGE, EXPIRED_QUEUE, FANOUT_EXCHANGE,
                             MESSAGE_TYPES, PRESENCE_MAX_LENGTH, PRESENCE_QUEUE, REPLIES_QUEUE,
                             REPLY_TYPE, SUBSCRIPTION_QUEUE_PREFIX, SUBSCRIPTION_QUEUE_SUFFIX,
                             TOPIC_EXCHANGE, UNROUTED_EXCHANGE, UNROUTED_QUEUE, checked_device,
                             device_queue, subscription_queue)

LOGGER = logging.getLogger(__name__)


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


# What webos.topic's alternate exchange keeps: every key no queue took, except a command's
# (`*.*.command`): a command no device session is subscribed to must stay unroutable, so that the
# broker returns it to the relay (mandatory publish) instead of parking it where no device looks.
UNROUTED_KEYS = ("*", "*.*", *(f"*.*.{kind}" for kind in (*MESSAGE_TYPES, REPLY_TYPE)), "*.*.*.*.#")
# The MQTT plugin's QoS 1 subscription queues are the devices' command queues: at most
# Settings.command_queue_limit commands wait per device (more are refused, and the relay reports
# them `rejected`), and a command that outlives its TTL is dead-lettered into webos.expired.
COMMANDS_POLICY = "webos-commands"


def declare_unrouted(channel, quorum: bool = False):
    """webos.unrouted: the topic exchange (webos.topic's alternate) and the queue it keeps into.

    Until commands came it was a fanout; an exchange keeps its type, so a fanout left by an older
    stack is replaced (its queue and messages stay)."""
    try:
        channel.exchange_declare(UNROUTED_EXCHANGE, "topic", durable=True)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 406:
            raise
        LOGGER.info("replacing the fanout %s by a topic exchange (commands must stay unroutable)",
                    UNROUTED_EXCHANGE)
        channel = channel.connection.channel()
        channel.exchange_delete(UNROUTED_EXCHANGE)
        channel.exchange_declare(UNROUTED_EXCHANGE, "topic", durable=True)
    channel.queue_declare(UNROUTED_QUEUE, durable=True, arguments=queue_arguments(quorum, False))
    for key in UNROUTED_KEYS:
        channel.queue_bind(UNROUTED_QUEUE, UNROUTED_EXCHANGE, routing_key=key)
    return channel


def declare_base(channel, quorum: bool = False):
    """Exchanges and shared queues every deployment has (`quorum`: on a cluster); returns the
    channel to go on with (declaring the unrouted exchange may have needed a new one)."""
    channel = declare_unrouted(channel, quorum)
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
    # Devices' answers to commands, for the relay to turn into feedback records in Kafka.
    channel.queue_declare(REPLIES_QUEUE, durable=True, arguments=queue_arguments(quorum, False))
    channel.queue_bind(REPLIES_QUEUE, TOPIC_EXCHANGE, routing_key=f"webos.*.{REPLY_TYPE}")
    channel.queue_declare(EXPIRED_QUEUE, durable=True, arguments=queue_arguments(quorum, False))
    return channel


def declare_device(channel, device: str, quorum: bool = False) -> str:
    """One device's durable queue, bound `webos.<device>.<type>` on the topic exchange for each
    message type and to the fanout (`quorum`: on a cluster). Not `webos.<device>.*`: that would
    copy the commands to the device, and its replies, into its telemetry (an older stack's such
    binding is removed)."""
    queue = device_queue(device)
    channel.queue_declare(queue, durable=True, arguments=queue_arguments(quorum))
    for message_type in MESSAGE_TYPES:
        channel.queue_bind(queue, TOPIC_EXCHANGE, routing_key=f"webos.{device}.{message_type}")
    channel.queue_unbind(queue, TOPIC_EXCHANGE, routing_key=f"webos.{device}.*")
    channel.queue_bind(queue, FANOUT_EXCHANGE, routing_key="")
    return queue


def delete_device(channel, device: str) -> None:
    """Remove a device's queue (and with it its bindings and any messages left in it)."""
    channel.queue_delete(device_queue(device))


def declare(channel, devices, quorum: bool = False) -> None:
    """The base topology plus a queue for every device (`quorum`: on a cluster)."""
    channel = declare_base(channel, quorum)
    for device in devices:
        declare_device(channel, device, quorum)


def device_definitions(vhost: str, devices, quorum: bool = False) -> dict:
    """What declare_device declares for each of `devices`, as a definitions document."""
    queues, bindings = [], []
    for device in devices:
        queue = device_queue(device)
        queues.append({"name": queue, "vhost": vhost, "durable": True, "auto_delete": False,
                       "arguments": queue_arguments(quorum)})
        keys = [(TOPIC_EXCHANGE, f"webos.{device}.{kind}") for kind in MESSAGE_TYPES]
        bindings += [{"source": exchange, "vhost": vhost, "destination": queue,
                      "destination_type": "queue", "routing_key": key, "arguments": {}}
                     for exchange, key in (*keys, (FANOUT_EXCHANGE, ""))]
    return {"queues": queues, "bindings": bindings}


def declare_devices(settings: Settings, devices, timeout: float = 300.0) -> None:
    """Queues and bindings for `devices` on the RabbitMQ `settings` names (quorum queues on a
    cluster), in one definitions import over the management API: 5,000 devices took 100 s as
    AMQP declarations one by one on a busy 2-core machine (`make bench`). Unlike declare_device
    it leaves an older stack's `webos.<device>.*` binding alone: these are new devices."""
    devices = [checked_device(device) for device in devices]
    if not devices:
        return
    with management_api(settings) as http:
        http.post(f"{settings.management_url}/api/definitions",
                  json=device_definitions(settings.vhost, devices, settings.cluster),
                  timeout=timeout).raise_for_status()


def user_definitions(settings: Settings) -> list[dict]:
    """The least-privilege users besides the administrator (who is created at broker start)."""
    return [
        {
            # Reads device queues; writes parked messages to webos.dead through the default
            # exchange; learns of new device queues from the event exchange, into a server-named
            # exclusive queue (amq.gen-*) of its own; "management" lets it list queues and
            # consumers. The relay (python -m bridge relay) publishes commands on webos.topic,
            # command keys only, and reads devices' replies and expired commands (webos.*).
            "name": settings.bridge_user, "password": settings.bridge_password, "tags": "management",
            "permissions": {"configure": r"^amq\.gen-.*$",
                            "write": rf"^(amq\.default|amq\.gen-.*|{re.escape(TOPIC_EXCHANGE)})$",
                            "read": r"^(webos\..+|amq\.gen-.*|amq\.rabbitmq\.event)$"},
            "topic_permissions": {"exchange": TOPIC_EXCHANGE, "read": "^$",
                                  "write": rf"^webos\.[^.]+\.{COMMAND_TYPE}$"},
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


def apply_policies(settings: Settings, timeout: float = 10.0) -> None:
    """The commands policy on the devices' MQTT subscription queues (see COMMANDS_POLICY)."""
    pattern = f"^{re.escape(SUBSCRIPTION_QUEUE_PREFIX)}.+{SUBSCRIPTION_QUEUE_SUFFIX}$"
    policy = {"pattern": pattern, "apply-to": "queues", "priority": 0,
              "definition": {"max-length": settings.command_queue_limit,
                             "overflow": "reject-publish", "dead-letter-exchange": "",
                             "dead-letter-routing-key": EXPIRED_QUEUE}}
    with management_api(settings) as http:
        http.put(f"{settings.management_url}/api/policies/{quote(settings.vhost, safe='')}/"
                 f"{COMMANDS_POLICY}", json=policy, timeout=timeout).raise_for_status()


# A device's rights on webos.topic's routing keys: publish its own telemetry and replies, and
# subscribe to its own commands and the broadcast, nothing else. {username} is the certificate's
# CN, which the broker checked: a device cannot choose it.
DEVICE_TOPIC_WRITE = r"^webos\.{username}\.(" + "|".join((*MESSAGE_TYPES, REPLY_TYPE)) + r")$"
DEVICE_TOPIC_READ = rf"^webos\.({{username}}|{BROADCAST})\.{COMMAND_TYPE}$"


def device_permissions(device: str) -> dict:
    """A device's rights on resources: publish on webos.topic, and for its QoS 1 subscriptions
    what the MQTT plugin does in its name (measured on RabbitMQ 4.0.5, each one needed): declare
    its session's queue (configure), bind it to webos.topic (write on the queue, read on the
    exchange) and consume it (read). Regular expressions take no {username} here: the queue name
    is written out. A QoS 0 subscription (queue ...qos0) is refused: commands are QoS 1."""
    queue = re.escape(subscription_queue(device))
    exchange = re.escape(TOPIC_EXCHANGE)
    return {"configure": f"^{queue}$", "write": f"^({exchange}|{queue})$",
            "read": f"^({exchange}|{queue})$"}


def enrol_devices(settings: Settings, devices, timeout: float = 60.0) -> None:
    """Give each device what it needs to connect: its certificate (issued when missing) and its
    broker user with its permissions, in one definitions import however many devices. The user
    has no password (it logs in with its certificate) unless the plain listeners are on."""
    devices = [checked_device(device) for device in devices]
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
        "permissions": [{"user": device, "vhost": vhost, **device_permissions(device)}
                        for device in devices],
        "topic_permissions": [{"user": device, "vhost": vhost, "exchange": TOPIC_EXCHANGE,
                               "write": DEVICE_TOPIC_WRITE, "read": DEVICE_TOPIC_READ}
                              for device in devices],
    }
    with management_api(settings) as http:
        http.post(f"{settings.management_url}/api/definitions", json=definitions,
                  timeout=timeout).raise_for_status()


def remove_enrolment(settings: Settings, device: str, timeout: float = 10.0) -> None:
    """Revoke a device: delete its broker user (RabbitMQ closes its connections and refuses its
    certificate from then on) and its certificate files."""
    remove_enrolments(settings, [device], timeout)


def remove_enrolments(settings: Settings, devices, timeout: float = 10.0) -> None:
    """remove_enrolment for each of `devices`, over one management API session; the device's
    MQTT session queue goes too (with the commands waiting in it: it will never collect them)."""
    pki = PKI(settings.pki_path)
    api, vhost = f"{settings.management_url}/api", quote(settings.vhost, safe="")
    with management_api(settings) as http:
        for device in devices:
            for url in (f"{api}/users/{quote(checked_device(device), safe='')}",
                        f"{api}/queues/{vhost}/{quote(subscription_queue(device), safe='')}"):
                response = http.delete(url, timeout=timeout)
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
    try:
        return [device.id for device in load_devices(settings.devices_path)]
    except ValueError as error:
        raise ConfigError(str(error)) from None


# A cluster keeps its metadata (exchanges, queues, bindings, users) in Khepri, RabbitMQ's Raft
# store, instead of Mnesia. Measured under make soak (1,000 devices, 2,000 quorum queues, 222
# msg/s): a restarted Mnesia node took 3.5 to over 10 min to boot, its binding recovery queued
# behind the Mnesia transactions of quorum queues changing leader; with Khepri, 28-66 s with
# only restarts, 70-166 s amid the soak's other faults (docs/scaling.md). Fully supported from
# RabbitMQ 4.0 and the default from 4.2, but in 4.0 a feature flag marked experimental that the
# cluster must enable; enabling it is one-way.
METADATA_STORE_FLAG = "khepri_db"


def apply_metadata_store(settings: Settings, timeout: float = 120.0) -> None:
    """On a cluster, enable Khepri (METADATA_STORE_FLAG) unless it is: before anything else is
    declared, so that there is nothing to migrate from Mnesia."""
    if not settings.cluster:
        return
    url = f"{settings.management_url}/api/feature-flags"
    with management_api(settings) as http:
        response = http.get(url, timeout=10)
        response.raise_for_status()
        state = next((flag["state"] for flag in response.json() if flag["name"] == METADATA_STORE_FLAG), None)
        if state is None:
            raise ConfigError(f"this RabbitMQ has no {METADATA_STORE_FLAG} feature flag: RabbitMQ 4.0 or later needed")
        if state != "enabled":
            LOGGER.info("enabling %s: the cluster's metadata moves to Khepri", METADATA_STORE_FLAG)
            http.put(f"{url}/{METADATA_STORE_FLAG}/enable", json={"name": METADATA_STORE_FLAG},
                     timeout=timeout).raise_for_status()


def apply(settings: Settings, devices=None) -> None:
    """Users, exchanges, queues and bindings for `devices` (default: the registered ones)."""
    apply_metadata_store(settings)
    devices = registered_devices(settings) if devices is None else devices
    # Exchanges before the permissions that name them: RabbitMQ 4.0.5 with Khepri fails to
    # declare an exchange that a topic permission named first (`mismatching_node`, the channel
    # closed with INTERNAL_ERROR).
    with open_connection(admin_parameters(settings)) as connection:
        declare(connection.channel(), devices, quorum=settings.cluster)
    apply_users(settings)
    apply_policies(settings)
    enrol_devices(settings, devices)
    LOGGER.info("topology applied: exchanges %s, %s; queues %s", TOPIC_EXCHANGE, FANOUT_EXCHANGE,
                ", ".join([device_queue(d) for d in devices]
                          + [UNROUTED_QUEUE, DEAD_QUEUE, PRESENCE_QUEUE, REPLIES_QUEUE,
                             EXPIRED_QUEUE]))


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
