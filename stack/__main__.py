"""`python -m stack`: bring the local brokers up, run the pipeline, take it all down."""
from __future__ import annotations

import argparse
import logging
import shutil
import signal
import time

from stack.apps import app_status, apps_running, run_apps
from common.devices import load_devices
from common.config import (DOTENV_PATH, ConfigError, Settings, clear_stack_state,
                           ensure_credentials, load_settings, record_stack_state,
                           run, stack_dir)
from common.pki import PKI
from stack.kafka_server import LocalKafka, ensure_pipeline_topics
from stack.process import BrokerError
from stack.prometheus_server import LocalPrometheus
from stack.rabbitmq_server import LocalRabbitMQ, local_nodes, running_nodes, wait_cluster

LOGGER = logging.getLogger("stack")


def brokers(settings: Settings) -> list[LocalRabbitMQ | LocalKafka]:
    """The local RabbitMQ node(s) and Kafka for `settings` (not started), Kafka last."""
    base = stack_dir(settings)
    port = int(settings.kafka_bootstrap.rpartition(":")[2])
    nodes = local_nodes(settings, base)
    kafka = LocalKafka(base / "kafka", port=port, controller_port=port + 1)
    if nodes[-1].dist_port > 65535 or kafka.controller_port > 65535:
        raise ConfigError(f"WEBOS_AMQP_PORT={settings.amqp_port} or the Kafka port ({port}) is too "
                         f"high: the local brokers also listen on {nodes[-1].dist_port} (Erlang "
                         f"distribution) and {kafka.controller_port} (Kafka's controller)")
    return [*nodes, kafka]


def services(settings: Settings, left_behind: bool = False) -> list:
    """The brokers, then the local Prometheus when WEBOS_PROMETHEUS is set (`left_behind`: also
    when an earlier run left it running or its data, for stop, status and clean)."""
    prometheus = LocalPrometheus(stack_dir(settings) / "prometheus", settings)
    wanted = settings.prometheus or (left_behind and prometheus.base_dir.exists())
    return [*brokers(settings), *([prometheus] if wanted else [])]


def up(settings: Settings) -> list[LocalRabbitMQ | LocalKafka]:
    """Start whatever broker is not running yet, wait for all, apply topology and topic."""
    from rabbitmq import topology

    running = services(settings)
    *nodes, kafka = brokers_of(running)
    check_node_data(settings, nodes)
    started = time.monotonic()
    for broker in running:
        if broker.pid() is None:
            broker.start()
        else:
            LOGGER.info("%s already running (pid %s); reusing it", broker.describe(), broker.pid())
    wait_cluster(nodes)
    LOGGER.info("RabbitMQ (%d node%s) ready %.1f s after start", len(nodes),
                "s" if len(nodes) > 1 else "", time.monotonic() - started)
    kafka.wait_ready()
    LOGGER.info("kafka ready %.1f s after start", time.monotonic() - started)
    topology.apply(settings)
    ensure_pipeline_topics(settings)
    for prometheus in (service for service in running if isinstance(service, LocalPrometheus)):
        prometheus.wait_ready()
        LOGGER.info("prometheus ready: %s", prometheus.alerts_url)
    LOGGER.info("brokers ready in %.1f s", time.monotonic() - started)
    return running


def check_node_data(settings: Settings, nodes: list[LocalRabbitMQ]) -> None:
    """A node keeps the cluster its data says: one that ran alone does not join the others, and
    one of a cluster does not start alone. Say so before starting rather than time out."""
    base = stack_dir(settings)
    ran_clustered = (base / "rabbitmq-2").exists()  # node k's data is in rabbitmq-k
    ran_alone = (base / "rabbitmq").exists() and not ran_clustered
    if (settings.cluster and ran_alone) or (not settings.cluster and ran_clustered):
        before, now = ("1 node", f"{len(nodes)} nodes") if settings.cluster else ("a cluster", "1 node")
        raise ConfigError(f"the RabbitMQ data in {base} is of {before}, and WEBOS_RABBITMQ_NODES "
                          f"asks for {now}: `make clean` first (it deletes the brokers' data; "
                          "the passwords and certificates stay), or use another WEBOS_STACK_DIR")


def brokers_of(running: list) -> list:
    """RabbitMQ node(s) and Kafka of what `services` gave."""
    return [broker for broker in running if isinstance(broker, (LocalRabbitMQ, LocalKafka))]


def setup(settings: Settings, timeout: float = 120.0) -> int:
    """Wait until both brokers answer, then apply the topology and create the topic."""
    from rabbitmq import topology

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # On a cluster, all of it first: a quorum queue declared while a node has not yet
            # joined gets members on the others only (seen under docker compose: webos.presence
            # on two nodes, without a majority once one of them stopped).
            running = len(running_nodes(settings))
            if running < settings.rabbitmq_nodes:
                raise BrokerError(f"{running} of {settings.rabbitmq_nodes} RabbitMQ nodes in the cluster")
            topology.apply(settings)
            ensure_pipeline_topics(settings)
            return 0
        except ConfigError:
            raise
        except Exception as error:  # brokers still starting: retry until the deadline
            LOGGER.info("brokers not ready yet (%s); retrying", error)
            time.sleep(2)
    LOGGER.error("brokers did not become ready within %.0f s", timeout)
    return 1


