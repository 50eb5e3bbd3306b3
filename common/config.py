"""Settings for every component: the one table of defaults, read from the environment and `.env`."""
from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NoReturn

from dotenv import dotenv_values

REPO_ROOT = Path(__file__).resolve().parent.parent
DOTENV_PATH = REPO_ROOT / ".env"
# The secrets generated into .env; WEBOS_ERLANG_COOKIE: the one the nodes of
# docker-compose.cluster.yml share (the local stack makes its own).
PASSWORD_VARIABLES = ("WEBOS_ADMIN_PASSWORD", "WEBOS_BRIDGE_PASSWORD", "WEBOS_ERLANG_COOKIE")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Node k (1-based) of a RabbitMQ cluster listens on each RabbitMQ port + RABBITMQ_PORT_STEP * (k-1).
RABBITMQ_PORT_STEP = 10
RABBITMQ_PORTS = ("amqp_port", "mqtt_port", "management_port", "rabbitmq_metrics_port",
                  "amqp_plain_port", "mqtt_plain_port", "management_plain_port")


@dataclass(frozen=True)
class Settings:
    """Where the brokers are, who logs in, and what the pipeline is called."""

    # One row per setting: `duplicates` sees runs of rows alike in shape (name: type = literal);
    # they are the table of defaults, not repeated logic.

    rabbitmq_host: str = "127.0.0.1"
    # 1, or 3 (any N > 1) for a cluster, where the device queues are quorum queues replicated
    # over the nodes. The nodes are on rabbitmq_host, node k on the ports below + 10 * (k - 1).
    rabbitmq_nodes: int = 1
    # Or the nodes by host name, each on the ports below (containers, machines of their own:
    # docker-compose.cluster.yml sets rabbitmq,rabbitmq-2,rabbitmq-3); then rabbitmq_host is the
    # first and rabbitmq_nodes their number.
    rabbitmq_hosts: tuple[str, ...] = ()
    # Every client uses TLS: AMQPS, MQTT over TLS (devices by certificate), management HTTPS.
    amqp_port: int = 5671
    mqtt_port: int = 8883
    management_port: int = 15671
    # rabbitmq_prometheus's /metrics, plain HTTP on 127.0.0.1 (Prometheus scrapes it).
    rabbitmq_metrics_port: int = 15692
    # Plain AMQP, MQTT (devices by password) and HTTP, on 127.0.0.1 only: off unless this is set.
    plain_listeners: bool = False
    amqp_plain_port: int = 5672
    mqtt_plain_port: int = 1883
    management_plain_port: int = 15672
    # The certificate authority and every certificate (common/pki.py); empty: <stack_dir>/pki.
    pki_dir: str = ""
    vhost: str = "/"
    admin_user: str = "webos-admin"
    admin_password: str = ""
    bridge_user: str = "webos-bridge"
    bridge_password: str = ""
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_topic: str = "webos.events"
    kafka_partitions: int = 6
    presence_topic: str = "webos.presence"       # devices' connects and disconnects (the bridge)
    # The other direction (python -m bridge relay): commands in, one final feedback record per
    # command and device out, and each device's desired and reported state (compacted).
    commands_topic: str = "webos.commands"
    feedback_topic: str = "webos.command-feedback"
    state_topic: str = "webos.state"
    # The relay's consumer group, and its static member id: a relay restarted under the same id
    # takes its partitions back at once instead of after the session timeout.
    relay_group: str = "webos-relay"
    relay_instance: str = "webos-relay-1"
    # Commands waiting per device for its session (Azure IoT Hub allows 50): more are refused
    # with feedback rejected / queue-full. A command's TTL when it names none, and the longest
    # (RabbitMQ drops an MQTT session idle longer than a day, and its waiting commands with it).
    command_queue_limit: int = 100
    command_ttl_seconds: float = 3600.0
    command_max_ttl_seconds: float = 86400.0
    # A local Prometheus with monitoring/'s scrape config and alert rules, under `make run`.
    prometheus: bool = False
    prometheus_port: int = 9090
    # Kafka's security, handed to librdkafka as they are by every Kafka client here (the bridge,
    # the consumer CLI and live view); empty: PLAINTEXT, as the local Kafka listens.
    kafka_security_protocol: str = ""   # security.protocol: SSL, SASL_SSL, SASL_PLAINTEXT
    kafka_sasl_mechanism: str = ""      # sasl.mechanism: SCRAM-SHA-512, SCRAM-SHA-256, PLAIN
    kafka_sasl_username: str = ""       # sasl.username
    kafka_sasl_password: str = ""       # sasl.password
    kafka_ssl_ca_location: str = ""     # ssl.ca.location: the CA file the brokers are checked by
    # The registered devices (ids, routes, intervals): the publisher runs them, the topology
    # declares their queues. Relative to the repository.
    devices_file: str = "publisher/devices.json"
    publisher_port: int = 5000
    consumer_port: int = 5001
    bridge_metrics_port: int = 9108
    # Where the web pages and /metrics listen; docker compose sets 0.0.0.0 inside containers.
    bind_host: str = "127.0.0.1"
    # The local brokers of `make run`: their data and logs (relative to the repository), and the
    # Erlang node name of RabbitMQ. Another pair lets a second stack run next to the first.
    stack_dir: str = ".stack"
    rabbitmq_node: str = "webos"
    log_level: str = "INFO"
    # Bearer token the publisher's write API asks for; empty: no token (loopback use only).
    publisher_api_token: str = field(default="", metadata={"env": "PUBLISHER_API_TOKEN"})
    # The longest wait between reconnect attempts, of a device and of the bridge: the wait
    # doubles from 1 s up to this (devices add +-20 % jitter). Tests that restart brokers
    # shorten it, so a reconnect does not wait out a doubling that began while the broker was
    # still starting.
    reconnect_max_seconds: float = 30.0
    # The bridge's knobs (python -m bridge --help says what each does; flags override them).
    bridge_queues: tuple[str, ...] = ()         # explicit queues; empty: every device queue found
    bridge_queue_pattern: str = ""               # regex on queue names; empty: all device queues
    bridge_topic_template: str = ""              # empty: kafka_topic
    bridge_instance: str = ""                    # empty: <host name>:<metrics port>
    # 4,000: draining a backlog it beat 2,000 in ten paired runs of ten, by 5-35 %, and 8,000 was
    # no better (bench/results/bridge-trials-2026-11-22.md); it costs that many redeliveries
    # after a crash, and a few MB.
    bridge_prefetch: int = 4000
    # 1 ms: at a steady rate the forwarder's loop already gathers what arrived over its last turn
    # (one every 4 ms, bridge/pacing.py) and produces it in one burst, which a linger of 1 ms sends
    # as a request or two (strace: 394 sendmsg a second at 1,000 msg/s). At 1,000 msg/s
    # (docs/performance.md, "The bridge at a steady rate") that loop with 1 ms: bridge CPU 169 µs
    # per message, p50 6.6 ms, p99 25 ms, Kafka 24.5 % of a core; the old loop (a turn per
    # delivery) with 3 ms: 282 µs, 7.8 ms, 38 ms, 25.5 %. With a turn per delivery, 1 ms had made
    # nearly every record a request (bench/results/bridge-trials-2026-11-22.md).
    bridge_linger_ms: float = 1.0
    bridge_batch_size: int = 1_000_000           # librdkafka batch.size, bytes per partition batch
    bridge_max_message_bytes: int = 1_000_000    # librdkafka message.max.bytes; bigger: webos.dead
    # s between full queue listings while queue events arrive (every 2 s while they do not).
    bridge_discovery_interval: float = 30.0
    # s that a stopping bridge waits for Kafka to confirm what is in flight; the rest is redelivered.
    bridge_flush_timeout: float = 10.0
    # s: the longest back-off of a device queue whose records Kafka refuses for a reason that may
    # pass (bridge/backoff.py: 1 s, doubling, jittered). A minute keeps a refused bridge below a
    # few wake-ups a second and still notices a fixed ACL within a minute.
    bridge_retry_max_seconds: float = 60.0

    def __post_init__(self):
        if self.rabbitmq_nodes < 1:
            raise ConfigError(f"WEBOS_RABBITMQ_NODES={self.rabbitmq_nodes}: use 1, or 3 for a cluster")
        if self.rabbitmq_hosts:
            if self.rabbitmq_nodes not in (1, len(self.rabbitmq_hosts)):
                raise ConfigError(f"WEBOS_RABBITMQ_HOSTS names {len(self.rabbitmq_hosts)} nodes and "
                                  f"WEBOS_RABBITMQ_NODES={self.rabbitmq_nodes}: set one of the two")
            # The host list is the one fact; the two settings it implies follow from it.
            object.__setattr__(self, "rabbitmq_host", self.rabbitmq_hosts[0])
            object.__setattr__(self, "rabbitmq_nodes", len(self.rabbitmq_hosts))

    @property
    def cluster(self) -> bool:
        """True when RabbitMQ is a cluster of several nodes (quorum device queues)."""
        return self.rabbitmq_nodes > 1

    def check_local_ports(self) -> None:
        """For RabbitMQ nodes run here: each listener of each node on a port of its own (node k
        on each port + RABBITMQ_PORT_STEP * (k - 1)), or a ConfigError naming the two."""
        used: dict[int, str] = {}
        for k in range(self.rabbitmq_nodes):
            for name in RABBITMQ_PORTS:
                if "plain" in name and not self.plain_listeners:
                    continue
                port = getattr(self, name) + RABBITMQ_PORT_STEP * k
                here = f"node {k + 1}'s WEBOS_{name.upper()}" if self.cluster else f"WEBOS_{name.upper()}"
                if port in used:
                    raise ConfigError(f"{here} and {used[port]} would both be port {port}: "
                                      f"move one (node k listens on each port + "
                                      f"{RABBITMQ_PORT_STEP} * (k - 1))")
                used[port] = here

    def rabbitmq_addresses(self) -> list[Settings]:
        """Each RabbitMQ node as settings of its own (its ports, its Erlang node name), the first
        node first: every client takes this list and moves to the next node when its node dies."""
        if not self.cluster:
            return [self]
        if self.rabbitmq_hosts:
            return [dataclasses.replace(self, rabbitmq_hosts=(), rabbitmq_nodes=1, rabbitmq_host=host)
                    for host in self.rabbitmq_hosts]
        return [dataclasses.replace(
                    self, rabbitmq_nodes=1,
                    rabbitmq_node=self.rabbitmq_node if k == 0 else f"{self.rabbitmq_node}-{k + 1}",
                    **{port: getattr(self, port) + RABBITMQ_PORT_STEP * k for port in RABBITMQ_PORTS})
                for k in range(self.rabbitmq_nodes)]

    @property
    def devices_path(self) -> Path:
        """The devices file, resolved against the repository."""
        return REPO_ROOT / Path(self.devices_file).expanduser()

    @property
    def management_url(self) -> str:
        """Base URL of the RabbitMQ management UI and HTTP API (HTTPS)."""
        return f"https://{self.rabbitmq_host}:{self.management_port}"

    @property
    def pki_path(self) -> Path:
        """Where the certificate authority and the certificates are (WEBOS_PKI_DIR)."""
        if self.pki_dir:
            return (REPO_ROOT / Path(self.pki_dir).expanduser()).resolve()
        return stack_dir(self) / "pki"

    @property
    def ca_file(self) -> Path:
        """The authority's certificate every client checks the brokers against."""
        return self.pki_path / "ca.crt"

    def kafka_client(self, **extra) -> dict:
        """librdkafka configuration for a Kafka client: the bootstrap servers, the security
        settings that are set, then `extra`."""
        config = {"bootstrap.servers": self.kafka_bootstrap}
        for key, value in (("security.protocol", self.kafka_security_protocol),
                           ("sasl.mechanism", self.kafka_sasl_mechanism),
                           ("sasl.username", self.kafka_sasl_username),
                           ("sasl.password", self.kafka_sasl_password),
                           ("ssl.ca.location", self.kafka_ssl_ca_location)):
            if value:
                config[key] = value
        return {**config, **extra}

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in a child process."""
        env = {}
        for setting in dataclasses.fields(self):
            value = getattr(self, setting.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            env[env_name(setting)] = str(value)
        return env


class ConfigError(Exception):
    """A setting that cannot work, with what to change; each `main` turns it into exit code 2."""


def run(main: Callable[[], int]) -> NoReturn:
    """Exit with what a command's `main` returns; a ConfigError exits 2 with what to change."""
    try:
        code = main()
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        code = 2
    raise SystemExit(code)


