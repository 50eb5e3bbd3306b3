"""Apache Kafka (jars from Maven Central) as a single-node KRaft process, its topics, and a
reader of a whole topic for the tests and benchmarks."""
from __future__ import annotations

import base64
import logging
import os
import shutil
import subprocess
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation, AclPermissionType,
                                   AdminClient, NewTopic, ResourcePatternType, ResourceType)

from common.config import REPO_ROOT, ConfigError
from common.pki import PKI, write_private
from stack.process import BrokerError, LocalProcess, port_open, wait_until

LOGGER = logging.getLogger(__name__)
KAFKA_DIR = REPO_ROOT / "kafka"
KAFKA_LIB = KAFKA_DIR / "lib"
JVM_OPTIONS = ["-Xms256m", "-Xmx1g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-Djava.awt.headless=true"]
_QUIET = logging.getLogger("webos.kafka.admin")
_QUIET.setLevel(logging.CRITICAL)


def new_cluster_id() -> str:
    """A KRaft cluster id (16 random bytes, URL-safe base64, as kafka-storage random-uuid).

    Like Kafka's Uuid.randomUuid, it never starts with "-": kafka-storage's argument parser
    would take such an id (1 draw in 64) for a flag and refuse to format."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class LocalKafka(LocalProcess):
    """One Kafka node that is both broker and controller, data under `base_dir/data`."""

    name = "kafka"

    def __init__(self, base_dir: Path, port: int = 9092, controller_port: int = 9093, node_id: int = 1,
                 quorum_voters: str | None = None, overrides: dict[str, str] | None = None,
                 cluster_id: str | None = None, secure: SecureListener | None = None):
        super().__init__(base_dir)
        self.secure = secure
        self.port = port
        self.controller_port = controller_port
        self.node_id = node_id
        self.quorum_voters = quorum_voters or f"{node_id}@127.0.0.1:{controller_port}"
        self.overrides = overrides or {}
        self.cluster_id = cluster_id or new_cluster_id()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def render_config(self) -> str:
        """kafka/server.properties with this instance's ports and data directory."""
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        overrides = {**self.overrides}
        if self.secure is not None:
            listeners.append(f"SASL_SSL://127.0.0.1:{self.secure.port}")
            overrides.update(self.secure.properties(self.base_dir / "tls" / "kafka.pem"))
        overrides.update({
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.quorum_voters,
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{self.controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "log.dirs": str(self.base_dir / "data"),
        })
        lines = []
        for line in (KAFKA_DIR / "server.properties").read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            lines.append(f"{key}={overrides.pop(key)}" if key in overrides else line)
        lines += [f"{key}={value}" for key, value in overrides.items()]
        return "\n".join(lines) + "\n"

    def _java(self, main_class: str, *args: str) -> list[str]:
        java = shutil.which("java")
        if java is None:
            raise ConfigError("java is missing: install a JDK 17 (Debian: openjdk-17-jre-headless)")
        if not any(KAFKA_LIB.glob("kafka_2.13-*.jar")):
            raise ConfigError(f"Kafka's jars are missing in {KAFKA_LIB}: run `make install` "
                             "(mvn -f kafka/pom.xml dependency:copy-dependencies)")
        return [java, *JVM_OPTIONS, f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.yaml'}",
                "-cp", f"{KAFKA_LIB}/*", main_class, *args]

    def prepare(self) -> None:
        config = self.base_dir / "server.properties"
        config.write_text(self.render_config())
        config.chmod(0o600)
        scram = []
        if self.secure is not None:
            self.secure.write_keystore(self.base_dir / "tls" / "kafka.pem")
            mechanism = SecureListener.MECHANISM
            scram = [argument for user, password in self.secure.users.items() for argument in
                     ("--add-scram", f"{mechanism}=[name={user},password={password}]")]
        if (self.base_dir / "data" / "meta.properties").exists():
            return
        result = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", self.cluster_id,
                       "-c", str(config), *scram),
            capture_output=True, text=True)
        if result.returncode != 0:
            raise BrokerError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.base_dir / "server.properties"))

    def environment(self) -> dict[str, str]:
        return {**os.environ, "LOG_DIR": str(self.base_dir)}

    def probe(self) -> bool:
        if not port_open(self.port):
            return False
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "logger": _QUIET})
        try:
            metadata = admin.list_topics(timeout=2)
            return bool(metadata.brokers)
        except KafkaException:
            return False


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener beside the plain one: TLS with the stack's broker certificate, and
    SCRAM users (created when the storage is formatted)."""

    MECHANISM = "SCRAM-SHA-512"
    port: int
    pki: PKI
    users: dict[str, str]

    def properties(self, keystore: Path) -> dict[str, str]:
        """server.properties entries for the listener (named sasl_ssl)."""
        return {
            "listener.security.protocol.map":
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": self.MECHANISM,
            f"listener.name.sasl_ssl.{self.MECHANISM.lower()}.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(keystore),
        }

    def write_keystore(self, keystore: Path) -> None:
        """The broker's key and certificate in one PEM file, mode 0600."""
        self.pki.ensure()
        keystore.parent.mkdir(mode=0o700, exist_ok=True)
        write_private(keystore, self.pki.server.key.read_bytes() + self.pki.server.cert.read_bytes())

    def client(self, user: str) -> dict[str, str]:
        """The Settings fields a client of this listener needs, as `user`."""
        return {"kafka_bootstrap": f"127.0.0.1:{self.port}", "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": self.MECHANISM, "kafka_sasl_username": user,
                "kafka_sasl_password": self.users[user],
                "kafka_ssl_ca_location": str(self.pki.ca_cert)}


# Kafka checking ACLs: its own listeners (plain, controller) are anonymous and that principal may
# do anything (setup and reading go through it); SASL users get what ACLs grant them.
AUTHORIZER = {"authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
              "super.users": "User:ANONYMOUS"}


