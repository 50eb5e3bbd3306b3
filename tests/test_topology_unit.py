"""The management API session against a local HTTP server that drops a kept-alive connection the
way RabbitMQ's API did now and then in a long `make run`: it reads the next request and closes
without an answer (the bridge logged "cannot list queues ... RemoteDisconnected"), and against
one that hangs (a SIGSTOPped node)."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pika
from pika.adapters.utils.connection_workflow import AMQPConnectorStackTimeout
import pytest
import requests

from rabbitmq import endpoints
from rabbitmq.endpoints import ClusterSession


class DropsSecondRequest(BaseHTTPRequestHandler):
    """Answers the first request of each connection; closes on the second, unanswered."""
    protocol_version = "HTTP/1.1"  # keep-alive, as the management API
    connections = 0

    def setup(self):
        super().setup()
        type(self).connections += 1
        self.answered = 0

    def answer(self):
        if self.answered:
            self.close_connection = True
            return
        self.answered += 1
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    DropsSecondRequest.connections = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), DropsSecondRequest)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_idempotent_call_on_a_dropped_connection_is_sent_again_on_a_new_one(api):
    with ClusterSession([api]) as http:
        assert http.get(api + "/api/queues").json() == []
        assert http.get(api + "/api/queues").json() == []  # the dropped one, sent again
        assert http.put(api + "/api/users/x", json={}).status_code == 200
    assert DropsSecondRequest.connections == 3


def test_a_post_on_a_dropped_connection_is_not_sent_twice(api):
    with ClusterSession([api]) as http:
        http.get(api + "/api/queues")
        with pytest.raises(requests.ConnectionError):
            http.post(api + "/api/definitions", json={})
    assert DropsSecondRequest.connections == 1


class Hangs(BaseHTTPRequestHandler):
    """A node that accepts and reads a request but never answers (a SIGSTOPped broker's socket)."""
    requests_read = 0
    release = threading.Event()

    def do_GET(self):
        type(self).requests_read += 1
        self.release.wait(30)

    def log_message(self, *args):
        pass


def test_a_node_that_hangs_costs_one_timeout_and_the_call_moves_to_the_next_node(api):
    Hangs.requests_read, Hangs.release = 0, threading.Event()
    hung = ThreadingHTTPServer(("127.0.0.1", 0), Hangs)
    threading.Thread(target=hung.serve_forever, daemon=True).start()
    first = f"http://127.0.0.1:{hung.server_port}"
    try:
        with ClusterSession([first, api]) as http:
            assert http.get(first + "/api/queues", timeout=0.5).json() == []
            assert Hangs.requests_read == 1  # waited out once, not sent again to the hung node
            assert http.bases == [api, first]  # the node that answered is asked first from now on
    finally:
        Hangs.release.set()
        hung.shutdown()
        hung.server_close()


def test_a_node_whose_name_does_not_resolve_is_skipped_for_the_next(monkeypatch):
    """A stopped container's name stops resolving: pika's own list of parameters then ends the
    whole attempt with socket.gaierror; endpoints.connect goes on to the next node."""
    tried = []

    def blocking_connection(node):
        tried.append(node.host)
        if node.host == "rabbitmq":
            raise socket.gaierror(-2, "Name or service not known")
        return f"connection to {node.host}"

    monkeypatch.setattr(pika, "BlockingConnection", blocking_connection)
    nodes = [pika.ConnectionParameters(host) for host in ("rabbitmq", "rabbitmq-2")]
    assert endpoints.connect(nodes) == ("connection to rabbitmq-2", nodes[1])
    assert tried == ["rabbitmq", "rabbitmq-2"]
    with pytest.raises(pika.exceptions.AMQPConnectionError, match="Name or service not known"):
        endpoints.connect(nodes[:1])


def test_a_hung_node_is_tried_last_after_a_lost_connection_and_its_timeout_is_a_connection_error(
        monkeypatch):
    """A node that hangs accepts TCP and never answers: pika raises AMQPConnectorStackTimeout,
    which is no AMQPConnectionError (a bridge's reconnect loop let it through and exited). The
    node a connection was lost on is tried after the others."""
    tried = []

    def blocking_connection(node):
        tried.append(node.port)
        raise AMQPConnectorStackTimeout("Timeout while setting up transport")

    monkeypatch.setattr(pika, "BlockingConnection", blocking_connection)
    nodes = [pika.ConnectionParameters("127.0.0.1", port) for port in (5671, 5681, 5691)]
    with pytest.raises(pika.exceptions.AMQPConnectionError, match="Timeout while setting up"):
        endpoints.connect(nodes, last="127.0.0.1:5671")
    assert tried == [5681, 5691, 5671]
