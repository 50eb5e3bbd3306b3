"""Bad REST calls to the publisher, shared by its unit and integration tests."""
from __future__ import annotations


A, NEW = "{A}", "{NEW}"
BAD_INPUT = [
    ("unknown device", "POST", "/status/NOPE-1", {"json": {"status": "Inactive"}}, 404),
    ("invalid id in path", "POST", "/status/bad.id", {"json": {"status": "Inactive"}}, 400),
    ("body not JSON", "POST", f"/status/{A}", {"data": "status=Inactive", "content_type": "application/json"}, 400),
    ("wrong content type", "POST", f"/status/{A}", {"data": '{"status": "Inactive"}', "content_type": "text/plain"}, 415),
    ("no content type", "POST", f"/status/{A}", {"data": '{"status": "Inactive"}'}, 415),
    ("missing status", "POST", f"/status/{A}", {"json": {}}, 400),
    ("unknown status", "POST", f"/status/{A}", {"json": {"status": "Sleeping"}}, 400),
    ("status lower case", "POST", f"/status/{A}", {"json": {"status": "inactive"}}, 400),
    ("JSON not an object", "POST", f"/status/{A}", {"json": ["Inactive"]}, 400),
    ("too large", "POST", f"/status/{A}", {"json": {"status": "Inactive", "pad": "x" * 70_000}}, 413),
    ("add: invalid id", "POST", "/devices", {"json": {"id": "bad/id"}}, 400),
    ("add: id too long", "POST", "/devices", {"json": {"id": "x" * 65}}, 400),
    ("add: missing id", "POST", "/devices", {"json": {"route": [[0, 0]]}}, 400),
    ("add: duplicate", "POST", "/devices", {"json": {"id": A}}, 409),
    ("add: empty route", "POST", "/devices", {"json": {"id": NEW, "route": []}}, 400),
    ("add: bad position", "POST", "/devices", {"json": {"id": NEW, "route": [[0, "a"]]}}, 400),
    ("add: interval reversed", "POST", "/devices", {"json": {"id": NEW, "interval": [2, 1]}}, 400),
    ("add: unknown field", "POST", "/devices", {"json": {"id": NEW, "colour": "red"}}, 400),
    ("add: body not JSON", "POST", "/devices", {"data": "{", "content_type": "application/json"}, 400),
    ("add: form body", "POST", "/devices", {"data": {"id": NEW}}, 415),
    ("add: too large", "POST", "/devices", {"json": {"id": NEW, "route": [[1, 2]] * 20_000}}, 413),
    ("remove: unknown", "DELETE", "/devices/NOPE-1", {}, 404),
    ("remove: body not JSON", "DELETE", f"/devices/{A}", {"data": "x", "content_type": "text/plain"}, 415),
    ("message: unknown type", "POST", f"/devices/{A}/messages", {"json": {"type": "debug", "text": "x"}}, 400),
    ("message: missing text", "POST", f"/devices/{A}/messages", {"json": {"type": "info"}}, 400),
    ("message: unknown device", "POST", "/devices/NOPE-1/messages", {"json": {"type": "info", "text": "x"}}, 404),
    ("broadcast: missing message", "POST", "/broadcast", {"json": {}}, 400),
    ("broadcast: text not string", "POST", "/broadcast", {"json": {"message": 5}}, 400),
    ("broadcast: wrong content type", "POST", "/broadcast", {"data": "hi", "content_type": "text/plain"}, 415),
    ("unknown route", "GET", "/nowhere", {}, 404),
    ("status of unknown device", "GET", "/status/NOPE-1", {}, 404),
]


def fill(value, device, new):
    """`value` with the placeholders {A} (a running device) and {NEW} (a fresh id) filled in."""
    if isinstance(value, str):
        return value.replace(A, device).replace(NEW, new)
    if isinstance(value, dict):
        return {k: fill(v, device, new) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, device, new) for v in value]
    return value