def down(settings: Settings, running=None) -> None:
    """Stop both local brokers (data is kept); `running` are the handles `up` returned."""
    for broker in running or services(settings, left_behind=True):
        broker.stop()
    clear_stack_state(settings)


def banner(settings: Settings, apps: bool = True) -> str:
    """What a user can open once the stack is up (`apps`: with publisher, bridge and consumer)."""
    lines = ["", "webos pipeline is up:" if apps else "webos brokers are up (no apps: `make run` runs them):"]
    if apps:
        lines += [f"  publisher (devices)     http://127.0.0.1:{settings.publisher_port}/",
                  f"  consumer live view      http://127.0.0.1:{settings.consumer_port}/"]
    lines.append(f"  RabbitMQ management UI  {settings.management_url}/  (user {settings.admin_user})")
    if settings.cluster:
        lines += [f"  RabbitMQ node {k}         {node.rabbitmq_node}@localhost: AMQPS "
                  f"{node.amqp_port}, MQTT/TLS {node.mqtt_port}, management {node.management_port}"
                  for k, node in enumerate(settings.rabbitmq_addresses(), 1)]
    if apps:
        lines.append(f"  bridge metrics          http://127.0.0.1:{settings.bridge_metrics_port}/metrics")
    if settings.prometheus:
        lines.append(f"  Prometheus alerts       http://127.0.0.1:{settings.prometheus_port}/classic/alerts  "
                     "(rules: monitoring/alerts.yml)")
    lines += [f"  Kafka                   {settings.kafka_bootstrap}  topic {settings.kafka_topic}",
              f"  passwords               {DOTENV_PATH}  (WEBOS_ADMIN_PASSWORD for the UI)",
              f"  certificates            {settings.pki_path}/  (ca.crt: trust it in a browser "
              "for the UI; devices/<id>.crt, .key: each device's identity)",
              f"  devices connect to      mqtts://{settings.rabbitmq_host}:{settings.mqtt_port}  "
              "(TLS, by certificate; client id = device id)",
              "  read Kafka              .venv/bin/python -m consumer --from-beginning"]
    if apps:
        device = next(iter(load_devices(settings.devices_path)), None)
        device = device.id if device else "<device>"
        lines += [f"  command a device        .venv/bin/python -m consumer command {device} "
                  "set-status --arg status=Inactive --wait",
                  f"  its state               .venv/bin/python -m consumer state {device}"]
    if apps:
        lines.append("  state of each app       make status  (an app that exits is started again)")
    lines += ["Ctrl-C stops everything." if apps else "`make stop` stops them.", ""]
    return "\n".join(lines)


