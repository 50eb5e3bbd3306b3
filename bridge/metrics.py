"""The bridge's counters, exposed as Prometheus text on /metrics, and /healthz.

The forwarding loop only bumps plain integers (no lock, no per-message Prometheus call); a custom
collector turns them into metric families when /metrics is scraped.
"""
from __future__ import annotations

import bisect
import json
import logging
import threading
from collections import Counter
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from socketserver import ThreadingMixIn

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from rabbitmq.naming import DEAD_REASONS

LOGGER = logging.getLogger(__name__)
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class LatencyHistogram:
    """Cumulative-on-read histogram of seconds; `observe` is a bisect and two additions."""

    def __init__(self, buckets=LATENCY_BUCKETS):
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one latency."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def observe_all(self, latencies) -> None:
        """Count many latencies (None counts as 0)."""
        counts, bounds, total = self.counts, self.bounds, 0.0
        for seconds in latencies:
            seconds = seconds or 0.0
            counts[bisect.bisect_left(bounds, seconds)] += 1
            total += seconds
        self.total += total

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as Prometheus wants them, ending with +Inf."""
        running = 0
        pairs = []
        for bound, count in zip(self.bounds + (float("inf"),), list(self.counts)):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return pairs


class BridgeStats:
    """What the bridge has done so far; written by the loop thread, read by the scrape thread."""

    def __init__(self):
        self.consumed = 0
        self.produced = 0
        self.acked = 0
        self.forgotten = 0  # confirmed after their channel was gone: will come again (duplicates)
        self.dead_lettered: Counter[str] = Counter()
        self.in_flight = 0
        self.queues = 0
        self.active_queues = 0  # queues whose single active consumer is this instance
        self.connected = False
        self.reconnects = 0
        self.presence = 0  # devices' connects and disconnects handed to Kafka
        self.refused = 0   # records Kafka refused for a reason that may pass (then held)
        self.held = 0      # deliveries held unacked while their queue backs off
        self.retrying: dict[str, int] = {}  # queues in back-off per Kafka error name
        self.latency = LatencyHistogram()

    def summary(self) -> str:
        """One line for the log."""
        dead = sum(self.dead_lettered.values())
        return (f"consumed={self.consumed} produced={self.produced} acked={self.acked} "
                f"refused={self.refused} dead_lettered={dead} in_flight={self.in_flight}")


class StatsCollector:
    """prometheus_client collector reading a BridgeStats."""

    def __init__(self, stats: BridgeStats):
        self.stats = stats

    def collect(self):
        """Metric families for one scrape."""
        stats = self.stats
        for name, value, text in (
                ("consumed", stats.consumed, "Deliveries received from RabbitMQ"),
                ("produced", stats.produced, "Records Kafka confirmed (acks=all)"),
                ("acked", stats.acked, "RabbitMQ deliveries acked after Kafka or webos.dead confirmed"),
                ("forgotten", stats.forgotten,
                 "Kafka confirmations for a channel that had closed (redelivered: duplicates)"),
                ("reconnects", stats.reconnects, "RabbitMQ connections opened after the first"),
                ("presence", stats.presence,
                 "Devices' connects and disconnects produced to the presence topic"),
                ("refused", stats.refused,
                 "Records Kafka refused for a reason that may pass; held and sent again")):
            yield CounterMetricFamily(f"webos_bridge_{name}", text, value=value)
        dead = CounterMetricFamily("webos_bridge_dead_lettered",
                                   "Messages parked in webos.dead, by reason", labels=["reason"])
        # Every reason from the start, at 0: a series first scraped at 1 would be no increase
        # for Prometheus, and DeadLettersArriving would miss the first parked message.
        for reason in sorted(set(DEAD_REASONS) | set(stats.dead_lettered)):
            dead.add_metric([reason], stats.dead_lettered[reason])
        yield dead
        yield GaugeMetricFamily("webos_bridge_in_flight",
                                "Deliveries received and not yet acked or nacked", value=stats.in_flight)
        yield GaugeMetricFamily("webos_bridge_queues", "Device queues being consumed",
                                value=stats.queues)
        yield GaugeMetricFamily(
            "webos_bridge_active_queues",
            "Device queues whose single active consumer is this bridge instance (the others "
            "stand by), from the management API's queue listing", value=stats.active_queues)
        yield GaugeMetricFamily("webos_bridge_connected", "1 while connected to RabbitMQ",
                                value=int(stats.connected))
        yield GaugeMetricFamily("webos_bridge_held",
                                "Deliveries held unacked while their queue backs off", value=stats.held)
        retrying = GaugeMetricFamily(
            "webos_bridge_retrying_queues",
            "Device queues backing off after Kafka refused their records, by Kafka error",
            labels=["error"])
        for error, queues in sorted(dict(stats.retrying).items()):
            retrying.add_metric([error], queues)
        yield retrying
        histogram = HistogramMetricFamily(
            "webos_bridge_delivery_latency_seconds",
            "Time from produce() to Kafka's delivery report")
        histogram.add_metric([], stats.latency.cumulative(), sum_value=stats.latency.total)
        yield histogram


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (signature from BaseHTTPRequestHandler)
        LOGGER.debug("http: " + format, *args)


def make_app(stats: BridgeStats, registry: CollectorRegistry):
    """WSGI app: /metrics (Prometheus text) and /healthz (200 while connected to RabbitMQ)."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path == "/healthz":
            healthy = stats.connected
            body = json.dumps({"rabbitmq": "connected" if healthy else "disconnected",
                               "queues": stats.queues, "in_flight": stats.in_flight}).encode()
            start_response("200 OK" if healthy else "503 Service Unavailable",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


class MetricsServer:
    """/metrics and /healthz on host:port in a daemon thread, served from construction on (the
    socket is bound by then: a bound socket nobody serves would only queue scrapes)."""

    def __init__(self, stats: BridgeStats, host: str, port: int):
        self.registry = CollectorRegistry()
        self.registry.register(StatsCollector(stats))
        self.server = make_server(host, port, make_app(stats, self.registry),
                                  server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """Base URL the server listens on."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()


def parse_samples(text: str) -> dict[str, float]:
    """/metrics text as {sample: value}; a labelled sample's key carries its labels, as
    `name{le="0.01"}`. For the tests and benchmarks that read the bridge from outside."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
