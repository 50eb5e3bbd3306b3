"""RabbitMQ's CPU for N devices, split into what they cost connected and what their messages
cost: `python -m bench.broker_cpu --devices 1000`.

On a RabbitMQ node of its own (bench.publisher_scale.own_rabbitmq), the devices enrolled, then
three windows of --seconds each: none connected; all connected and silent (Inactive: keepalives,
statistics, timers); all publishing at the seed's cadence. For each: the node's CPU (user and
system, % of one core, from the OS) and its threads' voluntary context switches per second (how
often the VM went to sleep and was woken); for the last, per acknowledged message.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import listening_process, sigterm_as_interrupt, thread_times
from bench.publisher_scale import INTERVAL, enrol, own_rabbitmq
from common import config
from common.devices import ACTIVE, INACTIVE, DeviceConfig
from publisher.simulator import Simulator
from stack.local import fresh_settings

LOGGER = logging.getLogger("bench.broker_cpu")


def context_switches(process: psutil.Process) -> int:
    """Voluntary context switches of all of a process's threads so far."""
    return sum(switches for _, _, switches in thread_times(process.pid).values())


def window(broker: psutil.Process, seconds: float, acked=None) -> dict:
    """The broker's CPU and context switches over `seconds`; per message when `acked` (a
    function returning the acknowledged count so far) is given."""
    before, switches = broker.cpu_times(), context_switches(broker)
    acked_before = acked() if acked is not None else 0
    time.sleep(seconds)  # the measurement window itself
    after = broker.cpu_times()
    user, system = after.user - before.user, after.system - before.system
    figures = {"user_percent": round(100 * user / seconds, 1),
               "system_percent": round(100 * system / seconds, 1),
               "context_switches_per_s": round((context_switches(broker) - switches) / seconds)}
    if acked is not None:
        messages = acked() - acked_before
        figures["acked_per_s"] = round(messages / seconds, 1)
        figures["cpu_us_per_ack"] = round(1e6 * (user + system) / messages) if messages else None
        figures["context_switches_per_ack"] = (round(figures["context_switches_per_s"]
                                                     / figures["acked_per_s"], 1)
                                               if messages else None)
    return figures


def measure(devices: int, seconds: float) -> dict:
    base = Path(tempfile.mkdtemp(prefix="webos-bench-broker-cpu-"))
    try:
        with own_rabbitmq(fresh_settings(base), "cpu") as settings:
            names = [f"cpu-{i:05d}" for i in range(devices)]
            enrol(settings, names)
            broker = listening_process(settings.mqtt_port)
            result = {"devices": devices, "seconds": seconds,
                      "none_connected": window(broker, seconds)}
            simulator = Simulator(settings, [DeviceConfig(name, interval=INTERVAL, status=INACTIVE)
                                             for name in names])
            try:
                simulator.start()
                while simulator.stats()["connected"] < devices:
                    time.sleep(0.5)  # polling the simulator's count; it connects on its own threads
                result["connected_silent"] = window(broker, seconds)
                for name in names:
                    simulator.set_status(name, ACTIVE)
                time.sleep(INTERVAL[1])  # every device has started its cadence
                result["publishing"] = window(broker, seconds, lambda: simulator.stats()["acked"])
            finally:
                simulator.close()
            return result
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.broker_cpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000, help="simulated TLS devices (1000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="each window's length (20)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for quiet in ("pika", "publisher.simulator"):
        logging.getLogger(quiet).setLevel(logging.WARNING)
    sigterm_as_interrupt()  # SIGTERM stops the node too
    result = measure(args.devices, args.seconds)
    for name in ("none_connected", "connected_silent", "publishing"):
        print(f"{name:>17}: " + ", ".join(f"{k} {v}" for k, v in result[name].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    config.run(main)