def pki_command(settings: Settings, args) -> int:
    """`python -m stack pki`: create what is missing, issue or rotate one device, print files."""
    from rabbitmq import naming, topology

    pki = PKI(settings.pki_path)
    created = pki.ensure()
    for device in filter(None, (args.issue, args.rotate)):
        try:
            naming.device_queue(device)  # the one check of a device id, with its message
        except ValueError as error:
            raise ConfigError(str(error)) from None
    devices = [args.issue] if args.issue else [] if args.rotate else topology.registered_devices(settings)
    for device in devices:
        if not pki.device(device).cert.exists():
            pki.ensure_device(device)
            created.append(f"devices/{device}.crt")
    if args.rotate:
        pki.reissue_device(args.rotate)
        created.append(f"devices/{args.rotate}.crt (new key)")
    print(f"certificate authority   {pki.ca_cert}")
    print(f"brokers' certificate    {pki.server.cert}")
    print(f"device certificates     {pki.devices_dir}/<device>.crt, .key  "
          f"({len(list(pki.devices_dir.glob('*.crt')))} issued)")
    print(f"created now             {', '.join(created) or 'nothing (all present)'}")
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def stop_brokers(settings: Settings, running=None) -> None:
    """`down`, deaf to more Ctrl-C or SIGTERM: half-stopped brokers would be worse."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    LOGGER.info("stopping brokers")
    down(settings, running=running)


def parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per thing to do with the stack."""
    parser = argparse.ArgumentParser(
        prog="python -m stack",
        description="Local RabbitMQ + Kafka for the webos pipeline. Their data and logs are under "
                    "WEBOS_STACK_DIR (default .stack/); ports, passwords and the RabbitMQ node name "
                    "(WEBOS_RABBITMQ_NODE) come from WEBOS_* variables and .env.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="start brokers, apply topology, run the apps (publisher, bridge, relay, live view); Ctrl-C stops all")
    sub.add_parser("up", help="start the brokers in the background and apply the topology")
    sub.add_parser("down", help="stop brokers left running by `up` (data is kept)")
    sub.add_parser("status", help="show which brokers run and the state of each app "
                                  "under `run` (pid and uptime)")
    sub.add_parser("clean", help="stop the brokers and delete their data and logs (the "
                                 "certificates in WEBOS_PKI_DIR stay)")
    sub.add_parser("setup", help="apply topology, users and Kafka topic to the brokers the "
                                 "environment names (docker compose runs this once)")
    sub.add_parser("elect-leaders", help="start an election in every quorum queue left without a "
                                         "leader (a RabbitMQ 4.0.5 bug: a device refused on every "
                                         "node after a node restart); lists them")
    pki = sub.add_parser(
        "pki", help="create the certificate authority and the brokers' certificate where missing "
                    "(WEBOS_PKI_DIR, default .stack/pki; `clean` keeps it), and print its files",
        description="Without options: the authority, the brokers' certificate and a certificate "
                    "for each registered device, created only where missing. --issue enrols "
                    "one more device's certificate; --rotate gives a device a new key and "
                    "certificate (copy both to the device; its broker user stays).")
    pki.add_argument("--issue", metavar="DEVICE", help="issue a certificate for DEVICE if it has none")
    pki.add_argument("--rotate", metavar="DEVICE", help="replace DEVICE's key and certificate")
    return parser


def elect_leaders(settings: Settings) -> int:
    """`elect-leaders`: LocalRabbitMQ.elect_leaderless_queues on the first running node."""
    node = next((node for node in local_nodes(settings, stack_dir(settings)) if node.pid()), None)
    if node is None:
        LOGGER.error("no RabbitMQ node of this stack (%s) runs: start it with `make run`", stack_dir(settings))
        return 1
    try:
        queues = node.elect_leaderless_queues()
    except BrokerError as error:
        LOGGER.error("%s", error)
        return 1
    print(f"elections started in {len(queues)} quorum queue(s) without a leader"
          + "".join(f"\n  {name}" for name in queues))
    return 0


def status(settings: Settings) -> int:
    """`status`: each broker (running or not, its log) and each app under `run`."""
    for broker in services(settings, left_behind=True):
        pid = broker.pid()
        print(f"{broker.describe()}: {'running, pid %d' % pid if pid else 'stopped'}  "
              f"(log {broker.log_path})")
    print("\n".join(app_status(settings)))
    return 0


def clean(settings: Settings) -> None:
    """`clean` after `down`: delete what the brokers wrote (WEBOS_STACK_DIR may name a directory
    with other things: only theirs goes)."""
    for broker in services(settings, left_behind=True):
        if broker.base_dir.exists():
            shutil.rmtree(broker.base_dir)
            LOGGER.info("deleted %s", broker.base_dir)
    (stack_dir(settings) / "rabbitmq-cookie").unlink(missing_ok=True)
    try:
        stack_dir(settings).rmdir()
    except OSError:
        pass  # missing, or holds other things


def start(settings: Settings, with_apps: bool) -> int:
    """`up` (brokers in the background) or `run` (brokers, then the apps until Ctrl-C)."""
    if with_apps and apps_running(settings):
        # Its brokers are in use: starting, then stopping them again would pull them from under it.
        LOGGER.error("this stack (%s) already runs: an earlier `make run` is still running; stop "
                     "it with Ctrl-C there, or use another WEBOS_STACK_DIR", stack_dir(settings))
        return 1
    try:
        running = up(settings)
    except BrokerError as error:
        LOGGER.error("%s", error)
        down(settings)
        return 1
    except KeyboardInterrupt:
        LOGGER.info("interrupted while starting")
        stop_brokers(settings)
        return 130
    record_stack_state(settings)
    print(banner(settings, apps=with_apps), flush=True)
    if not with_apps:
        return 0
    try:
        return run_apps(settings)
    finally:
        stop_brokers(settings, running)


def main(argv=None) -> int:
    """Command line of the local stack."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)

    if args.command in ("run", "up"):
        # SIGTERM stops as Ctrl-C does, also while the brokers start.
        signal.signal(signal.SIGTERM, _interrupt)
        added = ensure_credentials()
        if added:
            LOGGER.info("generated %s into %s", ", ".join(added), DOTENV_PATH)
    # `run` and `up` start what the environment asks for, not what a stack recorded before.
    settings = load_settings(running_stack=args.command not in ("run", "up"))

    if args.command == "status":
        return status(settings)
    if args.command == "setup":
        return setup(settings)
    if args.command == "elect-leaders":
        return elect_leaders(settings)
    if args.command == "pki":
        return pki_command(settings, args)
    if args.command in ("down", "clean"):
        down(settings)
        if args.command == "clean":
            clean(settings)
        return 0
    return start(settings, with_apps=args.command == "run")


if __name__ == "__main__":
    run(main)
