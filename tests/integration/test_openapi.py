"""
docs/openapi.yaml against the code: the document is valid OpenAPI 3.0, every route the roles'
Klein apps serve is in it under the right role, and a live dev cluster answers requests that
schemathesis generates from it (and a few picked by hand) as it says: no 5xx, and only
documented status codes, content types and JSON bodies.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
import schemathesis
import yaml
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from kvd.resources import GatewayAPI, NodeAPI, RegistryAPI
from kvd.testing.processes import Kvd, private_network_for, request

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
ROLES = ("node", "registry", "gateway")
#: Where the dev role serves each role (its first node for "node").
ROLE_URLS = {"gateway": "http://127.0.0.1:8000", "node": "http://127.0.0.1:8001", "registry": "http://127.0.0.1:8500"}
DEV_PORTS = (8000, 8001, 8002, 8003, 8500)
#: Not the public API: what kvd processes call on each other (replication, repair).
INTERNAL_PREFIX = "/internal/"


# --- the document, against the code ----------------------------------------------------------


def _template(path: str) -> str:
    """A path with its parameters blanked, so werkzeug rules and OpenAPI paths compare."""
    return re.sub(r"<[^>]*>|\{[^}]*\}", "{}", path)


def _spec_operations() -> dict[str, set[tuple[str, str]]]:
    """Each role's (path template, METHOD) pairs, by the operations' tags."""
    by_role: dict[str, set[tuple[str, str]]] = {role: set() for role in ROLES}
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                for role in operation["tags"]:
                    by_role[role].add((_template(path), method.upper()))
    return by_role


def _app_operations(rules: list[Any]) -> set[tuple[str, str]]:
    """
    The public (path template, METHOD) pairs a Klein app routes. HEAD comes with every GET
    (HTTP says so; the spec does not repeat it). A rule that ends where a parameter would
    start (C{/kv/}) is the empty-key form of the parametrized path: it exists to answer 400.
    """
    public = [rule for rule in rules if not rule.rule.startswith(INTERNAL_PREFIX)]
    paths = {_template(rule.rule) for rule in public}
    served = set()
    for rule in public:
        path = _template(rule.rule)
        if path.endswith("/") and path + "{}" in paths:
            path += "{}"
        served |= {(path, method) for method in rule.methods or () if method not in ("HEAD", "OPTIONS")}
    return served


def _resolve(node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        assert node["$ref"].startswith("#/"), node["$ref"]
        target: Any = SPEC
        for part in node["$ref"][2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


def _required(schema: Any) -> set[str]:
    schema = _resolve(schema)
    required = set(schema.get("required", ()))
    for part in schema.get("allOf", ()):
        required |= _required(part)
    return required


def test_the_spec_is_a_valid_openapi_3_0_document() -> None:
    assert SPEC["openapi"] == "3.0.3"
    schemathesis.openapi.from_path(SPEC_PATH).validate()
    for node in _walk(SPEC):
        if isinstance(node, dict) and "$ref" in node:
            _resolve(node)  # every reference resolves


@pytest.mark.parametrize(
    ("role", "app"),
    [("node", NodeAPI.routes.app), ("registry", RegistryAPI.routes.app), ("gateway", GatewayAPI.routes.app)],
)
def test_every_public_route_of_a_role_is_in_the_spec_under_its_tag_and_nothing_more(role: str, app: Any) -> None:
    """
    Both ways: a route the code serves is documented, and a documented operation is served.
    (C{/kv/{key}} requests skip Klein's router for the same methods; the live run below sends
    every one of them through that fast path.)
    """
    assert _app_operations(list(app.url_map.iter_rules())) == _spec_operations()[role]


def test_every_json_answer_has_success_every_error_has_error_and_more_fields_are_allowed() -> None:
    assert all(node.get("additionalProperties", True) is not False for node in _walk(SPEC) if isinstance(node, dict)), (
        "answers may carry more fields than listed: no additionalProperties: false"
    )
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            assert operation["tags"] and set(operation["tags"]) <= set(ROLES), (path, method)
            for status, response in operation["responses"].items():
                content = _resolve(response)["content"]
                if path == "/metrics":
                    assert list(content) == ["text/plain"]
                    continue
                if path == "/ui":
                    assert list(content) == ["text/html"]
                    continue
                if path == "/export" and status == "200":
                    assert list(content) == ["application/x-ndjson"]
                    continue
                if (path, method, status) == ("/kv/{key}", "get", "200"):
                    # ?raw=true answers the value's bytes themselves (issue 10 item 8).
                    assert list(content) == ["application/json", "application/octet-stream"]
                else:
                    assert list(content) == ["application/json"], (path, method, status)
                required = _required(content["application/json"]["schema"])
                assert "success" in required, (path, method, status)
                if int(status) >= 400:
                    assert "error" in required, (path, method, status)


# --- a live dev cluster ----------------------------------------------------------------------


class DevCluster:
    """A running `twistd kvd --role dev`, and a loopback port where nothing will answer."""

    def __init__(self, kvd: Kvd, dead_port: int) -> None:
        self.kvd = kvd
        self.dead_port = dead_port

    def call(self, case: schemathesis.Case, role: str) -> Any:
        """
        Send a case to a role of the dev cluster (from inside its network) and check the
        answer; a failure says how to reproduce it (curl).
        """
        with self.kvd.network():
            return case.call_and_validate(base_url=ROLE_URLS[role], checks=CHECKS, timeout=15)


@pytest.fixture(scope="module")
def dev_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """
    `twistd kvd --role dev` on its fixed ports, from a temporary directory, once 3 nodes are
    on the ring; in a private network namespace when there is one, so that nothing else on
    the machine holding those ports is in the way (and the cluster reaches nothing else).
    """
    workdir = tmp_path_factory.mktemp("dev")
    private = private_network_for(*DEV_PORTS)
    dev = Kvd(workdir, "dev", ["--role", "dev", "--data-dir", str(workdir / "kvd-data")], 8000, private_network=private)
    with ExitStack() as cleanup:
        cleanup.callback(dev.stop)
        dev.start()
        with dev.network():
            # Bound and never listening, where the cluster is: connections to it are refused at once.
            dead = cleanup.enter_context(socket.socket())
            dead.bind(("127.0.0.1", 0))
            deadline = time.monotonic() + 20
            while len(request(8000, "GET", "/cluster")[1]["nodes"]) != 3:
                assert time.monotonic() < deadline, f"the dev cluster has no 3 nodes after 20 s: {dev.tail()}"
                time.sleep(0.1)
        yield DevCluster(dev, dead.getsockname()[1])


def _dead_end(url: str, port: int) -> str:
    """A registrable URL moved to 127.0.0.1:port; a URL the registry must refuse, unchanged."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not one
    except ValueError:
        return url
    if not parts.hostname:
        return url
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


