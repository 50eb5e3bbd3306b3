"""The simulator's parts that need no broker: its schedule, the inbox other threads call it
through, and the whole simulator's calls with no broker to reach."""
from __future__ import annotations

import threading

import pytest

from common.config import Settings
from common.devices import ACTIVE, INACTIVE, DeviceConfig
from publisher.inbox import Inbox
from publisher.schedule import Job, Schedule
from publisher.simulator import DuplicateDevice, Simulator, UnknownDevice


def test_the_schedule_gives_what_is_due_earliest_first_and_ties_in_order():
    schedule = Schedule()
    schedule.add(2.0, Job.PUBLISH, "b", 1)
    schedule.add(1.0, Job.MISC, "a")
    schedule.add(2.0, Job.CONNECT, "c")
    schedule.add(5.0, Job.PUBLISH, "later")
    taken = []
    while (due := schedule.pop_due(2.0)) is not None:
        taken.append((due.link, due.job, due.generation))
    assert taken == [("a", Job.MISC, 0), ("b", Job.PUBLISH, 1), ("c", Job.CONNECT, 0)]
    assert len(schedule) == 1


@pytest.mark.parametrize("entries, now, wait", [((), 0.0, 0.5), ((3.0,), 2.9, 0.1),
                                               ((1.0,), 2.0, 0.0), ((9.0,), 0.0, 0.5)])
def test_the_loop_waits_until_the_next_entry_at_most_the_longest(entries, now, wait):
    schedule = Schedule()
    for due in entries:
        schedule.add(due, Job.MISC, "a")
    assert schedule.seconds_to_next(now, 0.5) == pytest.approx(wait)


def test_inbox_calls_run_on_the_thread_that_runs_them_and_errors_reach_the_caller():
    inbox = Inbox()
    try:
        result = inbox.submit(threading.get_ident)
        failed = inbox.submit(int, "not a number")
        runner = threading.Thread(target=inbox.run_calls)
        runner.start()
        runner.join()
        assert result.result(1) == runner.ident
        with pytest.raises(ValueError):
            failed.result(1)
        refused = inbox.submit(int, "1")
        inbox.refuse_calls("stopped")
        with pytest.raises(RuntimeError, match="stopped"):
            refused.result(1)
        inbox.take_wakeups()  # what the submits wrote is read, and nothing blocks
    finally:
        inbox.close()


@pytest.fixture
def simulator(tmp_path):
    """A simulator with one device and no broker to reach (port 1): it keeps retrying."""
    settings = Settings(mqtt_plain_port=1, pki_dir=str(tmp_path / "pki"))
    simulator = Simulator(settings, [DeviceConfig("U1", interval=(0.05, 0.05))], plain=True, seed=1)
    simulator.start()
    yield simulator
    simulator.close(10)


def test_without_a_broker_the_simulator_still_takes_calls(simulator):
    assert simulator.set_status("U1", INACTIVE).result(5) is True
    assert simulator.set_status("U1", INACTIVE).result(5) is False
    assert simulator.device("U1")["status"] == INACTIVE and not simulator.device("U1")["connected"]
    added = simulator.add_device(DeviceConfig("U2")).result(5)
    assert added["id"] == "U2" and added["status"] == ACTIVE
    with pytest.raises(DuplicateDevice):
        simulator.add_device(DeviceConfig("U2")).result(5)
    simulator.remove_device("U2").result(5)
    with pytest.raises(UnknownDevice):
        simulator.remove_device("U2").result(5)
    assert [d["id"] for d in simulator.snapshot()] == ["U1"]
    assert simulator.stats()["devices"] == 1


def test_a_closed_simulator_refuses_calls(simulator):
    simulator.close(10)
    with pytest.raises(RuntimeError, match="stopping"):
        simulator.set_status("U1", INACTIVE).result(5)