def stop_on_signals(logger) -> threading.Event:
    """An event that SIGINT and SIGTERM set (logged): a long-running command's one stop flag."""
    stop = threading.Event()

    def on_signal(signum, frame):
        logger.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    return stop


def env_name(setting: dataclasses.Field) -> str:
    """The environment variable of a Settings field: WEBOS_<NAME> unless it says otherwise."""
    return setting.metadata.get("env", f"WEBOS_{setting.name.upper()}")


def stack_dir(settings: Settings) -> Path:
    """Where the local brokers keep their data and logs (WEBOS_STACK_DIR, default .stack/)."""
    path = (REPO_ROOT / Path(settings.stack_dir).expanduser()).resolve()
    if path == REPO_ROOT or path in REPO_ROOT.parents:
        # Its rabbitmq/ and kafka/ would be the repository's own (and `clean` would delete them).
        raise ConfigError(f"WEBOS_STACK_DIR={settings.stack_dir!r} is the repository or above it: "
                         "use a directory of its own (default .stack)")
    return path


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1, or a message saying what is wrong."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _coerce(setting: dataclasses.Field, raw: str):
    if setting.type == "int":
        return int(raw)
    if setting.type == "float":
        return float(raw)
    if setting.type == "bool":
        if raw.lower() not in TRUE + FALSE:
            raise ValueError(raw)
        return raw.lower() in TRUE
    if setting.type == "tuple[str, ...]":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


