"""The bridge's back-off per queue (bridge/backoff.py) and the acks around held deliveries
(bridge/delivery.AckTracker): pure logic, no broker."""
from __future__ import annotations

import random

from bridge.backoff import QueueBackoff
from bridge.delivery import AckTracker


def test_a_refused_queue_waits_doubling_jittered_up_to_the_cap_and_a_taken_record_resets_it():
    backoff = QueueBackoff(cap=8.0, rng=random.Random(7))
    now, waits = 0.0, []
    for _ in range(6):
        waits.append(backoff.refused("webos.D1", "TOPIC_AUTHORIZATION_FAILED: denied", now))
        assert "webos.D1" in backoff
        assert backoff.due(now + waits[-1] - 0.001) == []
        now += waits[-1]
        assert backoff.due(now) == ["webos.D1"] and "webos.D1" not in backoff
    steps = [1, 2, 4, 8, 8, 8]
    assert all(step / 2 <= wait <= step for wait, step in zip(waits, steps)), waits
    assert len(set(waits)) == len(waits)  # jittered: no two alike

    backoff.taken("webos.D1")
    assert backoff.errors() == {}
    assert backoff.refused("webos.D1", "again", now) <= 1.0  # from the start


def test_a_second_report_of_a_waiting_queue_does_not_lengthen_its_wait_and_others_go_on():
    backoff = QueueBackoff(cap=60.0, rng=random.Random(1))
    first = backoff.refused("webos.D1", "E: x", 10.0)
    assert backoff.refused("webos.D1", "E: x", 10.5) is None
    assert "webos.D2" not in backoff
    assert backoff.next_due() == 10.0 + first
    backoff.refused("webos.D2", "F: y", 11.0)
    assert backoff.errors() == {"E: x": 1, "F: y": 1}


def test_a_refusal_is_logged_once_a_minute():
    backoff = QueueBackoff(cap=60.0)
    assert backoff.should_log("E: x", 100.0)
    assert not backoff.should_log("E: x", 130.0)
    assert not backoff.should_log("E: worded otherwise", 131.0)  # the same kind of refusal
    assert backoff.should_log("F: other", 130.0)
    assert backoff.should_log("E: x", 160.0)


def test_confirmed_tags_behind_a_held_one_are_acked_one_by_one_and_the_held_one_stays():
    tracker = AckTracker()
    for tag in range(1, 7):
        tracker.add(tag)
    tracker.confirm(1)
    tracker.held.add(2)           # refused: held while its queue backs off
    tracker.confirm_all([(3, None), (5, None)])
    assert tracker.take_ackable() == (1, 1)   # multiple=True up to 1 only: 2 is held
    assert tracker.head_held()
    assert tracker.take_singles() == [3, 5]
    assert tracker.take_ackable() == (0, 0)
    assert tracker.in_flight == 3              # 2 (held), 4, 6

    tracker.held.discard(2)                    # produced again, and Kafka took it
    tracker.confirm_all([(2, None), (4, None), (6, None)])
    assert not tracker.head_held()
    assert tracker.take_ackable() == (6, 3)
    assert tracker.in_flight == 0


class RefusingProducer:
    """A producer whose client already knows the topic is denied: produce() raises at once."""

    def produce(self, *args, **kwargs):
        from confluent_kafka import KafkaError, KafkaException
        raise KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED,
                                        "Unable to produce message: Broker: Topic authorization failed"))


def test_the_relay_logs_one_feedback_refusal_whether_produce_or_a_delivery_report_says_it():
    """The same denial worded two ways (produce() raising, then a delivery report) is one kind
    of refusal: the relay's once-a-minute warning came twice (CI, 2026-12-04)."""
    from confluent_kafka import KafkaError

    from bridge.state_store import FeedbackWriter
    from common.config import Settings

    writer = FeedbackWriter(Settings(), RefusingProducer(), {})
    writer.final("D1", "c1", "succeeded", "", 0)
    writer.on_delivery(writer.connection, None, KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED),
                       None)
    assert len(writer.failed) == 2
    backoff = QueueBackoff(cap=60.0)
    assert [backoff.should_log(error, now=0.0) for error in writer.failed] == [True, False]
