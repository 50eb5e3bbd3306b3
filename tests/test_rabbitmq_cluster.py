"""RabbitMQ as a 3-node cluster beside a 3-broker Kafka: quorum device queues, devices spread over
the nodes, two bridge instances sharing the queues; a node and a bridge killed mid-stream.

The cluster is this module's own (three local nodes started by the same code as
`WEBOS_RABBITMQ_NODES=3 make run`, on free ports); so is the Kafka cluster. The publisher and the
bridges are real processes (bench/pipeline_run.py), and Kafka is audited by `seq`.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter

import pika
import pytest

from bench.pipeline_run import PipelineRun
from bridge.options import share_priority
from rabbitmq import topology
from rabbitmq import naming
from rabbitmq import endpoints
from stack.kafka_server import local_cluster
from stack.local import fresh_settings, start_rabbitmq
from stack.rabbitmq_server import wait_cluster
from stack.process import free_port
from tests.helpers import RESTART_RECONNECT_MAX, dead_command, queue_depth, wait_for

LOGGER = logging.getLogger(__name__)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Three RabbitMQ nodes and three Kafka brokers, each cluster formed; settings naming them."""
    base = tmp_path_factory.mktemp("clusters")
    kafka = local_cluster(base / "kafka", [(free_port(), free_port()) for _ in range(3)])
    for node in kafka:
        node.start()
    bootstrap = ",".join(f"127.0.0.1:{node.port}" for node in kafka)
    settings = fresh_settings(base, rabbitmq_nodes=3, kafka_bootstrap=bootstrap,
                              reconnect_max_seconds=RESTART_RECONNECT_MAX)
    nodes = []
    try:
        nodes = start_rabbitmq(settings, base, "webos-cluster")
        for node in kafka:
            node.wait_ready(timeout=180)
        topology.apply(settings, devices=[])
        yield settings, nodes
    finally:
        for node in [*nodes, *kafka]:  # throwaway data: no clean shutdown needed
            if node.pid() is not None:
                node.kill()


def queue_leaders(settings, queues) -> Counter:
    """How many of `queues` each node leads (the management API's `leader` of a quorum queue)."""
    with endpoints.management_api(settings) as http:
        listed = http.get(f"{settings.management_url}/api/queues/%2F",
                          params={"columns": "name,leader,type"}, timeout=10).json()
    return Counter(q.get("leader") for q in listed if q["name"] in set(queues))


def test_the_device_queues_are_quorum_queues_spread_over_the_nodes(clusters, tmp_path):
    settings, nodes = clusters
    with PipelineRun(settings, tmp_path, devices=30, messages=30) as run:
        run._declare_queues()
        with endpoints.management_api(settings) as http:
            queue = http.get(f"{settings.management_url}/api/queues/%2F/{run.queues[0]}",
                             timeout=10).json()
            dead = http.get(f"{settings.management_url}/api/queues/%2F/{naming.DEAD_QUEUE}",
                            timeout=10).json()
        assert queue["type"] == "quorum" and dead["type"] == "quorum"
        assert sorted(queue["members"]) == sorted(node.node_name for node in nodes)
        assert queue["arguments"]["x-single-active-consumer"] is True
        leaders = queue_leaders(settings, run.queues)
        assert len(leaders) == 3, f"leaders not spread over the nodes: {leaders}"


def test_the_cluster_keeps_its_metadata_in_khepri_and_applying_the_topology_again_changes_nothing(clusters):
    settings, nodes = clusters
    with endpoints.management_api(settings) as http:
        flags = http.get(f"{settings.management_url}/api/feature-flags", timeout=10).json()
    assert {f["name"]: f["state"] for f in flags}[topology.METADATA_STORE_FLAG] == "enabled"
    # Re-declaring what exists (exchanges named by topic permissions among them) is accepted.
    topology.apply(settings, devices=["KHEPRI-1"])
    topology.apply(settings, devices=["KHEPRI-1"])
    with endpoints.management_api(settings) as http:
        queue = http.get(f"{settings.management_url}/api/queues/%2F/"
                         f"{naming.device_queue('KHEPRI-1')}", timeout=10).json()
    assert queue["type"] == "quorum" and len(queue["members"]) == 3


