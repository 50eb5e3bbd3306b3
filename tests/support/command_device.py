"""A device that takes commands, for the tests: paho 2.x with a persistent session (MQTT 5
Session Expiry, or 3.1.1 clean session off), QoS 1 subscriptions to its command topic and the
broadcast, manual acks after the command was applied and answered, and the simulator's own
command logic (publisher/device_commands.py)."""
from __future__ import annotations

import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from common.config import Settings
from common.pki import PKI, client_context
from publisher.device_commands import DeviceCommands
from rabbitmq import naming

SESSION_EXPIRY = 3600  # s


class CommandDevice:
    """Connects as `device` (its certificate), applies commands, answers on its reply topic;
    `applied` lists the command ids it applied, in order."""

    def __init__(self, settings: Settings, device: str, protocol: int = mqtt.MQTTv5,
                 subscribe: bool = True):
        self.settings = settings
        self.device = device
        self.protocol = protocol
        self.subscribe = subscribe
        self.status, self.interval = "Active", (1.0, 2.0)
        self.commands = DeviceCommands(self._set_status, self._set_interval, self._reported)
        self.applied: list[str] = []
        self.correlations: list[bytes] = []
        self.subscribed = threading.Event()
        self.granted: list = []
        self.client: mqtt.Client | None = None

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.device,
                             protocol=self.protocol, manual_ack=True,
                             clean_session=False if self.protocol == mqtt.MQTTv311 else None)
        client.tls_set_context(client_context(self.settings.ca_file,
                                              PKI(self.settings.pki_path).device(self.device)))
        client.on_connect = self.on_connect
        client.on_subscribe = self.on_subscribe
        client.on_message = self.on_message
        return client

    def connect(self) -> "CommandDevice":
        """Connect (resuming its session) and start paho's loop."""
        self.client = self._client()
        extra = {}
        if self.protocol == mqtt.MQTTv5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = SESSION_EXPIRY
            extra = {"clean_start": False, "properties": properties}
        self.client.connect(self.settings.rabbitmq_host, self.settings.mqtt_port, 30, **extra)
        self.client.loop_start()
        return self

    def disconnect(self) -> None:
        """Disconnect; the session (and what is sent to it meanwhile) stays with the broker."""
        self.client.disconnect()
        self.client.loop_stop()
        self.subscribed.clear()

    def on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code == 0 and self.subscribe:
            client.subscribe([(naming.command_topic(self.device), 1),
                              (naming.command_topic(naming.BROADCAST), 1)])

    def on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.granted = list(reason_codes)
        self.subscribed.set()

    def on_message(self, client, userdata, message):
        correlation = getattr(message.properties, "CorrelationData", None) if message.properties else None
        if correlation:
            self.correlations.append(correlation)
        answer = self.commands.handle(message.payload)
        if answer is not None:
            self.applied.append(answer.command_id)
            client.publish(naming.reply_topic(self.device), answer.to_json(), qos=1)
        client.ack(message.mid, message.qos)  # after applying: a crash before this redelivers

    def _set_status(self, status):
        self.status = status

    def _set_interval(self, interval):
        self.interval = interval

    def _reported(self) -> dict:
        return {"status": self.status, "interval": list(self.interval)}