# What a running local stack tells every later command (a bridge, the CLI, a tool started by hand
# in another shell): written by `make run`/`make up` into its stack directory, removed when it
# stops. Only the cluster's size: without it a client would assume one node and, that node lost,
# retry only it.
STACK_STATE_FILE = "running.env"
STACK_STATE_VARIABLES = ("WEBOS_RABBITMQ_NODES",)


def environment(env: Mapping[str, str] | None = None,
                dotenv_path: Path | None = DOTENV_PATH, running_stack: bool = True) -> dict[str, str]:
    """`.env`'s variables under the environment (`env`, default os.environ), which wins; under
    both, with `running_stack`, what the running local stack recorded (STACK_STATE_FILE)."""
    merged: dict[str, str] = {}
    if dotenv_path is not None and dotenv_path.exists():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ if env is None else env)
    if running_stack:
        state = (REPO_ROOT / Path(merged.get("WEBOS_STACK_DIR") or Settings.stack_dir).expanduser()
                 / STACK_STATE_FILE)
        if state.exists():
            recorded = {k: v for k, v in dotenv_values(state).items()
                        if k in STACK_STATE_VARIABLES and v}
            merged = {**recorded, **merged}
    return merged


def record_stack_state(settings: Settings) -> None:
    """`make run`/`make up`: note the cluster's size where every later command finds it."""
    state = stack_dir(settings) / STACK_STATE_FILE
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("# Written by the running local stack (python -m stack), removed when it "
                     f"stops.\nWEBOS_RABBITMQ_NODES={settings.rabbitmq_nodes}\n")


