"""The publisher's page and JSON REST API, over the simulator and admin link the app owns."""
from __future__ import annotations

import hmac
import logging
from concurrent.futures import TimeoutError as FutureTimeout

from flask import Blueprint, abort, current_app, jsonify, render_template, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from werkzeug.exceptions import HTTPException

from common.web import prometheus_text

from publisher.admin_link import BrokerUnavailable
from common.devices import STATUSES, DeviceConfig
from publisher.simulator import DuplicateDevice, UnknownDevice
from rabbitmq import naming

LOGGER = logging.getLogger(__name__)
MAX_TEXT = 1000  # characters in an operator or broadcast message
COMMAND_TIMEOUT = 10.0  # seconds a request waits for the scheduler or RabbitMQ

api = Blueprint("api", __name__)


def simulator():
    """The app's device simulator."""
    return current_app.extensions["publisher"].simulator


def admin():
    """The app's AMQP admin link."""
    return current_app.extensions["publisher"].admin


def real_devices() -> dict:
    """The enrolled devices the simulator does not run (id -> DeviceConfig)."""
    return current_app.extensions["publisher"].real_devices


def wait(future):
    """The result of a simulator command, or 503 when the scheduler does not answer in time."""
    try:
        return future.result(COMMAND_TIMEOUT)
    except FutureTimeout:
        abort(503, "the device scheduler did not answer in time")