def _keep_inside(case: schemathesis.Case, dev: DevCluster) -> None:
    """
    What the test changes in a generated request before it is sent, and why (nothing that
    changes whether the request is valid):

    - A node registered with the dev registry becomes a member the dev gateway calls. A
      registration that should succeed is pointed at a loopback port where nothing listens,
      so the cluster never calls a host or port it does not own.
    - A long poll for the current index waits up to 300 s: it is cut to 0.2 s; so are
      watches and waits on the change feed.
    """
    if case.operation.path == "/registry/nodes/{id}" and case.method == "PUT":
        body = case.body
        positive = case.meta is not None and not case.meta.generation.mode.is_negative
        if positive and isinstance(body, dict):
            if isinstance(body.get("url"), str):
                body["url"] = _dead_end(body["url"], dev.dead_port)
    if case.operation.path in ("/kv/{key}", "/changes") and case.query and "wait" in case.query:
        _cut_wait(case)
    if case.operation.path == "/registry/nodes" and case.query and "index" in case.query:
        wait = case.query.get("wait")
        try:
            seconds = None if wait is None else float(wait)
        except (TypeError, ValueError):
            return  # answered at once with a 400
        if seconds is None or seconds > 0.2:
            case.query["wait"] = 0.2


def _cut_wait(case: schemathesis.Case) -> None:
    """A watch or a wait on the change feed may wait up to 300 s: it is cut to 0.2 s."""
    try:
        seconds = float(case.query["wait"])
    except (TypeError, ValueError):
        return  # answered at once with a 400
    if seconds > 0.2:
        case.query["wait"] = 0.2


#: What every answer is checked for. The last three take part only where schemathesis made
#: the request to break the rules (an undocumented method, data the spec calls invalid).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    unsupported_method,
    allow_header_conformance,
]
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 5,
        # deterministic: the same requests on every run, so a failure reproduces and CI is stable.
        "generation": {"mode": "all", "max-examples": 50, "deterministic": True, "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    }
)
#: POST /import takes NDJSON: text, as far as generating bodies goes.
schemathesis.serializer.alias("application/x-ndjson", "text/plain")
schema = schemathesis.openapi.from_path(SPEC_PATH, config=CONFIG)


