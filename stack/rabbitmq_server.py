"""RabbitMQ 4 (stack/rabbitmq_runtime.py), run as a project-owned process with its own node and data."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pika
import psutil
import requests

from common.config import REPO_ROOT, Settings
from common.pki import PKI, write_private
from rabbitmq import endpoints
from stack.process import BrokerError, LocalProcess, port_open, wait_until
from stack.rabbitmq_runtime import CTL_SCRIPT, SERVER_SCRIPT, Runtime, RuntimeMissing, ensure_runtime

RABBITMQ_DIR = REPO_ROOT / "rabbitmq"
LOGGER = logging.getLogger(__name__)
# Keys the local stack sets itself: listeners on 127.0.0.1 with this instance's ports, and the
# certificates, which it copies into the data dir (the broker runs chrooted there).
_LOCAL_KEYS = re.compile(r"^\s*((mqtt\.)?listeners\.|(management|prometheus)\.(tcp|ssl)\.|"
                         r"ssl_options\.(cacertfile|certfile|keyfile))")
TLS_FILES = ("ca.crt", "server.crt", "server.key")
_TRANSIENT_QUEUES_KEY = "deprecated_features.permit.transient_nonexcl_queues"  # see render_config
# Quorum queues with no leader, none of their members a candidate: each gets an election, and
# the list of their names is the result. RabbitMQ 4.0.5 leaves a quorum queue so when it is
# declared while one of its nodes stops (the election it starts on that node never happens, and
# a member with an empty log never calls one itself): seen under make soak for the MQTT session
# queues of devices that reconnected while a node was stopping, each device then refused
# (CONNECT never answered, on every node) until an election was triggered by hand.
_ELECT_LEADERLESS = """
lists:filtermap(fun(Q) ->
    {Name, _} = amqqueue:get_pid(Q),
    Members = [{Name, N} || N <- maps:get(nodes, amqqueue:get_type_state(Q), [])],
    States = [case catch ra:key_metrics(M) of #{state := S} -> S; _ -> unknown end || M <- Members],
    case Members =/= [] andalso lists:all(fun(S) -> S =:= follower end, States) of
        true -> ra:trigger_election(hd(Members)),
                {true, element(4, amqqueue:get_name(Q))};
        false -> false
    end
end, rabbit_amqqueue:list_by_type(rabbit_quorum_queue)).
"""


class LocalRabbitMQ(LocalProcess):
    """One RabbitMQ node; `settings` gives its ports and the administrator it creates on first boot."""

    name = "rabbitmq"

    def __init__(self, base_dir: Path, settings: Settings, node_name: str = "webos",
                 dist_port: int | None = None, cluster: tuple[str, ...] = (),
                 cookie: str | None = None):
        super().__init__(base_dir)
        self.settings = settings
        self.node_name = f"{node_name}@localhost"
        self.dist_port = dist_port or settings.amqp_port + 20000
        # A cluster member: every member's Erlang node name, and the Erlang cookie they share.
        self.cluster = cluster
        self.cookie = cookie
        self._runtime: Runtime | None = None

    def describe(self) -> str:
        return f"rabbitmq {self.node_name}" if self.cluster else self.name

    def has_data(self) -> bool:
        """True once the node has booted here before (its metadata store is on disk)."""
        mnesia = self.base_dir / "mnesia"
        return mnesia.is_dir() and any(mnesia.iterdir())

    @property
    def runtime(self) -> Runtime:
        """The RabbitMQ 4 this node runs on, built on first use if the machine has none yet."""
        if self._runtime is None:
            try:
                self._runtime = ensure_runtime(progress=lambda line: LOGGER.info("%s", line))
            except RuntimeMissing as error:
                raise BrokerError(str(error)) from error
        return self._runtime

    def render_config(self) -> str:
        """rabbitmq/rabbitmq.conf with listeners on 127.0.0.1 and the first-boot administrator."""
        base = (RABBITMQ_DIR / "rabbitmq.conf").read_text()
        # RabbitMQ 4.0.5 checks this deprecated feature at boot through a Mnesia fallback that
        # fails on a node booting with data (`no_exists` on rabbit_queue after "Mnesia function
        # failed 99 times", taken for "in use": the node refuses to boot; seen in make run's
        # restart test and, for rejoining members, under make soak). Only a single node's first
        # boot denies it; otherwise it stays at RabbitMQ's default.
        deny_transient = not self.cluster and not self.has_data()
        lines = [line for line in base.splitlines() if not _LOCAL_KEYS.match(line)
                 and not (not deny_transient and line.startswith(_TRANSIENT_QUEUES_KEY))]
        s = self.settings
        tls = f"{self.runtime.data_path(self.base_dir)}/tls"
        lines += [
            "",
            "# Set by stack/rabbitmq_server.py for this instance.",
            f"listeners.ssl.default = 127.0.0.1:{s.amqp_port}",
            f"mqtt.listeners.ssl.default = 127.0.0.1:{s.mqtt_port}",
            "management.ssl.ip = 127.0.0.1",
            f"management.ssl.port = {s.management_port}",
            "prometheus.tcp.ip = 127.0.0.1",
            f"prometheus.tcp.port = {s.rabbitmq_metrics_port}",
            *(f"{prefix}.{key} = {tls}/{name}"
              for prefix in ("ssl_options", "management.ssl")
              for key, name in zip(("cacertfile", "certfile", "keyfile"), TLS_FILES)),
        ]
        if s.plain_listeners:
            lines += [
                f"listeners.tcp.default = 127.0.0.1:{s.amqp_plain_port}",
                f"mqtt.listeners.tcp.default = 127.0.0.1:{s.mqtt_plain_port}",
                "management.tcp.ip = 127.0.0.1",
                f"management.tcp.port = {s.management_plain_port}",
            ]
        else:
            lines += ["listeners.tcp = none", "mqtt.listeners.tcp = none"]
        if self.cluster:
            # Members find each other on first boot (a node with data keeps its cluster).
            lines += ["cluster_formation.peer_discovery_backend = classic_config",
                      *(f"cluster_formation.classic_config.nodes.{n} = {member}"
                        for n, member in enumerate(self.cluster, 1)),
                      f"cluster_formation.target_cluster_size_hint = {len(self.cluster)}",
                      # Devices keep persistent sessions (their commands wait there): on a
                      # cluster those queues are quorum queues, so that a session outlives the
                      # node it was made on (a classic one would be down with its node, and the
                      # device could not resume it on another).
                      "mqtt.durable_queue_type = quorum",
                      # A quorum queue declared while a node was away gains it as a member
                      # when it is back (else it stays on fewer nodes, and a majority of them
                      # is sooner lost). containers/rabbitmq-cluster.conf: the same for compose.
                      "quorum_queue.continuous_membership_reconciliation.enabled = true",
                      # A node that hung longer than net_ticktime (60 s) comes back to peers
                      # that took it for down: a partition, which the default (`ignore`) left
                      # for good (tests/test_rabbitmq_cluster.py). The minority pauses and
                      # rejoins once it sees the majority.
                      "cluster_partition_handling = pause_minority",
                      f"{_TRANSIENT_QUEUES_KEY} = true",  # see deny_transient above
                      f"quorum_queue.continuous_membership_reconciliation.target_group_size = "
                      f"{min(3, len(self.cluster))}"]
        lines += [
            # Created on first boot instead of guest (which is then never created).
            f"default_user = {s.admin_user}",
            f"default_pass = {s.admin_password}",
            "default_user_tags.administrator = true",
            f"default_vhost = {s.vhost}",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
        ]
        return "\n".join(lines) + "\n"

    def prepare(self) -> None:
        self.runtime  # noqa: B018  (built now, before the log says "started")
        config = self.base_dir / "rabbitmq.conf"
        config.write_text(self.render_config())
        config.chmod(0o600)
        shutil.copyfile(RABBITMQ_DIR / "enabled_plugins", self.base_dir / "enabled_plugins")
        if self.cookie:
            # The Erlang cookie in $HOME (the data dir): the same on every member.
            write_private(self.base_dir / ".erlang.cookie", self.cookie.encode(), 0o400)
        # The broker's certificate, from the stack's authority (created on first run).
        pki = PKI(self.settings.pki_path)
        pki.ensure()
        tls = self.base_dir / "tls"
        tls.mkdir(exist_ok=True)
        tls.chmod(0o700)  # before the key is copied in, also when the folder was there already
        for name, source in zip(TLS_FILES, (pki.ca_cert, pki.server.cert, pki.server.key)):
            write_private(tls / name, source.read_bytes())

    def environment(self) -> dict[str, str]:
        data = self.runtime.data_path(self.base_dir)  # base_dir as the broker sees it
        env = dict(os.environ)
        env.update({
            "RABBITMQ_CONFIG_FILE": f"{data}/rabbitmq.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{data}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{data}/mnesia",
            "RABBITMQ_LOG_BASE": f"{data}/log",
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_PID_FILE": f"{data}/beam.pid",
            # The script then execs the Erlang VM, so our child is the broker itself and
            # SIGTERM reaches it directly (a clean shutdown).
            "RUNNING_UNDER_SYSTEMD": "1",
            # Erlang cookie in the data dir, distribution and epmd on loopback only.
            "HOME": data,
            # The Debian 13 root has no locales; C.UTF-8 is built into its glibc.
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        })
        return env

    def command(self) -> list[str]:
        return self.runtime.command([SERVER_SCRIPT], self.base_dir)

    def main_pid(self) -> int | None:
        """The Erlang VM (beam.smp) under the runtime's wrapper: the node itself."""
        top = super().main_pid()
        if top is None:
            return None
        try:
            tree = [psutil.Process(top), *psutil.Process(top).children(recursive=True)]
        except psutil.NoSuchProcess:
            return None
        return next((p.pid for p in tree if p.name() == "beam.smp"), top)

    def rabbitmqctl(self, *arguments: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the runtime's `rabbitmqctl` against this node (its cookie, its node name)."""
        return subprocess.run(
            self.runtime.command([CTL_SCRIPT, "--node", self.node_name, *arguments], self.base_dir),
            env=self.environment(), capture_output=True, text=True, timeout=timeout)

    def elect_leaderless_queues(self, timeout: float = 120) -> list[str]:
        """Start an election in every quorum queue whose members are all followers (see
        _ELECT_LEADERLESS); the names of those queues. BrokerError if the node cannot say."""
        result = self.rabbitmqctl("eval", _ELECT_LEADERLESS, timeout=timeout)
        if result.returncode != 0:
            raise BrokerError(f"cannot list leaderless quorum queues on {self.node_name}: "
                              f"{(result.stderr or result.stdout).strip()[:300]}")
        return re.findall(r'<<"([^"]*)">>', result.stdout)

    def cluster_members(self) -> list[str]:
        """The names of the cluster's running nodes, as this node's management API lists them."""
        try:
            return running_nodes(self.settings, timeout=5)
        except (requests.RequestException, ValueError):
            return []

    def probe(self) -> bool:
        """Management API answers, AMQP accepts the administrator, MQTT listens."""
        s = self.settings
        if not (port_open(s.amqp_port) and port_open(s.mqtt_port)):
            return False
        try:
            with endpoints.management_api(s) as http:
                response = http.get(f"{s.management_url}/api/overview", timeout=2)
            if response.status_code == 401:
                raise BrokerError(
                    f"RabbitMQ refuses {s.admin_user}: the data in {self.base_dir} was created "
                    "with another WEBOS_ADMIN_PASSWORD. Put the old one back in .env, or wipe "
                    "the data with `make clean`.")
            if response.status_code != 200:
                return False
            params = endpoints.admin_parameters(s, connection_attempts=1, socket_timeout=2,
                                               blocked_connection_timeout=2)
            pika.BlockingConnection(params).close()
            return True
        except (requests.RequestException, pika.exceptions.AMQPError, OSError):
            return False


def local_nodes(settings: Settings, base_dir: Path, dist_ports: list[int] | None = None,
                node_name: str | None = None) -> list[LocalRabbitMQ]:
    """The local RabbitMQ nodes of `settings` (WEBOS_RABBITMQ_NODES of them), not started: the
    first in base_dir/rabbitmq, node k in base_dir/rabbitmq-k, each on its own ports, a cluster
    sharing one Erlang cookie (kept in base_dir/rabbitmq-cookie, 0600) when there are several."""
    base_dir = Path(base_dir)
    settings.check_local_ports()
    if node_name:
        settings = dataclasses.replace(settings, rabbitmq_node=node_name)
    nodes = settings.rabbitmq_addresses()
    names = [node.rabbitmq_node for node in nodes]
    cookie = None
    if settings.cluster:
        path = base_dir / "rabbitmq-cookie"
        if not path.exists():
            base_dir.mkdir(parents=True, exist_ok=True)
            write_private(path, secrets.token_hex(20).encode())
        cookie = path.read_text().strip()
    members = tuple(f"{name}@localhost" for name in names) if settings.cluster else ()
    return [LocalRabbitMQ(base_dir / ("rabbitmq" if k == 0 else f"rabbitmq-{k + 1}"), node,
                          node_name=names[k], dist_port=dist_ports[k] if dist_ports else None,
                          cluster=members, cookie=cookie)
            for k, node in enumerate(nodes)]


def running_nodes(settings: Settings, timeout: float = 10.0) -> list[str]:
    """The names of the cluster's running nodes, as the management API lists them (raises
    requests' errors)."""
    with endpoints.management_api(settings) as http:
        response = http.get(f"{settings.management_url}/api/nodes",
                            params={"columns": "name,running"}, timeout=timeout)
    response.raise_for_status()
    return sorted(node["name"] for node in response.json() if node.get("running"))


def wait_cluster(nodes: list[LocalRabbitMQ], timeout: float = 120.0) -> None:
    """Until every node is ready and the first one sees them all running (BrokerError if not)."""
    for node in nodes:
        node.wait_ready(timeout)
    if len(nodes) > 1:
        expected = sorted(node.node_name for node in nodes)
        try:
            wait_until(lambda: nodes[0].cluster_members() == expected, timeout, 0.5,
                       f"RabbitMQ nodes {', '.join(expected)} to form one cluster")
        except TimeoutError as error:
            raise BrokerError(f"{error}; they see {nodes[0].cluster_members()}; the logs are "
                              f"{', '.join(str(node.log_path) for node in nodes)}") from None
