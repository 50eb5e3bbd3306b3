"""The audit's arithmetic (bench/audit.py), without brokers: what counts as missing, duplicated,
out of order, and when a run is ok."""
from __future__ import annotations

import pytest

from bench.audit import _ranges, audit_device, audit_records


def arrivals(*seqs, prefix="m"):
    """(seq, msg_id) pairs with one msg_id per seq, as a publisher makes them."""
    return [(seq, f"{prefix}{seq}") for seq in seqs]


def test_complete_in_order_stream_is_ok():
    row = audit_device("D", 5, arrivals(1, 2, 3, 4, 5))
    assert (row.arrived, row.records, row.missing, row.duplicated, row.out_of_order) == \
        (5, 5, [], 0, 0)
    assert row.ok


def test_missing_seqs_are_named_and_fail_the_audit():
    row = audit_device("D", 6, arrivals(1, 2, 5))
    assert row.missing == [3, 4, 6]
    assert not row.ok


def test_redelivered_window_is_duplicated_not_out_of_order():
    # A bridge killed after forwarding 3 and 4 but before acking them: 3, 4 come again.
    row = audit_device("D", 6, arrivals(1, 2, 3, 4, 3, 4, 5, 6))
    assert (row.duplicated, row.out_of_order, row.missing) == (2, 0, [])
    assert row.ok


def test_a_first_arrival_behind_a_later_seq_is_out_of_order():
    row = audit_device("D", 5, arrivals(1, 2, 5, 3, 4))
    assert row.out_of_order == 2
    assert row.disorder == [(3, 5), (4, 5)]
    assert not row.ok


@pytest.mark.parametrize("records, unexpected, duplicated", [
    ([(0, "a"), (1, "b")], 1, 0),        # seq 0 was never published
    ([(1, "b"), (9, "z")], 1, 0),        # beyond the last published seq
    ([(1, "b"), (1, "c")], 0, 1),        # same seq, another msg_id: counted as a duplicate
], ids=["seq-0", "beyond-published", "seq-reused"])
def test_records_that_fit_no_published_message_are_reported(records, unexpected, duplicated):
    row = audit_device("D", 1, records)
    assert (row.unexpected, row.duplicated, row.missing) == (unexpected, duplicated, [])


def test_report_totals_and_ok_over_devices():
    report = audit_records({"A": {"seq": 3, "acked": 3, "dropped": 0}, "B": 2, "C": 1},
                           {"A": arrivals(1, 2, 3, 3), "B": arrivals(2, 1, prefix="b")},
                           topic="t", foreign=1)
    assert report.totals() == {
        "devices": 3, "published": 6, "acked": 3, "dropped": 0, "arrived": 5, "records": 6,
        "missing": 1, "duplicated": 1, "out_of_order": 1, "unexpected": 0, "foreign": 1,
        "ok": False}
    assert "C: published 1, arrived 0, missing 1" in report.summary()
    document = report.to_json()
    assert document["topic"] == "t" and document["missing"] == 1
    assert {row["device"]: row["missing"] for row in document["devices"]}["C"] == "1"


def test_a_device_with_nothing_published_and_nothing_arrived_is_ok():
    assert audit_records({"A": 0}, {}).ok


@pytest.mark.parametrize("seqs, text", [
    ([], ""), ([4], "4"), ([1, 2, 3, 7], "1-3,7"), ([9, 8, 1], "1,8-9"),
])
def test_missing_seqs_print_as_ranges(seqs, text):
    assert _ranges(seqs) == text
