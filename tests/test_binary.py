"""Binary values (issue 10 item 8): any bytes stored exactly, base64 in JSON, the bytes themselves with ?raw=true."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from kvd.gateway.batch import Batch
from kvd.journal import SNAPSHOT
from kvd.keys import BadValue, ValueTooLarge, parse_value, raw_value, text_value, value_json
from kvd.resources import NodeAPI
from kvd.store import Store
from kvd.testing.cluster import Harness
from kvd.versions import HybridClock

BASE = "http://node.invalid"
BLOB = bytes(range(256)) * 3 + b"\xff\xfe\x00\x1f\x1e"


def open_store(directory: Path) -> Store:
    return Store.open(str(directory), clock=HybridClock(Clock().seconds, "a"))


def test_utf8_values_stay_plain_text_and_other_bytes_become_typed() -> None:
    assert parse_value(b"caf\xc3\xa9", 100) == "café"
    assert parse_value(b"x", 100, b"application/x-www-form-urlencoded") == "x"
    assert parse_value(b"x", 100, b"text/plain; charset=utf-8") == "x"
    assert raw_value(parse_value(b"{}", 100, b"application/json")) == (b"{}", "application/json")
    assert value_json(parse_value(b"{}", 100, b"application/json")) == {"value": "{}"}
    binary = parse_value(b"\xff\x00", 100)
    assert value_json(binary) == {"value": "/wA=", "encoding": "base64"}
    assert raw_value(binary) == (b"\xff\x00", "application/octet-stream")
    assert raw_value(parse_value(b"\x89PNG\xff", 100, b"image/png")) == (b"\x89PNG\xff", "image/png")


def test_the_value_limit_counts_the_bytes_not_their_base64() -> None:
    assert raw_value(parse_value(b"\xff" * 64, 64))[0] == b"\xff" * 64
    with pytest.raises(ValueTooLarge):
        parse_value(b"\xff" * 65, 64)
    Batch.parse({"put": {"k": {"value": base64.b64encode(b"\xff" * 64).decode(), "encoding": "base64"}}}, 64)
    with pytest.raises(ValueTooLarge):
        Batch.parse({"put": {"k": {"value": base64.b64encode(b"\xff" * 65).decode(), "encoding": "base64"}}}, 64)


def test_json_text_cannot_smuggle_a_typed_value_or_a_lone_surrogate() -> None:
    with pytest.raises(BadValue):
        text_value("\udfffb\x1f/wA=", "'k'")
    with pytest.raises(BadValue):
        text_value({"value": "not base64!", "encoding": "base64"}, "'k'")
    assert text_value("plain", "'k'") == "plain"


def test_bytes_survive_restart_and_compaction_exactly(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    value = parse_value(BLOB, 10_000, b"image/png")
    store.put("blob", value)
    store.put("text", "héllo")
    store.put("typed", parse_value(b"{}", 100, b"application/json"))
    store.abandon()
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("journal-*.jsonl"))
    assert base64.b64encode(BLOB) in journal  # base64 in the journal: compact and readable
    store = open_store(tmp_path)
    assert store.get("blob") == value and store.get("text") == "héllo"
    store.compact_min_bytes = 0
    for i in range(200):  # enough to compact into a snapshot
        store.put(f"k{i}", "x" * 100)
    store.abandon()
    assert any(name.startswith("snapshot") for name in os.listdir(tmp_path))
    snapshot = json.loads((tmp_path / SNAPSHOT).read_bytes())
    assert snapshot["kvd"] == 3 and base64.b64encode(BLOB).decode() in snapshot["data"]["blob"]
    store = open_store(tmp_path)
    try:
        assert raw_value(store.get("blob") or "") == (BLOB, "image/png")
        assert store.entry("text") == ("héllo", store.entry("text")[1])  # type: ignore[index]
        assert raw_value(store.get("typed") or "") == (b"{}", "application/json")
        # In memory the bytes take one character each (latin-1), not their base64.
        assert len(store._data["blob"]) < len(BLOB) + 60
    finally:
        store.abandon()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "data")
    yield s
    s.abandon()


def request(
    client: StubTreq, method: str, path: str, data: bytes | None = None, **headers: str
) -> tuple[int, bytes, Any]:
    async def go() -> tuple[int, bytes, Any]:
        response = await client.request(
            method, BASE + path, data=data, headers={k.replace("_", "-"): [v] for k, v in headers.items()}
        )
        return response.code, await response.content(), response.headers

    results: list[Any] = []
    d: Deferred[Any] = ensureDeferred(go())
    client.flush()
    d.addBoth(results.append)
    assert results and not hasattr(results[0], "raiseException"), results
    return results[0]  # type: ignore[no-any-return]


def test_node_answers_base64_json_and_raw_bytes_with_the_content_type_given(store: Store) -> None:
    client = StubTreq(NodeAPI("a", store, max_value_bytes=4096).resource())
    status, body, _ = request(client, "PUT", "/kv/img", BLOB, Content_Type="image/png")
    assert status == 200
    answer = json.loads(body)
    assert answer["value"] == base64.b64encode(BLOB).decode() and answer["encoding"] == "base64"
    status, body, headers = request(client, "GET", "/kv/img?raw=true")
    assert status == 200 and body == BLOB
    assert headers.getRawHeaders(b"content-type") == [b"image/png"]
    assert headers.getRawHeaders(b"etag") == [b'"%s"' % answer["version"].encode()]
    status, body, _ = request(client, "GET", "/kv/img")
    assert json.loads(body) == {
        "success": True,
        "key": "img",
        **value_json(store.get("img") or ""),
        "content_type": "image/png",
        "version": answer["version"],
    }, "the JSON answer also says the content type ?raw serves"
    request(client, "PUT", "/kv/bin", b"\xff")
    status, body, headers = request(client, "GET", "/kv/bin?raw=1")
    assert body == b"\xff" and headers.getRawHeaders(b"content-type") == [b"application/octet-stream"]
    request(client, "PUT", "/kv/t", b"hi")
    status, body, headers = request(client, "GET", "/kv/t")
    assert json.loads(body)["value"] == "hi" and "encoding" not in json.loads(body)  # text unchanged
    status, body, headers = request(client, "GET", "/kv/t?raw=true")
    assert body == b"hi" and headers.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert request(client, "GET", "/kv/t?raw=maybe")[0] == 400
    assert request(client, "GET", "/kv/absent?raw=true")[0] == 404
    assert request(client, "PUT", "/kv/x", b"v", Content_Type="bad\x01type")[0] == 400


@pytest.fixture
def three(harness: Harness) -> Harness:
    """The harness with nodes a, b and c up and seen by the gateway."""
    harness.watcher.start()
    for node_id in ("a", "b", "c"):
        harness.start_node(node_id)
    harness.advance(1)
    return harness


def test_gateway_carries_bytes_through_replication_listing_batch_and_repair(three: Harness) -> None:
    harness = three
    status, body = harness.gateway("PUT", "/kv/blob", BLOB)
    assert status == 200 and body["encoding"] == "base64" and base64.b64decode(body["value"]) == BLOB
    for store in harness.stores.values():
        entry = store.entry("blob")
        assert entry is not None and raw_value(entry[0] or "")[0] == BLOB
    assert harness.gateway("GET", "/kv/blob")[1]["value"] == body["value"]
    status, put = harness.gateway("PUT", "/kv/text", b"plain")
    assert status == 200 and "encoding" not in put
    assert {k: put[k] for k in ("success", "key", "value", "version")} == {
        "success": True,
        "key": "text",
        "value": "plain",
        "version": harness.gateway("GET", "/kv/text")[1]["version"],
    }
    status, listed = harness.gateway("GET", "/kv?values=true")
    items = {item["key"]: item for item in listed["items"]}
    assert items["blob"]["encoding"] == "base64" and base64.b64decode(items["blob"]["value"]) == BLOB
    assert "encoding" not in items["text"]
    batch = {"put": {"b2": {"value": base64.b64encode(b"\x00\xff").decode(), "encoding": "base64"}}, "get": ["blob"]}
    status, answer = harness.gateway("POST", "/batch", json.dumps(batch).encode())
    assert status == 200
    assert answer["results"]["b2"]["encoding"] == "base64" and answer["results"]["b2"]["value"] == "AP8="
    assert base64.b64decode(answer["results"]["blob"]["value"]) == BLOB
    # A batch put answers as the single-key PUT does, content type included.
    assert answer["results"]["b2"]["content_type"] == harness.gateway("GET", "/kv/b2")[1]["content_type"]
    typed = {"put": {"t2": {"value": "<p/>", "content_type": "text/html"}}}
    status, answer = harness.gateway("POST", "/batch", json.dumps(typed).encode())
    assert status == 200 and answer["results"]["t2"]["content_type"] == "text/html"
    assert answer["results"]["t2"]["value"] == "<p/>" and "encoding" not in answer["results"]["t2"]
    # A replica that lost the value gets the same bytes back from read repair.
    harness.stores["a"].drop_batch([["blob", harness.stores["a"].entry("blob")[1]]])  # type: ignore[index]
    harness.gateway("GET", "/kv/blob")
    harness.settle()
    harness.advance(1)
    entry = harness.stores["a"].entry("blob")
    assert entry is not None and raw_value(entry[0] or "")[0] == BLOB


def test_gateway_answers_raw_bytes_with_their_content_type(harness: Harness) -> None:
    harness.watcher.start()
    for node_id in ("a", "b", "c"):
        harness.start_node(node_id)
    harness.advance(1)
    assert harness.gateway("PUT", "/kv/blob", BLOB)[0] == 200
    results: list[Any] = []
    ensureDeferred(harness.client.call("GET", "http://gateway.test/kv/blob?raw=true")).addBoth(results.append)
    harness.settle()
    assert results[0].status == 200 and results[0].body == BLOB


def test_a_paxos_acceptor_record_keeps_a_binary_value_exactly() -> None:
    """A paxos.jsonl of before carries values into the journal at its migration: bytes must survive its reading."""
    from kvd.paxos import Proposal, _parse
    from kvd.testing.paxos_jsonl import paxos_jsonl

    value = parse_value(BLOB, 10_000, b"image/png")
    line = paxos_jsonl([("k", "b1", Proposal("b1", value, "0000000f4240000000.gw"))])
    parsed = _parse(line)
    assert not isinstance(parsed, str)
    accepted = parsed[1].accepted
    assert accepted is not None and raw_value(accepted.value or "") == (BLOB, "image/png")


def test_an_internal_write_of_a_malformed_typed_value_is_refused_not_stored(store: Store) -> None:
    client = StubTreq(NodeAPI("a", store).resource())
    items = [["k", "\udfffb\x1fnot base64!", "0000000f4240000000.gw"]]
    body = json.dumps({"items": items}).encode()
    status, _, _ = request(client, "POST", "/internal/apply", body)
    assert status == 400 and store.entry("k") is None


def test_the_change_feed_answers_bytes_in_base64_too(three: Harness) -> None:
    """Every answer that carries values carries bytes the same way."""
    h = three
    start = h.gateway("GET", "/changes")[1]["next"]
    assert h.gateway("PUT", "/kv/bin", b"\xff\xfe")[0] == 200
    status, body = h.gateway("GET", f"/changes?cursor={start}")
    assert status == 200
    [change] = [c for c in body["changes"] if c["key"] == "bin"]
    assert (change["value"], change["encoding"]) == ("//4=", "base64")


def test_bytes_survive_an_export_and_an_import(three: Harness) -> None:
    h = three
    assert h.gateway("PUT", "/kv/bin", BLOB)[0] == 200
    results: list[Any] = []
    ensureDeferred(h.client.call("GET", "http://gateway.test/export")).addBoth(results.append)
    h.settle()
    [line] = [json.loads(x) for x in results[0].body.splitlines() if b'"bin"' in x]
    assert line["encoding"] == "base64" and base64.b64decode(line["value"]) == BLOB
    assert h.gateway("DELETE", "/kv/bin")[0] == 200
    line["version"] = h.coordinator.clock.next()  # newer than the delete
    status, answer = h.gateway("POST", "/import", json.dumps(line).encode() + b"\n")
    assert status == 200 and answer["imported"] == 1, answer
    assert base64.b64decode(h.gateway("GET", "/kv/bin")[1]["value"]) == BLOB


def test_gateway_json_answers_of_typed_values_say_their_content_type_and_plain_text_does_not(
    three: Harness,
) -> None:
    harness = three

    def put(key: str, value: bytes, content_type: bytes) -> int:
        results: list[Any] = []
        headers = b"Content-Type: %s\r\n" % content_type
        call = harness.client.call("PUT", f"http://gateway.test/kv/{key}", value, headers=headers)
        ensureDeferred(call).addBoth(results.append)
        harness.settle()
        return int(results[0].status)

    assert put("img", BLOB, b"image/png") == 200
    assert harness.gateway("PUT", "/kv/bin", b"\xff")[0] == 200
    assert put("doc", b"{}", b"application/json") == 200
    assert harness.gateway("PUT", "/kv/text", b"plain")[0] == 200
    answers = {key: harness.gateway("GET", f"/kv/{key}")[1] for key in ("img", "bin", "doc", "text")}
    assert answers["img"]["content_type"] == "image/png" and answers["img"]["encoding"] == "base64"
    assert answers["bin"]["content_type"] == "application/octet-stream"
    assert answers["doc"]["content_type"] == "application/json" and answers["doc"]["value"] == "{}"
    assert "content_type" not in answers["text"] and "encoding" not in answers["text"]
    _, answer = harness.gateway("POST", "/batch", json.dumps({"get": ["img", "text"]}).encode())
    assert answer["results"]["img"]["content_type"] == "image/png"
    assert "content_type" not in answer["results"]["text"]
    # A batch put takes text with its content type, as a JSON answer gives it.
    put = {"put": {"doc2": {"value": "[1]", "content_type": "application/json"}}}
    assert harness.gateway("POST", "/batch", json.dumps(put).encode())[0] == 200
    _, doc2 = harness.gateway("GET", "/kv/doc2")
    assert (doc2["value"], doc2["content_type"]) == ("[1]", "application/json")


def test_a_json_text_value_object_needs_its_content_type() -> None:
    from kvd.keys import BadValue, text_value

    assert raw_value(text_value({"value": "{}", "content_type": "application/json"}, "k")) == (
        b"{}",
        "application/json",
    )
    for bad in (
        {"value": ""},
        {"value": "x", "content_type": ""},
        {"value": 1, "content_type": "a/b"},
        {"value": "x", "content_type": "text/\u20ac"},  # not ASCII: refused, not stored as "text/?"
        {"value": "AA==", "encoding": "base64", "content_type": "image/\u20ac"},
    ):
        with pytest.raises(BadValue):
            text_value(bad, "k")
