"""Device presence: RabbitMQ's connection events, as the records of Kafka's webos.presence.

rabbitmq_event_exchange publishes `connection.created` and `connection.closed` with empty bodies
and the connection's properties as headers (seen on 4.0.5: `user`, `node`, `protocol`
"{'MQTT',{3,1,1}}", `client_properties` ['{client_id,longstr,<<"D1">>}'], `timestamp_in_ms`,
and on a closed connection no reason). A device's MQTT connection becomes one record: key = the
device id, which is the user its certificate proved (not the client id it chose), value

    {"type": "connected" | "disconnected", "device", "client_id", "node", "ts", ["reason"]}

Other connections (AMQP clients, service users) are not presence and give no record.
"""
from __future__ import annotations

import json
import re

from rabbitmq.naming import header_text, is_valid_device_id

EVENT_TYPES = {"connection.created": "connected", "connection.closed": "disconnected"}
_CLIENT_ID = re.compile(r'\{client_id,longstr,<<"(.*)">>\}')


def presence_record(event: str, headers: dict | None) -> tuple[str, bytes] | None:
    """(device, JSON value) for a device's MQTT connect or disconnect, else None."""
    kind = EVENT_TYPES.get(event)
    headers = headers or {}
    device = header_text(headers.get("user"))
    if kind is None or "MQTT" not in header_text(headers.get("protocol")) \
            or not is_valid_device_id(device):
        return None
    client_id = ""
    for item in headers.get("client_properties") or ():
        match = _CLIENT_ID.fullmatch(header_text(item))
        if match:
            client_id = match.group(1)
    value = {"type": kind, "device": device, "client_id": client_id,
             "node": header_text(headers.get("node")), "ts": int(headers.get("timestamp_in_ms") or 0)}
    if headers.get("reason"):
        value["reason"] = header_text(headers["reason"])
    return device, json.dumps(value, separators=(",", ":")).encode()