def test_elect_leaders_leaves_a_healthy_cluster_as_it_is(clusters):
    settings, nodes = clusters
    queues = [naming.DEAD_QUEUE, naming.PRESENCE_QUEUE, naming.REPLIES_QUEUE]
    before = queue_leaders(settings, queues)
    assert sum(before.values()) == 3 and None not in before
    assert nodes[0].elect_leaderless_queues() == []
    assert queue_leaders(settings, queues) == before


def test_a_message_delivered_too_often_ends_in_webos_dead(clusters):
    settings, _ = clusters
    device = "LIMIT-1"
    with pika.BlockingConnection(endpoints.admin_parameters(settings)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        topology.declare_device(channel, device, quorum=True)
        channel.queue_purge(naming.DEAD_QUEUE)
        channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(device, "info"),
                              b'{"poison": true}')
        # A consumer that fails on it every time (basic.get is refused with single active
        # consumer): each requeue counts as one delivery.
        deliveries = []

        def refuse(channel, method, properties, body):
            deliveries.append(body)
            channel.basic_nack(method.delivery_tag, requeue=True)
        channel.basic_consume(naming.device_queue(device), refuse, consumer_tag="refuse")
        dead = []
        wait_for(lambda: connection.process_data_events(0.1) or
                 dead.append(channel.basic_get(naming.DEAD_QUEUE)) or dead[-1][0], 30,
                 message="the message in webos.dead")
        method, properties, body = dead[-1]
        channel.basic_cancel("refuse")
        channel.basic_nack(method.delivery_tag, requeue=True)  # left for the operator
        assert body == b'{"poison": true}'
        assert len(deliveries) == naming.DELIVERY_LIMIT + 1
        assert properties.headers["x-first-death-reason"] == "delivery_limit"
        assert properties.headers["x-first-death-queue"] == naming.device_queue(device)

        # Listed with the broker's reason; redriven to its queue once the consumer is fixed.
        listed = dead_command(settings, "list", "--device", device, "--format", "json")
        assert [json.loads(line)["reason"] for line in listed.stdout.splitlines()] == [
            "delivery_limit"], listed.stderr
        redrive = dead_command(settings, "redrive", "--device", device)
        assert "redriven 1 of 1" in redrive.stdout, redrive.stderr
        back = queue_depth(channel, naming.device_queue(device))
        topology.delete_device(channel, device)
    assert back == 1


def test_two_bridges_share_the_queues_and_one_takes_all_when_the_other_dies(clusters, tmp_path):
    settings, _ = clusters
    with PipelineRun(settings, tmp_path, devices=40, messages=1600, interval=(0.5, 0.5),
                     replication=3) as run:
        run.start()
        first = run.bridge

        def active(bridge):
            return run.bridge_metric("webos_bridge_active_queues", bridge)
        wait_for(lambda: active(first) == 40, 30, 0.5, "the first bridge active on all")
        second = run.start_bridge()
        # Each queue goes to the instance of the higher priority (rendezvous hashing; a tie
        # leaves it where it is). RabbitMQ hands a queue over once the old consumer's in-flight
        # messages are settled, one queue after another: wait for all of them, not the first.
        priorities = [(share_priority(run.bridge_instance(second), queue),
                       share_priority(run.bridge_instance(first), queue)) for queue in run.queues]
        mine = sum(new > old for new, old in priorities)
        ties = sum(new == old for new, old in priorities)
        seen = []

        def settled() -> bool:
            seen.append((active(first), active(second)))
            return (seen[-1][0] or 0) + (seen[-1][1] or 0) == 40 and \
                mine <= (seen[-1][1] or 0) <= mine + ties
        try:
            wait_for(settled, 60, 0.5, "the bridges on their shares")
        except TimeoutError:
            raise AssertionError(f"shares {seen[-1]}, expected ({40 - mine}, {mine}) with "
                                 f"{ties} ties") from None
        shares = active(first), active(second)
        run.kill_bridge(first)
        wait_for(lambda: active(second) == 40, 30, 0.5, "the second bridge active on all")
        report = run.finish()
    print(f"\nshares {shares}; {report.summary()}")
    assert min(shares) >= 5, f"a lopsided share: {shares}"
    assert report.missing == 0 and report.out_of_order == 0, report.summary()


