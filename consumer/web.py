"""`python -m consumer serve`: the live page, fed by server-sent events from one Kafka consumer."""
from __future__ import annotations

import argparse
import logging

from flask import Flask

from common.config import Settings, load_settings
from common.web import add_listen_arguments, serve
from consumer.command_line import CommandProducer
from consumer.kafka_group import LIVE_VIEW_GROUP
from consumer.live_feed import LiveFeed
from consumer.views import live

LOGGER = logging.getLogger(__name__)


def create_app(config: dict | None = None) -> Flask:
    """The live view. config: SETTINGS, KAFKA_TOPIC, PRESENCE_TOPIC and STATE_TOPIC ("" for
    none), KAFKA_GROUP, REPLAY, START_FEED. The app owns its Kafka feed and command sender."""
    app = Flask(__name__)
    app.config.update({"SETTINGS": None, "KAFKA_TOPIC": None, "PRESENCE_TOPIC": None,
                       "STATE_TOPIC": None, "KAFKA_GROUP": LIVE_VIEW_GROUP, "REPLAY": 200,
                       "START_FEED": True})
    app.config.update(config or {})
    settings: Settings = app.config["SETTINGS"] or load_settings()
    presence, state = app.config["PRESENCE_TOPIC"], app.config["STATE_TOPIC"]
    feed = LiveFeed(settings.kafka_client(), app.config["KAFKA_TOPIC"] or settings.kafka_topic,
                    group=app.config["KAFKA_GROUP"], replay=app.config["REPLAY"],
                    presence_topic=settings.presence_topic if presence is None else presence,
                    state_topic=settings.state_topic if state is None else state)
    app.extensions["live_feed"] = feed
    app.extensions["commands"] = CommandProducer(settings)
    if app.config["START_FEED"]:
        feed.start()
    app.register_blueprint(live)
    return app


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m consumer serve",
        description="Live page of the device stream: a map of every device coloured by status, "
                    "the last message time and rate per device, a rolling message log and the "
                    "group's lag per partition, pushed to the browser by server-sent events.")
    add_listen_arguments(parser, settings.bind_host, settings.consumer_port, "WEBOS_CONSUMER_PORT")
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

    def stop() -> None:
        feed.stop()
        app.extensions["commands"].close()
    return serve(app, args.host, args.port, stop, "live view",
                 f" (topic {args.topic}, group {args.group})")