def clear_stack_state(settings: Settings) -> None:
    """The local stack stopped: later commands no longer assume its cluster."""
    (stack_dir(settings) / STACK_STATE_FILE).unlink(missing_ok=True)


def load_settings(env: Mapping[str, str] | None = None, dotenv_path: Path | None = DOTENV_PATH,
                  running_stack: bool = True, **overrides) -> Settings:
    """Settings from the running stack's record (`running_stack`), then `.env`, then the
    environment (which wins), then explicit overrides."""
    merged = environment(env, dotenv_path, running_stack)
    values = {}
    for setting in dataclasses.fields(Settings):
        raw = merged.get(env_name(setting))
        if raw is not None and raw != "":
            try:
                values[setting.name] = _coerce(setting, raw)
            except ValueError:
                raise ConfigError(f"{env_name(setting)}={raw!r} is not a valid {setting.type}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def ensure_credentials(dotenv_path: Path = DOTENV_PATH) -> list[str]:
    """Generate any missing password into `.env` (mode 0600); return the names it added."""
    existing = dotenv_values(dotenv_path) if dotenv_path.exists() else {}
    missing = [name for name in PASSWORD_VARIABLES
               if not existing.get(name) and not os.environ.get(name)]
    if missing:
        with open(dotenv_path, "a", encoding="utf-8") as dotenv:
            if not existing:
                dotenv.write("# Generated by the local stack on first run; git-ignored. "
                             "Read by every component and by docker compose.\n")
            for name in missing:
                dotenv.write(f"{name}={secrets.token_urlsafe(18)}\n")
        os.chmod(dotenv_path, 0o600)
    return missing