def _segment(key: str) -> str:
    """A key as one path segment; "." and ".." encoded too, or the client would resolve them away."""
    encoded = quote(key, safe="")
    return encoded.replace(".", "%2E") if encoded in (".", "..") else encoded


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("path", "method", "key", "body", "expected"),
    [
        pytest.param("/kv/{key}", "PUT", "\U0001f511" * 128, "v", 200, id="a key of 512 bytes"),
        pytest.param("/kv/{key}", "PUT", "\U0001f511" * 129, "v", 400, id="a key of 516 bytes"),
        pytest.param("/kv/{key}", "PUT", "a/b%c", "v", 200, id="a key with / and %"),
        pytest.param("/kv/{key}", "PUT", "..", "v", 200, id="the key .."),
        pytest.param("/kv/{key}", "GET", "a/b%c", None, 200, id="reading a key with / and %"),
        pytest.param("/kv/{key}", "GET", "a\x85b", None, 400, id="a key with a C1 control"),
        pytest.param("/kv/{key}", "DELETE", "", None, 400, id="no key"),
        pytest.param("/kv/{key}", "PUT", "k", b"\xff\xfe", 200, id="a value that is not UTF-8 is kept as bytes"),
        pytest.param("/kv/{key}", "PUT", "k", "", 200, id="an empty value"),
        pytest.param("/kv/{key}", "DELETE", "never-written", None, 404, id="deleting an absent key"),
        pytest.param("/cluster/owners/{key}", "GET", "a/b", None, 200, id="the owners of a key with /"),
        pytest.param("/cluster/owners/{key}", "GET", "\x00", None, 400, id="the owners of a key with NUL"),
    ],
)
def test_picked_key_value_requests_are_answered_as_the_spec_says(
    dev_cluster: DevCluster, path: str, method: str, key: str, body: str | bytes | None, expected: int
) -> None:
    """Edges of the key and value rules, on every role that serves the path (before any fuzzing)."""
    operation = schema[path][method.upper()]
    for role in operation.tags:
        extra = {} if body is None else {"body": body, "media_type": "text/plain"}
        case = operation.Case(path_parameters={"key": _segment(key)}, **extra)
        assert dev_cluster.call(case, role).status_code == expected, role


@pytest.mark.timeout(300)
@schema.parametrize()
def test_a_live_dev_cluster_answers_generated_requests_as_the_spec_says(
    case: schemathesis.Case, dev_cluster: DevCluster
) -> None:
    """
    Each operation, with 50 generated requests (valid and invalid) and schemathesis's
    boundary and undocumented-method cases, sent to every role that serves it (its tags).
    The registry's operations come after the others in the spec, so the members they
    register (at a dead loopback port) never stand in the way of the key-value requests.
    """
    _keep_inside(case, dev_cluster)
    for role in case.operation.tags:
        dev_cluster.call(case, role)


# The registry's own tests run last: what they register becomes a member of the dev cluster.


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"url": "http://127.0.0.1:{dead}/a", "weight": 2, "incarnation": 0}, 200, id="a registration"),
        pytest.param({"url": "http://127.0.0.1:{dead}", "weight": 1001}, 400, id="too large a weight"),
        pytest.param({"url": "ftp://127.0.0.1:{dead}"}, 400, id="not http"),
        pytest.param({"url": "http://127.0.0.1:{dead}?x=1"}, 400, id="a URL with a query"),
        pytest.param({"url": "http://127.0.0.1:65536"}, 400, id="a port out of range"),
        pytest.param({"url": "http://[::1"}, 400, id="a URL with an unclosed IPv6 bracket"),
        pytest.param(b"[" * 50_000, 400, id="deeply nested JSON"),
        pytest.param(b"not json", 400, id="not JSON"),
        pytest.param(b"x" * (64 * 1024 + 1), 413, id="over 64 KiB"),
    ],
)
def test_picked_registrations_are_answered_as_the_spec_says(
    dev_cluster: DevCluster, body: dict[str, Any] | bytes, expected: int
) -> None:
    """Edges of the registration rules; what is registered points where nothing listens, and leaves again."""
    if isinstance(body, dict):
        body = {**body, "url": body["url"].replace("{dead}", str(dev_cluster.dead_port))}
    put = schema["/registry/nodes/{id}"]["PUT"]
    case = put.Case(path_parameters={"id": "openapi-picked"}, body=body, media_type="application/json")
    assert dev_cluster.call(case, "registry").status_code == expected
    leave = schema["/registry/nodes/{id}"]["DELETE"].Case(path_parameters={"id": "openapi-picked"})
    assert dev_cluster.call(leave, "registry").status_code == (200 if expected == 200 else 404)


@pytest.mark.timeout(60)
def test_an_older_incarnation_is_a_409_as_the_spec_says(dev_cluster: DevCluster) -> None:
    """A heartbeat or a leave from an older incarnation is refused with 409, and a leave then succeeds."""
    put = schema["/registry/nodes/{id}"]["PUT"]
    leave = schema["/registry/nodes/{id}"]["DELETE"]
    url = f"http://127.0.0.1:{dev_cluster.dead_port}"
    for incarnation, expected in ((5, 200), (4, 409)):
        case = put.Case(path_parameters={"id": "openapi-stale"}, body={"url": url, "incarnation": incarnation})
        assert dev_cluster.call(case, "registry").status_code == expected
    for query, expected in (({"incarnation": 4}, 409), ({"incarnation": 5}, 200), ({}, 404)):
        case = leave.Case(path_parameters={"id": "openapi-stale"}, query=query)
        assert dev_cluster.call(case, "registry").status_code == expected
