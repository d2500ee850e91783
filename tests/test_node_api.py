"""A node's HTTP API, driven through treq's StubTreq: a real client against the real resource, in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from kvd.paxos import Acceptor, Proposal
from kvd.resources import NodeAPI
from kvd.store import Store
from kvd.versions import HybridClock

BASE = "http://node.invalid"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(str(tmp_path / "data"), clock=HybridClock(Clock().seconds, "a"))
    yield s
    s.abandon()


@pytest.fixture
def client(store: Store) -> StubTreq:
    return StubTreq(NodeAPI("a", store, max_value_bytes=64).resource())


def call(client: StubTreq, method: str, path: str, data: bytes | None = None) -> tuple[int, Any, Any]:
    """Make one request and return (status, parsed JSON body, headers), or fail the test."""

    async def go() -> tuple[int, Any, Any]:
        response = await client.request(method, BASE + path, data=data)
        body = await response.content()
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"], body
        return response.code, json.loads(body), response.headers

    results: list[Any] = []
    d: Deferred[Any] = ensureDeferred(go())
    client.flush()
    d.addBoth(results.append)
    assert results, "the request did not finish"
    if isinstance(results[0], BaseException) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def test_put_then_get_answers_the_documented_json_with_a_version(client: StubTreq) -> None:
    status, body, headers = call(client, "PUT", "/kv/mykey1", b"myvalue1")
    version = body.pop("version")
    assert (status, body) == (200, {"success": True, "key": "mykey1", "value": "myvalue1"})
    assert headers.getRawHeaders(b"etag") == [f'"{version}"'.encode()]
    status, body, _ = call(client, "GET", "/kv/mykey1")
    assert (status, body) == (200, {"success": True, "key": "mykey1", "value": "myvalue1", "version": version})
    status, body, _ = call(client, "PUT", "/kv/mykey1", b"again")
    assert body["version"] > version, "a later write gets a later version"


def test_delete_answers_the_key_then_the_key_is_gone(client: StubTreq) -> None:
    call(client, "PUT", "/kv/k", b"v")
    assert call(client, "DELETE", "/kv/k")[:2] == (200, {"success": True, "key": "k"})
    status, body, _ = call(client, "GET", "/kv/k")
    assert status == 404 and body["success"] is False and body["key"] == "k" and body["error"]


def test_delete_of_an_absent_key_is_404(client: StubTreq) -> None:
    status, body, _ = call(client, "DELETE", "/kv/never")
    assert status == 404 and body["success"] is False and body["key"] == "never"


def test_acknowledged_put_is_already_in_the_journal(client: StubTreq, store: Store) -> None:
    call(client, "PUT", "/kv/k", b"v")
    record = json.loads(Path(store.directory, "journal-0.jsonl").read_bytes())
    assert record[:3] == ["p", "k", "v"] and record[3] == store.entry("k")[1]  # type: ignore[index]


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/kv/a%2Fb", "a/b"),
        ("/kv/%F0%9F%94%91", "\U0001f511"),
        ("/kv/sp%20ace", "sp ace"),
        ("/kv/..", ".."),
        ("/kv/" + "k" * 512, "k" * 512),
    ],
)
def test_keys_are_one_percent_decoded_segment_and_round_trip(client: StubTreq, path: str, key: str) -> None:
    status, body, _ = call(client, "PUT", path, "välue".encode())
    assert (status, body["key"], body["value"]) == (200, key, "välue")
    assert call(client, "GET", path)[1]["key"] == key


@pytest.mark.parametrize(
    "path",
    [
        "/kv/",
        "/kv/a/b",
        "/kv/" + "k" * 513,
        "/kv/%00",
        "/kv/a%0Ab",
        "/kv/%C0%AF",
        "/kv/%ED%A0%80",
        "/kv/x%ZZ",
        "/kv/x%2",
    ],
)
def test_bad_keys_get_400_json(client: StubTreq, path: str) -> None:
    status, body, _ = call(client, "PUT", path, b"v")
    assert status == 400 and body["success"] is False and body["error"]


def test_a_value_that_is_not_utf8_is_kept_as_bytes_and_answered_base64(client: StubTreq, store: Store) -> None:
    # Before binary values (issue 10 item 8) this was a 400; now any bytes are stored.
    status, body, _ = call(client, "PUT", "/kv/k", b"\xff\xfe")
    assert status == 200 and body["value"] == "//4=" and body["encoding"] == "base64"
    assert store.get("k") is not None


def test_a_value_over_the_limit_gets_413_and_is_not_stored(client: StubTreq, store: Store) -> None:
    assert call(client, "PUT", "/kv/k", b"x" * 64)[0] == 200
    status, body, _ = call(client, "PUT", "/kv/k", b"x" * 65)
    assert status == 413 and body["success"] is False
    assert store.get("k") == "x" * 64


def test_unknown_method_is_405_with_allow(client: StubTreq) -> None:
    status, body, headers = call(client, "POST", "/kv/k", b"v")
    assert status == 405 and body["success"] is False
    # Sorted, so every process names them in the same order (Klein's come from a set).
    assert headers.getRawHeaders(b"allow") == [b"DELETE, GET, HEAD, PUT"]
    assert body["error"] == "method not allowed here; allowed: DELETE, GET, HEAD, PUT"


def test_unknown_path_is_404_json(client: StubTreq) -> None:
    status, body, _ = call(client, "GET", "/nowhere")
    assert status == 404 and body == {"success": False, "error": "no such endpoint"}


def test_a_path_without_the_key_route_s_slash_is_no_endpoint_not_an_empty_key(client: StubTreq) -> None:
    """A node does not list (GET /kv is a gateway's): it says so, not that the key is empty; /kv/ is a key."""
    for method in ("GET", "PUT", "DELETE"):
        status, body, _ = call(client, method, "/kv", b"v")
        assert (status, body) == (404, {"success": False, "error": "no such endpoint"}), method
    status, body, _ = call(client, "GET", "/kv/")
    assert status == 400 and "1 to 512 bytes" in body["error"]


def test_node_reports_its_id_and_live_key_count(client: StubTreq) -> None:
    call(client, "PUT", "/kv/a", b"1")
    call(client, "PUT", "/kv/b", b"2")
    call(client, "DELETE", "/kv/a")
    assert call(client, "GET", "/node")[:2] == (200, {"success": True, "id": "a", "keys": 1})


def test_healthz(client: StubTreq) -> None:
    assert call(client, "GET", "/healthz")[:2] == (200, {"success": True, "status": "ok"})


def test_a_store_that_failed_answers_503_not_a_traceback(client: StubTreq, store: Store) -> None:
    from kvd.store import StoreFailed

    store._failed = StoreFailed("journal write failed in /x: disk full")
    status, body, _ = call(client, "PUT", "/kv/k", b"v")
    assert status == 503 and "disk full" in body["error"]
    status, body, _ = call(client, "GET", "/healthz")
    assert status == 503 and body["status"] == "failing" and "disk full" in body["error"]


def test_client_errors_write_no_log_lines(client: StubTreq) -> None:
    """A loop of 404s and 400s is the clients' news, not the server's; --access-log records requests."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for i in range(20):
            assert call(client, "GET", f"/kv/gone{i}")[0] == 404
            assert call(client, "DELETE", f"/kv/gone{i}")[0] == 404
        assert call(client, "PUT", "/kv/%ff")[0] == 400
        assert call(client, "PUT", "/kv/k", b"x" * 65)[0] == 413
        assert call(client, "GET", "/no/such/endpoint")[0] == 404
        assert events == []
        assert call(client, "POST", "/internal/apply", b'{"items": [["k", "v", "not a version"]]}')[0] == 400
        assert events == []
    finally:
        globalLogPublisher.removeObserver(events.append)


def test_a_batch_with_a_bad_item_is_a_400_and_applies_nothing(client: StubTreq, store: Store) -> None:
    good = ["k", "v", "000000000001000000.gw"]
    status, body, _ = call(client, "POST", "/internal/apply", json.dumps({"items": [good, ["k2", "v", "x"]]}).encode())
    assert status == 400 and "not a version" in body["error"]
    assert store.entry("k") is None
    status, body, _ = call(client, "POST", "/internal/drop", json.dumps({"items": [["k", 1]]}).encode())
    assert status == 400
    status, body, _ = call(client, "POST", "/internal/apply", json.dumps({"items": [good]}).encode())
    assert (status, body["applied"], body["live"], body["versions"]) == (200, 1, [False], [good[2]])
    status, body, _ = call(client, "POST", "/internal/drop", json.dumps({"items": [good[::2]]}).encode())
    assert (status, body) == (200, {"success": True, "dropped": 1})


def test_internal_paxos_is_bounded_as_internal_apply_is(store: Store) -> None:
    """A body over the internal message limit is a 413 JSON answer, the same for both routes, before it is read."""
    from twisted.internet.testing import StringTransport

    from kvd.keys import internal_message_limit
    from kvd.web import BoundedSite

    acceptor = Acceptor.in_store(store)
    site = BoundedSite(NodeAPI("a", store, acceptor=acceptor).resource(), max_body=1000)
    limit = internal_message_limit(1000)
    for path in (b"/internal/apply", b"/internal/paxos"):
        for size, expected in ((limit + 1, b"HTTP/1.1 413 "), (limit, b""), (2, b"HTTP/1.1 400 ")):
            protocol, transport = site.buildProtocol(None), StringTransport()
            protocol.makeConnection(transport)
            head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, size)
            protocol.dataReceived(head + (b"{}" if size == 2 else b""))
            answer = transport.value()
            if not expected:
                assert answer == b"", "at the limit: the body is waited for, not refused"
                continue
            assert answer.startswith(expected), (path, size, answer[:80])
            assert b'"success": false' in answer
    assert acceptor.state("k") == ("", None)


def test_internal_paxos_takes_prepares_accepts_and_commits_together_and_answers_each(store: Store) -> None:
    acceptor = Acceptor.in_store(store)
    client = StubTreq(NodeAPI("a", store, acceptor=acceptor).resource())
    b1, b2 = "018f00000000000000.gw1", "018f00000000000001.gw2"
    call(client, "PUT", "/kv/held", b"v")
    held = store.entry("held")
    assert held is not None
    call(client, "PUT", "/kv/gone", b"v")
    call(client, "DELETE", "/kv/gone")
    gone = store.entry("gone")
    assert gone is not None and gone[0] is None
    items = [
        ["p", "held", b2],
        ["p", "new", b2],
        ["p", "held", b1],
        ["a", "new", b1, "old", b1],
        ["a", "new", b2, "x", b2],
        ["p", "gone", b2],
    ]
    items.append(["c", "new", "x", b2])
    status, body, _ = call(client, "POST", "/internal/paxos", json.dumps({"items": items}).encode())
    assert status == 200
    assert body["answers"] == [
        # What the store holds: whether it is live, and its version (a proposer needs no value).
        [True, b2, None, [True, held[1]]],
        [True, b2, None, [True, b2]],  # the entry is read once the whole batch is durable
        [False, b2, None, [True, held[1]]],
        [False, b2],
        [True, b2],
        [True, b2, None, [False, gone[1]]],  # a tombstone: not live
        [False, b2],
    ]
    assert acceptor.state("new") == (b2, Proposal(b2, "x", b2))
    assert store.entry("new") == ("x", b2)
    for bad in [
        {"items": [["p", "k"]]},
        {"key": "k", "ballot": b1},
        {"items": [["p", "", b1]]},
        {"items": [["a", "k", b1, 3, b1]]},
        {"items": [["a", "k", b1, "v", "not a version"]]},
        {"items": [["x", "k", b1]]},
        {"items": [["p", "k", b1], ["c", "k", "v", "not a version"]]},
    ]:
        assert call(client, "POST", "/internal/paxos", json.dumps(bad).encode())[0] == 400, bad
    assert acceptor.state("k") == ("", None) and store.entry("k") is None, "a bad batch changes nothing"


def test_internal_paxos_commits_the_proposal_it_accepted_when_named_by_key_and_version(store: Store) -> None:
    acceptor = Acceptor.in_store(store)
    client = StubTreq(NodeAPI("a", store, acceptor=acceptor).resource())
    b1, b2 = "018f00000000000000.gw1", "018f00000000000001.gw2"
    items = [["p", "k", b1], ["a", "k", b1, "accepted value", b1], ["p", "j", b1]]
    status, body, _ = call(client, "POST", "/internal/paxos", json.dumps({"items": items}).encode())
    assert status == 200 and body["accepted_commits"] is True, "the node says it takes commits by key and version"
    items = [["k", "k", b2], ["k", "j", b1], ["k", "nothing", b1], ["k", "k", b1]]
    status, body, _ = call(client, "POST", "/internal/paxos", json.dumps({"items": items}).encode())
    assert status == 200
    # Another version than the one accepted, a key promised only, a key unknown: null, so
    # the gateway sends the whole commit; the accepted one is committed with its value.
    assert body["answers"] == [None, None, None, [False, b1]]
    assert store.entry("k") == ("accepted value", b1)
    assert store.entry("j") is None and store.entry("nothing") is None
    for bad in [{"items": [["k", "k"]]}, {"items": [["k", ["k"], b1]]}, {"items": [["k", "k", 7]]}]:
        assert call(client, "POST", "/internal/paxos", json.dumps(bad).encode())[0] == 400, bad
