"""`python -m publisher`: the device simulator with its page and REST API."""
from __future__ import annotations

import argparse
import gc
import logging


from common.devices import DeviceConfig, parse_interval
from publisher.simulator import MQTT_VERSIONS
from common.config import load_settings, run
from common.web import add_listen_arguments, serve

LOGGER = logging.getLogger("publisher")


def parse_args(argv, settings):
    """The command line; defaults come from common.config."""
    parser = argparse.ArgumentParser(
        prog="python -m publisher",
        description="Simulated devices publishing their positions over MQTT (one client each), "
                    "with a page and a JSON REST API to toggle, add and remove them. "
                    "State-changing calls need Content-Type: application/json and, when "
                    "PUBLISHER_API_TOKEN is set, 'Authorization: Bearer <token>'.")
    add_listen_arguments(parser, settings.bind_host, settings.publisher_port, "WEBOS_PUBLISHER_PORT")
    parser.add_argument("--devices-file", default=str(settings.devices_path),
                        help="JSON file with the devices, routes and intervals (default %(default)s)")
    parser.add_argument("--devices", help="comma-separated device ids to run instead of the file's "
                                          "(default route each)")
    parser.add_argument("--interval", nargs=2, type=float, metavar=("MIN", "MAX"),
                        help="seconds between reports of every device, overriding the file "
                             "(default: the file's, 1 2)")
    parser.add_argument("--max-queued", type=int, default=1000,
                        help="messages a device keeps while RabbitMQ is unreachable before it "
                             "drops (and logs) new ones (default %(default)s)")
    parser.add_argument("--mqtt-version", choices=MQTT_VERSIONS, default=MQTT_VERSIONS[0],
                        help="MQTT version the devices speak (default %(default)s; with 5 each "
                             "message carries its content type, a Kafka header downstream)")
    parser.add_argument("--no-prepare", action="store_true",
                        help="do not enrol the devices (certificate, broker user) nor declare "
                             "their queues at start: done already")
    parser.add_argument("--log-level", default=settings.log_level,
                        help="logging level (default %(default)s, WEBOS_LOG_LEVEL)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Run the simulator and serve the page and API until SIGINT or SIGTERM."""
    settings = load_settings()
    args = parse_args(argv, settings)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        LOGGER.warning("listening on %s: the API is reachable from other machines; set "
                       "PUBLISHER_API_TOKEN", args.host)
    from publisher.admin_link import BrokerUnavailable
    from publisher.app import create_app

    config = {"SETTINGS": settings, "DEVICES_FILE": args.devices_file,
              "MAX_QUEUED_MESSAGES": args.max_queued, "PREPARE_DEVICES": not args.no_prepare,
              "MQTT_VERSION": args.mqtt_version}
    try:
        interval = parse_interval(args.interval) if args.interval else None
        if args.devices:
            config["DEVICES"] = [DeviceConfig.from_json({"id": d.strip()}, interval or (1.0, 2.0))
                                 for d in args.devices.split(",") if d.strip()]
        config["INTERVAL"] = interval
        app = create_app(config)
    except ValueError as error:
        LOGGER.error("%s", error)
        return 2
    except BrokerUnavailable as error:
        LOGGER.error("cannot declare the device queues as %s: %s", settings.admin_user, error)
        return 1
    # As in the bridge: what start-up made (the devices, their clients) lives as long as the
    # process, so the collector leaves it alone, and young objects (a message's) are collected
    # less often. With thousands of devices each full collection walked them all.
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])
    code = serve(app, args.host, args.port, app.extensions["publisher"].close, "publisher")
    if code == 0:
        LOGGER.info("stopped")
    return code


if __name__ == "__main__":
    run(main)