def test_a_node_and_a_bridge_killed_mid_stream_lose_nothing(clusters, tmp_path):
    settings, nodes = clusters
    # 80 messages a device, one every 0.25 s: a 20 s stream, long enough for both faults to land
    # in it on a slow machine (at 0.1 s a busy CI machine ended it before the bridge was killed).
    with PipelineRun(settings, tmp_path, devices=100, messages=8000, interval=(0.25, 0.25),
                     replication=3) as run:
        run.prepare(bridges=2)  # both consuming before the devices start
        leaders = queue_leaders(settings, run.queues)  # they stay where they are until the kill
        victim = next(node for node in nodes if node.node_name == leaders.most_common(1)[0][0])
        run.stream()
        run.wait_published(2000)
        assert run.streaming, "the stream ended before the node could be killed"
        run.note(f"kill -9 RabbitMQ {victim.node_name}, leader of {leaders[victim.node_name]} "
                 f"of {len(run.queues)} device queues")
        victim.kill()
        run.wait_published(5000, timeout=180)
        assert run.streaming, "the stream ended before the bridge could be killed"
        run.kill_bridge()  # the second instance; the first takes its share
        report = run.finish(timeout=300)
        # Back into the cluster (its data kept), before the run deletes its queues: deleting a
        # quorum queue waits for a member that is down.
        victim.start()
        wait_cluster(nodes)
    print(f"\n{report.summary()}")
    assert report.missing == 0, report.summary()
    assert report.out_of_order == 0, report.summary()


# s the hang test keeps a node stopped, as issue 24 asks: about net_ticktime, so the other nodes
# may or may not take it for down meanwhile (then it is a partition too, which pause_minority
# heals). Either way nothing may be missing.
HANG_SECONDS = 60.0


def test_a_node_that_hangs_mid_stream_is_left_within_the_heartbeat_window_and_nothing_is_lost(
        clusters, tmp_path):
    """SIGSTOP, not SIGKILL: the node keeps its sockets open and never answers. The bridge on it
    notices by the missing heartbeats and moves to another node; resumed, the node goes on in its
    cluster, and the audit finds nothing missing."""
    settings, nodes = clusters
    with PipelineRun(settings, tmp_path, devices=40, messages=9600, interval=(0.25, 0.25),
                     replication=3) as run:
        run.prepare()
        port = int(re.findall(r"connected to RabbitMQ [\d.]+:(\d+)", run.bridge.output())[-1])
        victim = next(node for node in nodes if node.settings.amqp_port == port)
        run.stream()
        run.wait_published(1000)
        victim.hang()
        hung_at = time.monotonic()
        run.note(f"SIGSTOP RabbitMQ {victim.node_name}, the bridge's node")
        try:
            wait_for(lambda: (run.bridge_metric("webos_bridge_reconnects_total") or 0) >= 1, 120,
                     interval=0.5, message="the bridge to leave the hung node")
            moved = time.monotonic() - hung_at
            run.note(f"the bridge reconnected elsewhere {moved:.1f} s after the hang began")
            # Until the other nodes take it for down (net_ticktime, 60 s), the quorum queues it
            # leads elect no other leader, so Kafka may get little meanwhile (docs/reliability.md).
            arrived = run.tally.count
            time.sleep(max(0.0, HANG_SECONDS - (time.monotonic() - hung_at)))  # the fault's length
            run.note(f"{run.tally.count - arrived} more records in Kafka while "
                     f"{victim.node_name} hung")
        finally:
            victim.resume()
        run.note(f"SIGCONT after {time.monotonic() - hung_at:.0f} s")
        report = run.finish(timeout=300)
        wait_cluster(nodes)
    print(f"\nbridge moved after {moved:.1f} s; {report.summary()}")
    # pika drops a connection after two heartbeat intervals without a frame, then connect()
    # tries the other nodes first: 22-23 s measured with a 10 s heartbeat (62 s with 30 s).
    assert moved < 3 * endpoints.HEARTBEAT_SECONDS + 10, f"the bridge moved after {moved:.1f} s"
    assert report.missing == 0, report.summary()
    assert report.out_of_order == 0, report.summary()
