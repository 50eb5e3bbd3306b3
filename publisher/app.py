"""The publisher's Flask app: a page and a JSON REST API over the device simulator."""
from __future__ import annotations

import hmac
import logging
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Flask, abort, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from publisher.admin_link import AdminLink, BrokerUnavailable
from publisher.devices import (DEFAULT_DEVICES_FILE, MQTT_VERSIONS, STATUSES, DeviceConfig,
                               DuplicateDevice,
                               Simulator, UnknownDevice, load_devices)
from rabbitmq import topology
from stack.config import environment, load_settings

LOGGER = logging.getLogger(__name__)
MAX_TEXT = 1000  # characters in an operator or broadcast message
COMMAND_TIMEOUT = 10.0  # seconds a request waits for the scheduler or RabbitMQ


class Publisher:
    """What the app owns: the simulator and the AMQP admin link; `close()` stops both."""

    def __init__(self, simulator: Simulator, admin: AdminLink):
        self.simulator = simulator
        self.admin = admin

    def close(self) -> None:
        """Stop publishing, disconnect every device, close the AMQP connection."""
        self.simulator.close()
        self.admin.close()


def create_app(config=None) -> Flask:
    """Build the app, declare the configured devices' queues, start the simulator."""
    app = Flask(__name__)
    app.config.from_mapping(
        MAX_CONTENT_LENGTH=64 * 1024,
        API_TOKEN=environment().get("PUBLISHER_API_TOKEN") or None,  # .env counts too
        SETTINGS=None,            # stack.config.Settings; default load_settings()
        DEVICES=None,             # list of DeviceConfig; default from DEVICES_FILE
        DEVICES_FILE=str(DEFAULT_DEVICES_FILE),
        INTERVAL=None,            # (min, max) seconds overriding the file's intervals
        MAX_QUEUED_MESSAGES=1000,  # per device, while RabbitMQ is unreachable
        MQTT_VERSION=MQTT_VERSIONS[0],
        CONSUMER_URL=None,        # link to the consumer's live view
        DECLARE_QUEUES=True,      # declare the configured devices' queues at start
    )
    if config:
        app.config.update(config)
    app.json.sort_keys = False  # payload-shaped answers keep their key order
    settings = app.config["SETTINGS"] or load_settings()
    devices = app.config["DEVICES"]
    if devices is None:
        devices = load_devices(app.config["DEVICES_FILE"], app.config["INTERVAL"])
    consumer_url = app.config["CONSUMER_URL"] or f"http://127.0.0.1:{settings.consumer_port}/"

    admin = AdminLink(settings)
    if app.config["DECLARE_QUEUES"] and devices:
        try:
            admin.declare_devices([d.id for d in devices])  # queues exist before any message
        except Exception:
            admin.close()
            raise
    simulator = Simulator(settings, devices, max_queued_messages=app.config["MAX_QUEUED_MESSAGES"],
                          mqtt_version=app.config["MQTT_VERSION"])
    simulator.start()
    publisher = Publisher(simulator, admin)
    app.extensions["publisher"] = publisher

    def wait(future):
        try:
            return future.result(COMMAND_TIMEOUT)
        except FutureTimeout:
            abort(503, "the device scheduler did not answer in time")

    def known(device: str) -> str:
        if not topology.is_valid_device_id(device):
            abort(400, f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -")
        if device not in simulator:
            abort(404, f"unknown device {device}")
        return device

    def json_object() -> dict:
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            abort(400, "the body must be a JSON object")
        return body

    # -- guards on every state-changing call ---------------------------------------------

    @app.before_request
    def guard_state_changes():
        if request.method not in ("POST", "PUT", "PATCH", "DELETE"):
            return None
        token = app.config["API_TOKEN"]
        if token:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                response = jsonify(message="missing or wrong bearer token")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Bearer realm="publisher"'
                return response
        if request.content_length and request.content_length > app.config["MAX_CONTENT_LENGTH"]:
            abort(413, f"the body is larger than {app.config['MAX_CONTENT_LENGTH']} bytes")
        body = request.get_data(cache=True)  # also enforces the limit on bodies without a length
        if request.method == "DELETE" and not body:
            return None
        if request.mimetype != "application/json":
            abort(415, "Content-Type must be application/json")
        return None

    @app.errorhandler(HTTPException)
    def json_error(error: HTTPException):
        response = jsonify(message=error.description or error.name, error=error.name)
        response.status_code = error.code or 500
        return response

    @app.errorhandler(BrokerUnavailable)
    def broker_unavailable(error):
        return jsonify(message=str(error), error="RabbitMQ unavailable"), 503

    @app.errorhandler(Exception)
    def unexpected(error):
        LOGGER.exception("%s %s failed", request.method, request.path)
        return jsonify(message=f"internal error: {error}", error="Internal Server Error"), 500

    # -- the page ----------------------------------------------------------------------------

    @app.get("/")
    def index():
        """The device list with toggles, add/remove and broadcast forms."""
        return render_template("index.html", devices=simulator.snapshot(),
                               consumer_url=consumer_url,
                               token_required=bool(app.config["API_TOKEN"]))

    # -- status (the seed's API) -------------------------------------------------------------

    @app.post("/status/<device>")
    def update_status(device):
        """Make a device Active or Inactive."""
        known(device)
        body = json_object()
        status = body.get("status")
        if status not in STATUSES:
            return jsonify(message="Invalid status",
                           error='status must be "Active" or "Inactive"'), 400
        try:
            wait(simulator.set_status(device, status))
        except UnknownDevice:
            abort(404, f"unknown device {device}")
        return jsonify(message=f"Status of {device} updated to {status}"), 200

    @app.get("/status/<device>")
    def get_status(device):
        """A device's status."""
        known(device)
        snapshot = simulator.device(device) or abort(404, f"unknown device {device}")
        return jsonify(id=device, status=snapshot["status"])

    # -- devices -----------------------------------------------------------------------------

    @app.get("/devices")
    def list_devices():
        """Every device with status, message count and last message time."""
        return jsonify(devices=simulator.snapshot(), stats=simulator.stats())

    @app.get("/devices/<device>")
    def get_device(device):
        """One device."""
        known(device)
        return jsonify(simulator.device(device) or abort(404, f"unknown device {device}"))

    @app.post("/devices")
    def add_device():
        """Add a device at runtime: its queue is declared first, then it starts publishing."""
        body = json_object()
        try:
            config = DeviceConfig.from_json(body)
        except ValueError as error:
            abort(400, str(error))
        if config.id in simulator:
            abort(409, f"device {config.id} exists already")
        admin.declare_devices([config.id])
        try:
            snapshot = wait(simulator.add_device(config))
        except DuplicateDevice:
            abort(409, f"device {config.id} exists already")
        response = jsonify(message=f"Device {config.id} added", device=snapshot)
        response.status_code = 201
        response.headers["Location"] = f"/devices/{config.id}"
        return response

    @app.delete("/devices/<device>")
    def remove_device(device):
        """Stop a device; `?delete_queue=true` also deletes its queue (kept by default)."""
        known(device)
        delete_queue = request.args.get("delete_queue", "false").lower()
        if delete_queue not in ("true", "false", "1", "0"):
            abort(400, "delete_queue must be true or false")
        try:
            wait(simulator.remove_device(device))
        except UnknownDevice:
            abort(404, f"unknown device {device}")
        if delete_queue in ("true", "1"):
            admin.delete_device_queue(device)
        return jsonify(message=f"Device {device} removed", queue_deleted=delete_queue in ("true", "1"))

    @app.post("/devices/<device>/messages")
    def send_message(device):
        """One operator message (info, warning or error) published as the device."""
        known(device)
        body = json_object()
        message_type = body.get("type", "info")
        text = body.get("text")
        if message_type not in topology.MESSAGE_TYPES:
            abort(400, f"type must be one of {', '.join(topology.MESSAGE_TYPES)}")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            abort(400, f"text must be a non-empty string of at most {MAX_TEXT} characters")
        try:
            payload = wait(simulator.send_message(device, message_type, text))
        except UnknownDevice:
            abort(404, f"unknown device {device}")
        return jsonify(message=f"{message_type} message sent for {device}", payload=payload), 202

    @app.post("/broadcast")
    def broadcast():
        """An emergency message to every device queue, through webos.fanout."""
        body = json_object()
        text = body.get("message")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            abort(400, f"message must be a non-empty string of at most {MAX_TEXT} characters")
        payload = admin.broadcast(text)
        return jsonify(message=f"Broadcast sent to every queue on {topology.FANOUT_EXCHANGE}",
                       payload=payload), 202

    return app
