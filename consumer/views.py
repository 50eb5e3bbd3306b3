"""The live view's routes: the page, its server-sent events, JSON state and lag, the desired
state of a device (a command through Kafka), /metrics and /healthz."""
from __future__ import annotations

import json
import logging
import queue

from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request
from flask import stream_with_context
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from werkzeug.exceptions import HTTPException

from common.devices import STATUSES
from common.web import prometheus_text
from rabbitmq import naming

LOGGER = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 5.0

live = Blueprint("live", __name__)


def feed():
    """The app's Kafka feed (consumer/live_feed.py)."""
    return current_app.extensions["live_feed"]


def sse(event: str, data) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


@live.app_errorhandler(HTTPException)
def json_error(error: HTTPException):
    """Every HTTP error as a JSON object with a message."""
    response = jsonify(message=error.description or error.name, error=error.name)
    response.status_code = error.code or 500
    return response


@live.get("/")
def index():
    """The live page."""
    return render_template("index.html", topic=feed().topic, group=feed().group)


@live.get("/favicon.ico")
def favicon():
    """A small icon, so that browsers stop asking (a green device dot)."""
    icon = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
            '<circle cx="8" cy="8" r="6" fill="#2e9d4a"/></svg>')
    return Response(icon, mimetype="image/svg+xml",
                    headers={"Cache-Control": "max-age=86400"})


@live.get("/events")
def events():
    """Server-sent events: one `snapshot`, then `record`, `presence` and `stats` events as they
    happen."""
    the_feed = feed()
    client, snapshot = the_feed.subscribe()

    def stream():
        try:
            yield "retry: 1000\n\n"
            yield sse("snapshot", snapshot)
            while True:
                try:
                    item = client.events.get(timeout=KEEPALIVE_SECONDS)
                except queue.Empty:
                    yield ": keepalive\n\n"
                    continue
                if item is None:
                    return
                yield sse(*item)
        finally:
            the_feed.unsubscribe(client)

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@live.get("/api/state")
def state():
    """The same snapshot the page starts from, as JSON."""
    return jsonify(feed().snapshot())


@live.post("/api/devices/<device>/desired")
def set_desired(device):
    """Ask a device to become Active or Inactive: a set-status command through Kafka (the relay
    raises the desired version and sends it); 202 with the command id. The page shows the device
    pending until it reports the new status."""
    if not naming.is_valid_device_id(device):
        abort(400, f"invalid device id {device!r}: use 1-64 of A-Z a-z 0-9 _ -")
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or body.get("status") not in STATUSES:
        abort(400, 'the body must be a JSON object {"status": "Active" | "Inactive"}')
    commands = current_app.extensions["commands"]
    command_id = commands.send(device, "set-status", {"status": body["status"]})
    LOGGER.info("asked %s to be %s (command %s)", device, body["status"], command_id)
    return jsonify(command_id=command_id, device=device, desired={"status": body["status"]}), 202


@live.get("/api/lag")
def lag():
    """The live view group's lag per partition (refreshed every second)."""
    snapshot = feed().snapshot()
    return jsonify({"group": feed().group, "topic": feed().topic,
                    "partitions": snapshot["lag"],
                    "total": sum(p["lag"] for p in snapshot["lag"]),
                    "error": snapshot["lag_error"]})


@live.get("/metrics")
def metrics():
    """Prometheus text: the group's lag per partition, and per device the time of its last
    message, whether its last message said Active, and whether it is connected (presence)."""
    the_feed = feed()
    snapshot = the_feed.snapshot()
    lag = GaugeMetricFamily("webos_consumer_group_lag",
                            "Records of the topic the live view's group has not committed",
                            labels=["group", "topic", "partition"])
    for partition in snapshot["lag"]:
        lag.add_metric([the_feed.group, the_feed.topic, str(partition["partition"])],
                       partition["lag"])
    records = CounterMetricFamily("webos_consumer_records", "Records the live view has read",
                                  value=snapshot["totals"]["records"])
    last = GaugeMetricFamily("webos_device_last_message_timestamp_seconds",
                             "Kafka timestamp of the device's last message", labels=["device"])
    active = GaugeMetricFamily("webos_device_active", "1 when its last message said Active",
                               labels=["device"])
    online = GaugeMetricFamily("webos_device_online",
                               "1 while connected to RabbitMQ (from webos.presence)",
                               labels=["device"])
    for device in snapshot["devices"]:
        if device["last_ts"]:
            last.add_metric([device["id"]], device["last_ts"] / 1000)
            active.add_metric([device["id"]], int(device["status"] == "Active"))
        if device["online"] is not None:
            online.add_metric([device["id"]], int(device["online"]))
    return prometheus_text([lag, records, last, active, online])


@live.get("/healthz")
def healthz():
    """200 while the Kafka consumer thread runs."""
    alive = feed().thread.is_alive()
    return jsonify({"feed": "running" if alive else "stopped"}), 200 if alive else 503
