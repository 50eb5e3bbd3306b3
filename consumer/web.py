"""`python -m consumer serve`: the live page, fed by server-sent events from one Kafka consumer."""
from __future__ import annotations

import argparse
import json
import logging
import queue

from flask import Flask, Response, jsonify, render_template, stream_with_context
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from consumer.kafka_group import LIVE_VIEW_GROUP
from consumer.live_feed import LiveFeed
from common.config import Settings, load_settings
from common.web import prometheus_text, serve

LOGGER = logging.getLogger(__name__)
KEEPALIVE_SECONDS = 5.0


def sse(event: str, data) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(config: dict | None = None) -> Flask:
    """The live view. config: SETTINGS, KAFKA_TOPIC, PRESENCE_TOPIC ("" for none), KAFKA_GROUP,
    REPLAY, START_FEED."""
    app = Flask(__name__)
    app.config.update({"SETTINGS": None, "KAFKA_TOPIC": None, "PRESENCE_TOPIC": None,
                       "KAFKA_GROUP": LIVE_VIEW_GROUP, "REPLAY": 200, "START_FEED": True})
    app.config.update(config or {})
    settings: Settings = app.config["SETTINGS"] or load_settings()
    presence = app.config["PRESENCE_TOPIC"]
    feed = LiveFeed(settings.kafka_client(), app.config["KAFKA_TOPIC"] or settings.kafka_topic,
                    group=app.config["KAFKA_GROUP"], replay=app.config["REPLAY"],
                    presence_topic=settings.presence_topic if presence is None else presence)
    app.extensions["live_feed"] = feed
    if app.config["START_FEED"]:
        feed.start()

    @app.get("/")
    def index():
        """The live page."""
        return render_template("index.html", topic=feed.topic, group=feed.group)

    @app.get("/events")
    def events():
        """Server-sent events: one `snapshot`, then `record`, `presence` and `stats` events as
        they happen."""
        client, snapshot = feed.subscribe()

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
                feed.unsubscribe(client)

        return Response(stream_with_context(stream()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/state")
    def state():
        """The same snapshot the page starts from, as JSON."""
        return jsonify(feed.snapshot())

    @app.get("/api/lag")
    def lag():
        """The live view group's lag per partition (refreshed every second)."""
        snapshot = feed.snapshot()
        return jsonify({"group": feed.group, "topic": feed.topic, "partitions": snapshot["lag"],
                        "total": sum(p["lag"] for p in snapshot["lag"]),
                        "error": snapshot["lag_error"]})

    @app.get("/metrics")
    def metrics():
        """Prometheus text: the group's lag per partition, and per device the time of its last
        message, whether its last message said Active, and whether it is connected (presence)."""
        snapshot = feed.snapshot()
        lag = GaugeMetricFamily("webos_consumer_group_lag",
                                "Records of the topic the live view's group has not committed",
                                labels=["group", "topic", "partition"])
        for partition in snapshot["lag"]:
            lag.add_metric([feed.group, feed.topic, str(partition["partition"])], partition["lag"])
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

    @app.get("/healthz")
    def healthz():
        """200 while the Kafka consumer thread runs."""
        alive = feed.thread.is_alive()
        return jsonify({"feed": "running" if alive else "stopped"}), 200 if alive else 503

    return app


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m consumer serve",
        description="Live page of the device stream: a map of every device coloured by status, "
                    "the last message time and rate per device, a rolling message log and the "
                    "group's lag per partition, pushed to the browser by server-sent events.")
    parser.add_argument("--host", default=settings.bind_host,
                        help="address to listen on (default %(default)s, WEBOS_BIND_HOST)")
    parser.add_argument("--port", type=int, default=settings.consumer_port,
                        help="port (default WEBOS_CONSUMER_PORT, %(default)s)")
    parser.add_argument("--topic", default=settings.kafka_topic, help="Kafka topic (default %(default)s)")
    parser.add_argument("--group", default=LIVE_VIEW_GROUP, help="consumer group (default %(default)s)")
    parser.add_argument("--replay", type=int, default=200,
                        help="records per partition replayed on start to show current state "
                        "(default %(default)s)")
    return parser


def main(argv=None) -> int:
    """Serve the live page until SIGINT/SIGTERM; exit 0 after a clean stop."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    args = build_parser(settings).parse_args(argv)
    app = create_app({"SETTINGS": settings, "KAFKA_TOPIC": args.topic, "KAFKA_GROUP": args.group,
                      "REPLAY": args.replay})
    feed: LiveFeed = app.extensions["live_feed"]
    return serve(app, args.host, args.port, feed.stop, "live view",
                 f" (topic {args.topic}, group {args.group})")