def known(device: str) -> str:
    """`device` if it is a valid id of a running device, else 400 or 404."""
    if not naming.is_valid_device_id(device):
        abort(400, f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -")
    if device not in simulator():
        abort(404, f"unknown device {device}")
    return device


def json_object() -> dict:
    """The request body as a JSON object, else 400."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(400, "the body must be a JSON object")
    return body


# -- guards on every state-changing call, and JSON errors, for the whole app ---------------------

@api.before_app_request
def guard_state_changes():
    """Bearer token (when set), body size and JSON content type on POST, PUT, PATCH, DELETE."""
    if request.method not in ("POST", "PUT", "PATCH", "DELETE"):
        return None
    token = current_app.config["API_TOKEN"]
    if token:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = jsonify(message="missing or wrong bearer token")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="publisher"'
            return response
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length and request.content_length > limit:
        abort(413, f"the body is larger than {limit} bytes")
    body = request.get_data(cache=True)  # also enforces the limit on bodies without a length
    if request.method == "DELETE" and not body:
        return None
    if request.mimetype != "application/json":
        abort(415, "Content-Type must be application/json")
    return None


@api.app_errorhandler(HTTPException)
def json_error(error: HTTPException):
    """Every HTTP error as a JSON object with a message."""
    response = jsonify(message=error.description or error.name, error=error.name)
    response.status_code = error.code or 500
    return response


@api.app_errorhandler(BrokerUnavailable)
def broker_unavailable(error):
    """RabbitMQ unreachable or refusing: 503."""
    return jsonify(message=str(error), error="RabbitMQ unavailable"), 503


@api.app_errorhandler(Exception)
def unexpected(error):
    """Anything else: logged, 500 with a JSON body."""
    LOGGER.exception("%s %s failed", request.method, request.path)
    return jsonify(message=f"internal error: {error}", error="Internal Server Error"), 500


# -- the page --------------------------------------------------------------------------------------

@api.get("/")
def index():
    """The device list with toggles, add/remove and broadcast forms."""
    return render_template("index.html", devices=simulator().snapshot(),
                           consumer_url=current_app.config["CONSUMER_URL"],
                           token_required=bool(current_app.config["API_TOKEN"]))


@api.get("/favicon.ico")
def favicon():
    """A small icon (static/favicon.svg), so that the browser's request for it is answered."""
    response = current_app.send_static_file("favicon.svg")
    response.headers["Cache-Control"] = "max-age=86400"
    return response


# -- status (the seed's API) -----------------------------------------------------------------------

@api.post("/status/<device>")
def update_status(device):
    """Make a device Active or Inactive."""
    known(device)
    body = json_object()
    status = body.get("status")
    if status not in STATUSES:
        return jsonify(message="Invalid status",
                       error='status must be "Active" or "Inactive"'), 400
    try:
        wait(simulator().set_status(device, status))
    except UnknownDevice:
        abort(404, f"unknown device {device}")
    return jsonify(message=f"Status of {device} updated to {status}"), 200


@api.get("/status/<device>")
def get_status(device):
    """A device's status."""
    known(device)
    snapshot = simulator().device(device) or abort(404, f"unknown device {device}")
    return jsonify(id=device, status=snapshot["status"])


# -- devices ---------------------------------------------------------------------------------------

@api.get("/devices")
def list_devices():
    """Every device with status, message count and last message time."""
    return jsonify(devices=simulator().snapshot(), stats=simulator().stats(),
                   enrolled=[config.to_json() for config in real_devices().values()])


@api.get("/metrics")
def metrics():
    """Prometheus text: each device's interval (what the DeviceSilent alert allows), status,
    connection and message counts."""
    labels = ["device"]
    interval = GaugeMetricFamily("webos_publisher_device_interval_seconds",
                                 "Longest pause between two messages of an Active device",
                                 labels=labels)
    active = GaugeMetricFamily("webos_publisher_device_active", "1 while the device is Active",
                               labels=labels)
    connected = GaugeMetricFamily("webos_publisher_device_connected",
                                  "1 while the device's MQTT connection is up", labels=labels)
    published = CounterMetricFamily("webos_publisher_messages", "Messages the device published",
                                    labels=labels)
    acked = CounterMetricFamily("webos_publisher_acked", "Messages RabbitMQ acknowledged (PUBACK)",
                                labels=labels)
    dropped = CounterMetricFamily("webos_publisher_dropped",
                                  "Messages dropped while RabbitMQ was unreachable or blocking "
                                  "(the device's buffer was full)", labels=labels)
    waiting = GaugeMetricFamily("webos_publisher_waiting",
                                "Messages the device holds until RabbitMQ acknowledges them (its "
                                "buffer, at most --max-queued)", labels=labels)
    for device in simulator().snapshot():
        label = [device["id"]]
        interval.add_metric(label, max(device["interval"]))
        active.add_metric(label, int(device["status"] == "Active"))
        connected.add_metric(label, int(bool(device["connected"])))
        published.add_metric(label, device["messages"])
        acked.add_metric(label, device["acked"])
        dropped.add_metric(label, device["dropped"])
        waiting.add_metric(label, device["messages"] - device["acked"])
    return prometheus_text([interval, active, connected, published, acked, dropped, waiting])


@api.get("/devices/<device>")
def get_device(device):
    """One device."""
    known(device)
    return jsonify(simulator().device(device) or abort(404, f"unknown device {device}"))


@api.post("/devices")
def add_device():
    """Add a device at runtime: its certificate, broker user and queue first, then the simulator
    runs it; with "simulated": false only that (a real device, which connects on its own)."""
    body = json_object()
    try:
        config = DeviceConfig.from_json(body)
    except ValueError as error:
        abort(400, str(error))
    if config.id in simulator() or config.id in real_devices():
        abort(409, f"device {config.id} exists already")
    admin().enrol([config.id])
    admin().declare_devices([config.id])
    if not config.simulated:
        real_devices()[config.id] = config
        settings = current_app.config["SETTINGS"]
        response = jsonify(message=f"Device {config.id} enrolled (not simulated): give it "
                                   f"{settings.pki_path}/ca.crt and devices/{config.id}.crt and "
                                   ".key; it connects on its own", device=config.to_json())
        response.status_code = 201
        response.headers["Location"] = f"/devices/{config.id}"
        return response
    try:
        snapshot = wait(simulator().add_device(config))
    except DuplicateDevice:
        abort(409, f"device {config.id} exists already")
    response = jsonify(message=f"Device {config.id} added", device=snapshot)
    response.status_code = 201
    response.headers["Location"] = f"/devices/{config.id}"
    return response


@api.delete("/devices/<device>")
def remove_device(device):
    """Stop a device and revoke it (its broker user and certificate go, so it can no longer
    connect); `?delete_queue=true` also deletes its queue (kept by default)."""
    delete_queue = request.args.get("delete_queue", "false").lower()
    if delete_queue not in ("true", "false", "1", "0"):
        abort(400, "delete_queue must be true or false")
    real = real_devices().pop(device, None) if naming.is_valid_device_id(device) else None
    if real is None:
        known(device)
    try:
        if real is None:
            wait(simulator().remove_device(device))
    except UnknownDevice:
        abort(404, f"unknown device {device}")
    admin().remove_enrolment(device)
    if delete_queue in ("true", "1"):
        admin().delete_device_queue(device)
    return jsonify(message=f"Device {device} removed", queue_deleted=delete_queue in ("true", "1"))


@api.post("/devices/<device>/messages")
def send_message(device):
    """One operator message (info, warning or error) published as the device."""
    known(device)
    body = json_object()
    message_type = body.get("type", "info")
    text = body.get("text")
    if message_type not in naming.MESSAGE_TYPES:
        abort(400, f"type must be one of {', '.join(naming.MESSAGE_TYPES)}")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        abort(400, f"text must be a non-empty string of at most {MAX_TEXT} characters")
    try:
        payload = wait(simulator().send_message(device, message_type, text))
    except UnknownDevice:
        abort(404, f"unknown device {device}")
    return jsonify(message=f"{message_type} message sent for {device}", payload=payload), 202


@api.post("/broadcast")
def broadcast():
    """An emergency message to every device queue (webos.fanout) and every device session."""
    body = json_object()
    text = body.get("message")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        abort(400, f"message must be a non-empty string of at most {MAX_TEXT} characters")
    payload = admin().broadcast(text)
    reached = ("and to every device session" if payload["devices_reached"]
               else "(no device session is subscribed to webos/broadcast/command)")
    return jsonify(message=f"Broadcast sent to every queue on {naming.FANOUT_EXCHANGE} {reached}",
                   payload=payload), 202
