"""How the project's services reach RabbitMQ: AMQPS connection parameters for one of its users,
one per node, and an HTTPS session with the management API that moves to the next node when one
does not answer.
"""
from __future__ import annotations

import logging

import pika
import requests
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from common.config import Settings
from common.pki import client_context

LOGGER = logging.getLogger(__name__)
# The AMQP heartbeat the project's long-lived connections ask for (bridge, relay, publisher's
# admin link). pika gives up on a silent connection after 1-2 heartbeats + 5 s: with 30 s a
# bridge on a node that hangs (SIGSTOP) reconnected 62 s after the hang began
# (tests/test_rabbitmq_cluster.py); with 10 s, within 15-25 s. Its cost: a frame every 5 s.
HEARTBEAT_SECONDS = 10


def amqp_parameters(settings: Settings, user: str, password: str,
                    **extra) -> list[pika.ConnectionParameters]:
    """pika connection parameters for one of the project's users, one per RabbitMQ node (pika
    tries them in order): AMQPS, the broker's certificate checked against the stack's authority."""
    context = client_context(settings.ca_file)
    return [pika.ConnectionParameters(
                host=node.rabbitmq_host, port=node.amqp_port, virtual_host=settings.vhost,
                credentials=pika.PlainCredentials(user, password),
                ssl_options=pika.SSLOptions(context, server_hostname=node.rabbitmq_host), **extra)
            for node in settings.rabbitmq_addresses()]


def connect(parameters: list[pika.ConnectionParameters], last: str = ""):
    """A BlockingConnection to the first node of `parameters` that accepts one, and that node's
    parameters; the node `last` ("host:port", where a lost connection was) is tried after the
    others: a node that hangs costs a stack timeout (15 s) per attempt.

    Not pika's own list-of-parameters form: it keeps which node it reached private, and a node
    whose name does not resolve (a stopped container's) ends its whole attempt with
    socket.gaierror instead of trying the next node. Whatever fails on every node is raised as
    AMQPConnectionError (a hung node's AMQPConnectorStackTimeout is not one), so that callers'
    reconnect loops see one kind of error."""
    ordered = sorted(parameters, key=lambda node: f"{node.host}:{node.port}" == last)
    failure = None
    for node in ordered:
        try:
            return pika.BlockingConnection(node), node
        except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError,
                pika.exceptions.ProbableAccessDeniedError):
            raise  # a wrong password is wrong on every node
        except (pika.exceptions.AMQPConnectionError, AMQPConnectorException, OSError) as error:
            LOGGER.warning("RabbitMQ at %s:%s did not take a connection (%r)%s", node.host,
                           node.port, error, "; trying the next node" if node is not ordered[-1] else "")
            failure = error
    if isinstance(failure, pika.exceptions.AMQPConnectionError):
        raise failure
    raise pika.exceptions.AMQPConnectionError(f"no RabbitMQ node answered: {failure!r}") from failure


def open_connection(parameters: list[pika.ConnectionParameters]) -> pika.BlockingConnection:
    """A BlockingConnection to the first node of `parameters` that accepts one (`connect`)."""
    return connect(parameters)[0]


class RetryClosedOnce(Retry):
    """urllib3's Retry for one case only: a kept-alive connection the server had closed. A read
    timeout (a node that hangs: it accepts TCP, never answers) is raised at once, not waited out
    a second time."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None,
                  _stacktrace=None):
        if isinstance(error, ReadTimeoutError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


class ClusterSession(requests.Session):
    """A requests session that sends a call meant for the first node's management API to the
    other nodes when that one does not answer (any node's API serves the whole cluster), and then
    to the node that answered first."""

    def __init__(self, bases: list[str]):
        super().__init__()
        self.primary = bases[0]
        self.bases = list(bases)
        # The API closes a kept-alive connection now and then (every minute or two in a run
        # here): a call that finds it closed is sent again, once, on a new connection, if it is
        # idempotent (GET, PUT, DELETE, not POST). A node that refuses or hangs fails at once
        # (one timeout, not two), and the call moves on to the next node.
        adapter = HTTPAdapter(max_retries=RetryClosedOnce(total=1, connect=0, redirect=0, status=0))
        self.mount("https://", adapter)
        self.mount("http://", adapter)

    def request(self, method, url, *args, **kwargs):
        if len(self.bases) == 1 or not url.startswith(self.primary):
            return super().request(method, url, *args, **kwargs)
        path = url[len(self.primary):]
        for base in list(self.bases):
            try:
                response = super().request(method, base + path, *args, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure = error
                continue
            self.bases.remove(base)
            self.bases.insert(0, base)
            return response
        raise failure


def management_api(settings: Settings, user: str | None = None,
                   password: str | None = None) -> requests.Session:
    """An HTTPS session with the management API (default: as webos-admin), the broker's
    certificate checked against the stack's authority; on a cluster a call moves to the next
    node when one does not answer."""
    http = ClusterSession([node.management_url for node in settings.rabbitmq_addresses()])
    http.auth = (user or settings.admin_user,
                 settings.admin_password if password is None else password)
    http.verify = str(settings.ca_file)
    # Else REQUESTS_CA_BUNDLE in the environment would win over `verify` (a known requests
    # behaviour), and a proxy variable could route this loopback call elsewhere.
    http.trust_env = False
    return http


def admin_parameters(settings: Settings, **extra) -> list[pika.ConnectionParameters]:
    """pika connection parameters for `webos-admin`, one per node."""
    return amqp_parameters(settings, settings.admin_user, settings.admin_password, **extra)
