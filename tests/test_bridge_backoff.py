"""The bridge when Kafka refuses one device's records for minutes (a topic authorization failure,
on a Kafka with an authorizer and SCRAM users): that device's messages are held and retried
with back-off, in order; the other devices go on; the log says it once; nothing is lost. The
relay the same when Kafka refuses its feedback: the reply waits, and is not redelivered in a
tight loop."""
from __future__ import annotations

import dataclasses
import json

import pika

from rabbitmq import endpoints, naming
from stack.kafka_server import ensure_pipeline_topics, ensure_topic
from tests.helpers import read_records, wait_for
from tests.support.bridge import BridgeProcess, body
from tests.support.command_device import CommandDevice
from tests.support.commands import CommandSender, start_relay


def seqs(records, device: str) -> list[int]:
    return [json.loads(record.value())["seq"] for record in records if record.key() == device.encode()]


def test_a_topic_refused_for_one_device_holds_it_with_backoff_while_the_other_goes_on(
        settings, authorizing_kafka, new_device, tmp_path):
    kafka, listener, acls = authorizing_kafka
    refused_device, other_device = new_device("R"), new_device("G")
    for device in (refused_device, other_device):
        ensure_topic(kafka.bootstrap, f"test.acl.{device}", 1)
    as_bridge = dataclasses.replace(settings, **listener.client("webos-bridge"))
    bridge = BridgeProcess(as_bridge, tmp_path, "--queues", ",".join(
        naming.device_queue(device) for device in (refused_device, other_device)),
        "--topic-template", "test.acl.{device}", "--no-presence", "--retry-max-seconds", "4")
    connection = pika.BlockingConnection(endpoints.admin_parameters(settings))
    channel = connection.channel()
    channel.confirm_delivery()

    def publish(device: str, numbers: range) -> None:
        for seq in numbers:
            channel.basic_publish(naming.TOPIC_EXCHANGE, naming.routing_key(device, "info"),
                                  body(device, seq), pika.BasicProperties(delivery_mode=2))
    as_reader = dataclasses.replace(settings, kafka_bootstrap=kafka.bootstrap)
    try:
        bridge.wait_consuming(2)
        publish(refused_device, range(0, 10))
        read_records(as_reader, f"test.acl.{refused_device}", lambda got: len(got) >= 10, 30)

        # Write on the one device's topic denied: its messages are held, the other's flow.
        acls.deny_write(f"test.acl.{refused_device}")
        retrying = 'webos_bridge_retrying_queues{error="TOPIC_AUTHORIZATION_FAILED"}'
        publish(refused_device, range(10, 20))
        wait_for(lambda: bridge.metric(retrying) == 1, 30,
                 message="the refused device's queue to back off")
        for round_ in range(3):  # the refusal lasts several back-offs (up to 4 s each)
            publish(refused_device, range(20 + 10 * round_, 30 + 10 * round_))
            publish(other_device, range(10 * round_, 10 * round_ + 10))
            got = read_records(as_reader, f"test.acl.{other_device}",
                               lambda got: len(got) >= 10 * (round_ + 1), 30)
            assert seqs(got, other_device) == list(range(10 * (round_ + 1)))
        wait_for(lambda: bridge.metric("webos_bridge_held") == 40, 30,
                 message="the refused device's 40 messages held")
        assert bridge.metric(retrying) == 1
        assert bridge.metric("webos_bridge_refused_total") >= 1  # the rest held without a try
        refusal_lines = [line for line in bridge.output.splitlines() if "Kafka refuses" in line]
        assert len(refusal_lines) == 1, bridge.output[-3000:]  # once a minute, not per record

        # The ACL gone: the held messages arrive, in order, none lost, and the back-off ends.
        acls.allow_write(f"test.acl.{refused_device}")
        got = read_records(as_reader, f"test.acl.{refused_device}",
                           lambda got: set(seqs(got, refused_device)) >= set(range(50)), 60)
        first_seen = list(dict.fromkeys(seqs(got, refused_device)))
        assert first_seen == list(range(50))
        wait_for(lambda: bridge.metric(retrying) == 0 and bridge.metric("webos_bridge_held") == 0
                 and bridge.metric("webos_bridge_acked_total") == 80, 30,
                 message="the back-off over and everything acked")
        assert "Kafka takes records again" in bridge.output
    finally:
        connection.close()
        assert bridge.stop() == 0, bridge.output


def test_feedback_refused_holds_the_reply_with_backoff_and_it_arrives_once_allowed(
        settings, authorizing_kafka, new_device, tmp_path):
    kafka, listener, acls = authorizing_kafka
    plain = dataclasses.replace(settings, kafka_bootstrap=kafka.bootstrap)  # setup and reading
    ensure_pipeline_topics(plain)
    as_relay = dataclasses.replace(settings, **listener.client("webos-bridge"),
                                   bridge_retry_max_seconds=4.0)
    relay = start_relay(as_relay, tmp_path / "relay.log")
    device = CommandDevice(settings, new_device("FB")).connect()
    sender = CommandSender(plain)
    try:
        assert device.subscribed.wait(10)
        acls.deny_write(settings.feedback_topic)
        command_id = sender.send(device.device, "ping")
        wait_for(lambda: device.applied == [command_id], 30, message="the device to apply it")
        wait_for(lambda: "Kafka refuses feedback records" in relay.output(), 30,
                 message="the relay to hold the reply")
        # Held, and requeued after 1, 2, 4, 4 ... s: a few redeliveries, not a tight loop.
        wait_for(lambda: _redelivered(settings) >= 2, 30, message="a retry of the held reply")
        assert _redelivered(settings) < 10
        assert relay.output().count("Kafka refuses feedback records") == 1

        acls.allow_write(settings.feedback_topic)
        [final] = sender.wait_final(command_id, timeout=30)
        assert final["status"] == "succeeded" and final["device"] == device.device
    finally:
        sender.close()
        device.disconnect()
        assert relay.stop() == 0, relay.output(30)


def _redelivered(settings) -> int:
    """How many times RabbitMQ delivered webos.replies' messages again (management API)."""
    with endpoints.management_api(settings) as http:
        queue = http.get(f"{settings.management_url}/api/queues/%2F/{naming.REPLIES_QUEUE}",
                         timeout=10).json()
    return int((queue.get("message_stats") or {}).get("redeliver", 0))
