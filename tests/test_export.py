"""
GET /export and POST /import through the whole simulated cluster (registry, nodes and a
gateway over the in-memory network, on a Clock), and the export's backpressure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed

from kvd.gateway.export import Cut, Exporter, Valve, parse_line
from kvd.gateway.listing import Page
from kvd.keys import ClientError
from kvd.testing.cluster import Harness
from kvd.versions import encode


def cluster(tmp_path: Path, nodes: int) -> Harness:
    h = Harness(tmp_path)
    h.watcher.start()
    for i in range(nodes):
        h.start_node(f"n{i}")
    h.advance(1)
    return h


@pytest.fixture
def three(tmp_path: Path) -> Iterator[Harness]:
    h = cluster(tmp_path / "three", 3)
    try:
        yield h
    finally:
        h.close()


def raw(h: Harness, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    results: list[Any] = []

    async def call() -> tuple[int, bytes]:
        answer = await h.client.call(method, "http://gateway.test" + path, body)
        return answer.status, answer.body

    ensureDeferred(call()).addBoth(results.append)
    h.settle()
    assert results, f"{method} {path} did not finish"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


def export(h: Harness, at: str | None = None) -> list[dict[str, Any]]:
    status, body = raw(h, "GET", "/export" + ("" if at is None else f"?at={at}"))
    assert status == 200, body
    return [json.loads(line) for line in body.splitlines()]


def put(h: Harness, key: str, value: str, query: str = "") -> str:
    status, body = h.gateway("PUT", f"/kv/{key}{query}", value.encode())
    assert status == 200, body
    return str(body["version"])


def data(h: Harness) -> dict[str, tuple[str, str]]:
    return {e["key"]: (e["value"], e["version"]) for e in export(h)}


def test_export_gives_every_live_key_once_in_order_with_its_version_and_nothing_else(three: Harness) -> None:
    versions = {f"k{i:04d}": put(three, f"k{i:04d}", f"v{i}") for i in range(2500)}  # several pages
    three.gateway("DELETE", "/kv/k0001")
    del versions["k0001"]
    lines = export(three)
    assert [line["key"] for line in lines] == sorted(versions)
    assert all(set(line) == {"key", "value", "version"} for line in lines)
    assert all(line["version"] == versions[line["key"]] for line in lines)
    assert all(line["value"] == f"v{int(line['key'][1:])}" for line in lines)


def test_the_cut_leaves_out_keys_written_or_deleted_after_it_and_expired_ones(three: Harness) -> None:
    kept = put(three, "kept", "1")
    put(three, "overwritten", "old")
    put(three, "deleted", "x")
    put(three, "expiring", "y", "?ttl=5")
    lasting = put(three, "lasting", "z", "?ttl=500")
    three.advance(2)
    cut = three.clock.seconds()
    three.advance(2)
    put(three, "overwritten", "new")
    three.gateway("DELETE", "/kv/deleted")
    put(three, "later", "w")
    three.advance(2)  # "expiring" has expired
    by_time = {e["key"]: e["version"] for e in export(three, at=str(cut))}
    assert by_time == {"kept": kept, "lasting": lasting}
    by_version = {e["key"] for e in export(three, at=lasting)}
    assert by_version == {"kept", "lasting"}
    assert {e["key"] for e in export(three, at=kept)} == {"kept"}
    now = {e["key"] for e in export(three)}
    assert now == {"kept", "lasting", "overwritten", "later"}


def test_a_bad_cut_is_a_400_and_an_export_with_no_nodes_a_503(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    try:
        status, body = raw(h, "GET", "/export?at=yesterday")
        assert status == 400 and "at must be a version or Unix seconds" in json.loads(body)["error"]
        status, body = raw(h, "GET", "/export")
        assert status == 503 and json.loads(body)["success"] is False
    finally:
        h.close()


def ndjson(entries: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(e).encode() + b"\n" for e in entries)


def test_importing_twice_is_importing_once(three: Harness, tmp_path: Path) -> None:
    for i in range(300):
        put(three, f"k{i}", f"v{i}")
    backup = export(three)
    target = cluster(tmp_path / "target", 3)
    try:
        first = target.gateway("POST", "/import", ndjson(backup))
        assert first == (200, {"success": True, "imported": 300, "skipped": 0, "failed": 0, "errors": []})
        after_once = {n: s.listing("", None, 1000, True).entries for n, s in target.stores.items()}
        once = data(target)
        second = target.gateway("POST", "/import", ndjson(backup))
        assert second[0] == 200 and second[1]["imported"] == 300
        assert data(target) == once == {e["key"]: (e["value"], e["version"]) for e in backup}
        assert {n: s.listing("", None, 1000, True).entries for n, s in target.stores.items()} == after_once
        for key in once:
            owners = target.gateway("GET", f"/cluster/owners/{key}")[1]["nodes"]
            assert [target.stores[o].entry(key) for o in owners] == [once[key]] * 3
    finally:
        target.close()


def test_an_import_changes_nothing_newer(three: Harness) -> None:
    old = {f"k{i}": put(three, f"k{i}", "old") for i in range(20)}
    backup = export(three)
    newer = {f"k{i}": put(three, f"k{i}", "new") for i in range(10)}
    three.gateway("DELETE", "/kv/k19")
    status, body = three.gateway("POST", "/import", ndjson(backup))
    assert status == 200 and (body["imported"], body["skipped"]) == (9, 11)
    got = data(three)
    assert got == {
        **{k: ("new", v) for k, v in newer.items()},
        **{k: ("old", v) for k, v in old.items() if k not in newer and k != "k19"},
    }
    assert three.gateway("GET", "/kv/k19")[0] == 404
    # The gateway's clock moved past what it imported: a later write wins.
    assert put(three, "k15", "later") > old["k15"]


def test_a_restore_into_an_empty_cluster_of_another_size_gives_the_same_data(three: Harness, tmp_path: Path) -> None:
    for i in range(500):
        put(three, f"k{i}", f"v{i}", "?ttl=1000" if i % 7 == 0 else "")
    three.gateway("DELETE", "/kv/k3")
    source = data(three)
    five = cluster(tmp_path / "five", 5)
    try:
        status, body = five.gateway("POST", "/import", ndjson(export(three)))
        assert status == 200 and body["imported"] == 499
        assert data(five) == source
        assert all(len([s for s in five.stores.values() if s.entry(k) is not None]) == 3 for k in source)
        assert five.gateway("GET", "/kv/k7")[1]["version"] == source["k7"][1]
    finally:
        five.close()


def test_bad_lines_are_a_400_naming_them_and_every_good_line_is_imported(three: Harness) -> None:
    version = encode(int(three.clock.seconds() * 1000), 0, "gw")
    far = encode(int((three.clock.seconds() + 10 * 3600) * 1000), 0, "gw")
    lines = [
        json.dumps({"key": "good", "value": "1", "version": version}).encode(),
        b"{not json",
        json.dumps({"key": "", "value": "1", "version": version}).encode(),
        b"",
        json.dumps({"key": "k", "value": 5, "version": version}).encode(),
        json.dumps({"key": "k", "value": "1", "version": "v1"}).encode(),
        json.dumps({"key": "k", "value": "1", "version": far}).encode(),
        json.dumps({"key": "good2", "value": "2", "version": version + "~1"}).encode(),  # expired long ago
        json.dumps([1, 2]).encode(),
    ]
    status, body = three.gateway("POST", "/import", b"\n".join(lines))
    assert status == 400
    assert (body["success"], body["imported"], body["skipped"], body["failed"]) == (False, 1, 1, 6)
    assert [e["line"] for e in body["errors"]] == [2, 3, 5, 6, 7, 9]
    assert body["error"].startswith("6 lines were not imported; line 2: not JSON")
    assert data(three) == {"good": ("1", version)}


def test_an_import_the_cluster_cannot_take_is_a_503_with_the_counts(three: Harness) -> None:
    version = encode(int(three.clock.seconds() * 1000), 0, "gw")
    for node_id in ("n1", "n2"):
        three.crash_node(node_id)
    three.advance(15)
    results: list[Any] = []
    body = ndjson([{"key": "k", "value": "1", "version": version}])
    ensureDeferred(three._call("POST", "http://gateway.test/import", body)).addBoth(results.append)
    three.settle()
    assert not results, "a write the cluster could not take is tried again before it is reported"
    three.advance(10)
    status, answer = results[0]
    assert status == 503 and answer["failed"] == 1 and answer["errors"][0]["line"] == 1


def test_an_import_rides_out_nodes_that_come_back_within_its_retries(three: Harness) -> None:
    version = encode(int(three.clock.seconds() * 1000), 0, "gw")
    for node_id in ("n1", "n2"):
        three.crash_node(node_id)
    results: list[Any] = []
    body = ndjson([{"key": "k", "value": "1", "version": version}])
    ensureDeferred(three._call("POST", "http://gateway.test/import", body)).addBoth(results.append)
    three.advance(0.5, step=0.1)
    assert not results
    for node_id in ("n1", "n2"):
        three.start_node(node_id, incarnation=2)
    three.advance(6, step=0.1)
    status, answer = results[0]
    assert (status, answer["imported"], answer["failed"]) == (200, 1, 0), answer


def test_parse_line_and_cut_reject_what_is_not_theirs() -> None:
    with pytest.raises(ClientError):
        parse_line(b'{"key": "k", "value": "12345", "version": "' + encode(1, 0, "x").encode() + b'"}', 4)
    assert parse_line(b'{"key": "k", "value": "v", "version": "%s~9"}' % encode(1, 0, "x").encode(), 4)[0] == "k"
    cut = Cut("1.0", encode(1000, 0, ""), True)
    assert cut.admits(encode(1000, 5, "z")) and cut.admits(encode(999, 0, "a") + "~5")
    assert not cut.admits(encode(1001, 0, "a"))


class Pages:
    """A lister of three pages that records which it was asked for."""

    def __init__(self) -> None:
        self.asked: list[str | None] = []

    def page(self, prefix: str, after: str | None, limit: int, values: bool) -> Deferred[Page]:
        self.asked.append(after)
        n = len(self.asked)
        return succeed(Page([(f"k{n}", "v", encode(1, 0, "x"))], None if n == 3 else f"k{n}"))


def test_a_paused_consumer_holds_the_export_to_the_page_it_has() -> None:
    pages = Pages()
    exporter = Exporter(pages, Cut("x", encode(2, 0, "x"), False))  # type: ignore[arg-type]
    valve = Valve()
    written: list[bytes] = []

    async def run() -> None:
        async for chunk in exporter.chunks(valve):
            written.append(chunk)
            valve.pauseProducing()  # the transport's buffer is full after each page

    done = ensureDeferred(run())
    assert len(written) == 1 and pages.asked == [None]
    valve.resumeProducing()
    assert len(written) == 2 and pages.asked == [None, "k1"]
    valve.stopProducing()  # the client went away: no more pages are asked for
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert pages.asked == [None, "k1"] and failures and "ExportStopped" in str(failures[0].type)
    assert exporter.exported == 2


def test_an_import_line_keeps_the_content_type_of_bytes_and_of_typed_text() -> None:
    from kvd.keys import raw_value

    version = "0000000f4240000000.gw"
    line = {"key": "img", "value": "AP8=", "encoding": "base64", "content_type": "image/png", "version": version}
    _, value, _ = parse_line(json.dumps(line).encode(), 100)
    assert raw_value(value) == (b"\x00\xff", "image/png")
    line = {"key": "doc", "value": "{}", "content_type": "application/json", "version": version}
    _, value, _ = parse_line(json.dumps(line).encode(), 100)
    assert raw_value(value) == (b"{}", "application/json")
    with pytest.raises(ClientError):
        parse_line(json.dumps({**line, "content_type": 3}).encode(), 100)


def test_an_export_line_carries_the_content_type_so_export_then_import_keeps_it() -> None:
    from kvd.gateway.export import line
    from kvd.keys import typed_value

    version = "0000000f4240000000.gw"
    for stored in (typed_value(b"\x89PNG", "image/png"), typed_value("<b>", "text/html"), "plain"):
        exported = line("k", stored, version)
        assert parse_line(exported.rstrip(b"\n"), 100) == ("k", stored, version), exported
    assert json.loads(line("k", typed_value(b"\x00", "image/png"), version))["content_type"] == "image/png"
    assert "content_type" not in json.loads(line("k", "plain", version)), "plain text lines are as they were"
