"""The publisher's Flask app factory: it owns the device simulator and the AMQP admin link."""
from __future__ import annotations

from flask import Flask

from publisher.admin_link import AdminLink
from common.devices import DeviceConfig, load_devices
from publisher.simulator import MQTT_VERSIONS, Simulator
from publisher.views import api
from common.config import load_settings


class Publisher:
    """What the app owns: the simulator, the AMQP admin link, and the enrolled devices that are
    not simulated (real devices: enrolled here, connecting on their own); `close()` stops both."""

    def __init__(self, simulator: Simulator, admin: AdminLink, real_devices=()):
        self.simulator = simulator
        self.admin = admin
        self.real_devices: dict[str, DeviceConfig] = {d.id: d for d in real_devices}

    def close(self) -> None:
        """Stop publishing, disconnect every device, close the AMQP connection."""
        self.simulator.close()
        self.admin.close()


def create_app(config=None) -> Flask:
    """Build the app; unless START_SIMULATOR is False, declare the devices' queues and start."""
    app = Flask(__name__)
    app.config.from_mapping(
        MAX_CONTENT_LENGTH=64 * 1024,
        API_TOKEN=None,           # default: the setting PUBLISHER_API_TOKEN ("": no token)
        SETTINGS=None,            # common.config.Settings; default load_settings()
        DEVICES=None,             # list of DeviceConfig; default from DEVICES_FILE
        DEVICES_FILE=None,        # default: the setting WEBOS_DEVICES_FILE
        INTERVAL=None,            # (min, max) seconds overriding the file's intervals
        MAX_QUEUED_MESSAGES=1000,  # per device, while RabbitMQ is unreachable
        MQTT_VERSION=MQTT_VERSIONS[0],
        CONSUMER_URL=None,        # link to the consumer's live view
        PREPARE_DEVICES=True,     # enrol the configured devices and declare their queues at start
        START_SIMULATOR=True,     # False: touch no broker (no queues declared, no device runs)
        SIMULATOR=None,           # a simulator to use instead of building one (tests)
        ADMIN_LINK=None,          # an admin link to use instead of building one (tests)
    )
    if config:
        app.config.update(config)
    app.json.sort_keys = False  # payload-shaped answers keep their key order
    settings = app.config["SETTINGS"] = app.config["SETTINGS"] or load_settings()
    if app.config["API_TOKEN"] is None:
        app.config["API_TOKEN"] = settings.publisher_api_token
    if not app.config["CONSUMER_URL"]:
        app.config["CONSUMER_URL"] = f"http://127.0.0.1:{settings.consumer_port}/"
    simulator, devices = app.config["SIMULATOR"], []
    if simulator is None:
        devices = app.config["DEVICES"]
        if devices is None:
            devices = load_devices(app.config["DEVICES_FILE"] or settings.devices_path,
                                   app.config["INTERVAL"])
        simulator = Simulator(settings, [d for d in devices if d.simulated],
                              max_queued_messages=app.config["MAX_QUEUED_MESSAGES"],
                              mqtt_version=app.config["MQTT_VERSION"])
    admin = app.config["ADMIN_LINK"]
    if admin is None:
        admin = AdminLink(settings)  # it connects on first use
    if app.config["START_SIMULATOR"]:
        try:
            if app.config["PREPARE_DEVICES"] and devices:
                admin.enrol([d.id for d in devices])  # each device can log in as itself
                admin.declare_devices([d.id for d in devices])  # queues exist before any message
        except Exception:
            simulator.close()
            admin.close()
            raise
        simulator.start()
    app.extensions["publisher"] = Publisher(simulator, admin,
                                            [d for d in devices if not d.simulated])
    app.register_blueprint(api)
    return app