class TopicAcls:
    """ACLs of one SCRAM user on an authorizing Kafka, set through its anonymous plain listener:
    every topic, every group and the cluster granted, and a topic's Write denied and allowed again (a deny
    wins over a grant), as an operator's mistaken ACL would."""

    def __init__(self, bootstrap: str, user: str, timeout: float = 30.0):
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _QUIET})
        self.principal = f"User:{user}"
        self.timeout = timeout

    def _apply(self, bindings: list[AclBinding]) -> None:
        for future in self.admin.create_acls(bindings).values():
            future.result(self.timeout)

    def grant_all(self) -> None:
        self._apply([AclBinding(kind, name, ResourcePatternType.LITERAL, self.principal, "*",
                                AclOperation.ALL, AclPermissionType.ALLOW)
                     for kind, name in ((ResourceType.TOPIC, "*"), (ResourceType.GROUP, "*"),
                                        (ResourceType.BROKER, "kafka-cluster"))])

    def deny_write(self, topic: str) -> None:
        self._apply([AclBinding(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL,
                                self.principal, "*", AclOperation.WRITE, AclPermissionType.DENY)])

    def allow_write(self, topic: str) -> None:
        """Remove what deny_write added."""
        found = AclBindingFilter(ResourceType.TOPIC, topic, ResourcePatternType.LITERAL,
                                 self.principal, "*", AclOperation.WRITE, AclPermissionType.DENY)
        for future in self.admin.delete_acls([found]).values():
            future.result(self.timeout)


def local_cluster(base_dir: Path, ports: list[tuple[int, int]]) -> list[LocalKafka]:
    """A KRaft cluster of len(ports) nodes, each broker + controller, replication factor 3 and
    min.insync.replicas 2 by default (the shape the README's "Scaling out" describes)."""
    voters = ",".join(f"{i}@127.0.0.1:{controller}" for i, (_, controller) in enumerate(ports, 1))
    replication = str(min(3, len(ports)))
    overrides = {"default.replication.factor": replication, "min.insync.replicas": "2",
                 "offsets.topic.replication.factor": replication,
                 "transaction.state.log.replication.factor": replication,
                 "transaction.state.log.min.isr": "2"}
    cluster_id = new_cluster_id()
    return [LocalKafka(Path(base_dir) / f"kafka-{i}", port=port, controller_port=controller,
                       node_id=i, quorum_voters=voters, overrides=overrides, cluster_id=cluster_id)
            for i, (port, controller) in enumerate(ports, 1)]


def ensure_topic(bootstrap: str, topic: str, partitions: int = 6, replication: int = -1,
                 timeout: float = 30.0, config: dict | None = None) -> bool:
    """Create `topic` (with topic `config`) unless it exists; True when this call created it.
    Replication -1: the brokers' default.replication.factor (1 alone, 3 in a cluster)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _QUIET})
    metadata = admin.list_topics(timeout=timeout)
    if topic in metadata.topics:
        return False
    future = admin.create_topics([NewTopic(topic, partitions, replication, config=config or {})],
                                 request_timeout=timeout)[topic]
    try:
        future.result(timeout)
    except KafkaException as error:
        if error.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        return False
    LOGGER.info("created Kafka topic %s (%d partitions)", topic, partitions)
    return True


def ensure_pipeline_topics(settings) -> None:
    """The topics the pipeline writes: the device messages', the devices' presence, and the
    commands with their feedback and the devices' state (compacted: the latest per device)."""
    for topic in (settings.kafka_topic, settings.presence_topic, settings.commands_topic,
                  settings.feedback_topic):
        ensure_topic(settings.kafka_bootstrap, topic, settings.kafka_partitions)
    ensure_topic(settings.kafka_bootstrap, settings.state_topic, settings.kafka_partitions,
                 config={"cleanup.policy": "compact"})


def topic_partitions(client, topic: str, timeout: float = 30.0) -> list[int]:
    """The partition numbers of `topic` as `client` (a Consumer, Producer or AdminClient) sees
    it, waiting while its broker does not know the topic yet.

    The brokers of a cluster learn of a new topic a moment after the one that created it; until
    then a metadata request answers UNKNOWN_TOPIC_OR_PART with no partitions, and a reader that
    assigned those would read nothing.
    """
    def known() -> list[int]:
        metadata = client.list_topics(topic, timeout=timeout).topics.get(topic)
        return sorted(metadata.partitions) if metadata and metadata.error is None else []
    return wait_until(known, timeout, 0.1, f"Kafka to know the topic {topic}")


class TopicReader:
    """Every partition of `topic` read from the beginning on a thread of its own, up to `batch`
    records per fetch; a subclass handles each record (errors included) in `on_record`.
    Partitions are assigned, not subscribed: no group to join, so reading starts at once and a
    broker's restart neither stalls it nor rewinds it."""

    poll_seconds = 0.2
    batch = 1
    join_seconds = 10.0

    def __init__(self, bootstrap: str, topic: str, partitions: int | None = None,
                 config: dict | None = None):
        self.consumer = Consumer({"bootstrap.servers": bootstrap,
                                  "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, **(config or {})})
        numbers = range(partitions) if partitions else topic_partitions(self.consumer, topic)
        self.consumer.assign([TopicPartition(topic, number, OFFSET_BEGINNING) for number in numbers])
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def start(self) -> "TopicReader":
        self.thread.start()
        return self

    def run(self) -> None:
        try:
            while not self.done.is_set():
                for record in self.consumer.consume(self.batch, self.poll_seconds):
                    self.on_record(record)
        finally:
            self.consumer.close()

    def on_record(self, record) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.done.set()
        self.thread.join(self.join_seconds)
