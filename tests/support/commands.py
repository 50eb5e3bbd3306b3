"""Commands as the tests send them: the relay as a child process, the consumer's own
CommandSender and read_state (what `python -m consumer command|state` use), and what
mosquitto_sub prints for a subscription."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from common.config import Settings
from common.pki import PKI
from consumer.command_line import CommandSender, read_state  # noqa: F401 (for the tests)
from stack.process import AppProcess, wait_until


def start_relay(settings: Settings, log_path) -> AppProcess:
    """`python -m bridge relay` as a child, once it waits for commands."""
    relay = AppProcess(["bridge", "relay"], {**os.environ, **settings.to_env()}, log_path, "relay")
    wait_until(lambda: "waiting for commands" in relay.output(), 60,
               message="the relay to connect", watch=[relay])
    return relay


def mosquitto_sub(settings: Settings, device: str, topic: str) -> str:
    """What mosquitto_sub (MQTT 5, QoS 1, the device's certificate) prints subscribing to `topic`
    for two seconds."""
    if shutil.which("mosquitto_sub") is None:
        pytest.fail("mosquitto_sub is missing: `make install-test` installs mosquitto-clients")
    identity = PKI(settings.pki_path).device(device)
    done = subprocess.run(
        ["mosquitto_sub", "-h", settings.rabbitmq_host, "-p", str(settings.mqtt_port),
         "-V", "mqttv5", "-q", "1", "-t", topic, "-i", device, "-W", "2",
         "--cafile", str(settings.ca_file), "--cert", str(identity.cert),
         "--key", str(identity.key)], capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr
