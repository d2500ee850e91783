"""
The second part of the client API in the deterministic simulation: TTL on every replica,
listing across the cluster, batches. Real nodes, gateway and transport on a Clock.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.web.resource import Resource

from kvd.membership import NodeInfo
from kvd.resources import NodeAPI
from kvd.testing.cluster import Harness

START = 1_700_000_000.0


class Counting(Resource):
    """Serves a node's resource and counts the requests it gets, by path."""

    isLeaf = True

    def __init__(self, inner: Resource, counts: Counter[str]) -> None:
        super().__init__()
        self.inner, self.counts = inner, counts

    def render(self, request: Any) -> Any:
        self.counts[request.path.decode()] += 1
        return self.inner.render(request)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    h.clock.advance(START)
    try:
        yield h
    finally:
        h.close()


def three_nodes(harness: Harness, ids: str = "abc") -> None:
    for node_id in ids:
        harness.start_node(node_id)
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in ids})


def counted(harness: Harness) -> dict[str, Counter[str]]:
    counts: dict[str, Counter[str]] = {}
    for node_id, store in harness.stores.items():
        counts[node_id] = Counter()
        harness.network.serve(f"{node_id}.test", Counting(NodeAPI(node_id, store).resource(), counts[node_id]))
    return counts


def batch(harness: Harness, body: object) -> tuple[int, Any]:
    return harness.gateway("POST", "/batch", json.dumps(body).encode())


# TTL


def test_an_expiring_key_is_read_before_at_and_after_its_expiry_on_every_replica(harness: Harness) -> None:
    three_nodes(harness)
    status, body = harness.gateway("PUT", "/kv/k?ttl=10", b"v")
    assert status == 200 and body["expires"] == START + 10
    version = body["version"]
    get = harness.gateway("GET", "/kv/k")
    assert get[0] == 200 and get[1]["expires"] == START + 10 and get[1]["version"] == version
    harness.clock.advance(9.999)
    for node_id in "abc":
        assert harness.call("GET", f"http://{node_id}.test/kv/k")[1]["value"] == "v"
    assert harness.gateway("GET", "/kv/k")[0] == 200
    harness.clock.advance(0.001)  # at the expiry
    for node_id in "abc":
        assert harness.call("GET", f"http://{node_id}.test/kv/k")[0] == 404, node_id
        assert harness.stores[node_id].entry("k") == (None, version)
    assert harness.gateway("GET", "/kv/k")[0] == 404
    assert harness.gateway("DELETE", "/kv/k")[0] == 404
    harness.clock.advance(1000)
    assert harness.gateway("GET", "/kv/k")[0] == 404


def test_the_gateway_treats_an_expired_entry_as_absent_even_when_a_node_clock_lags(harness: Harness) -> None:
    three_nodes(harness)
    version = harness.gateway("PUT", "/kv/k?ttl=5", b"v")[1]["version"]
    for store in harness.stores.values():
        store.clock.now = lambda: START  # every node's clock stopped before the expiry
    harness.clock.advance(5)
    assert harness.call("GET", "http://a.test/kv/k")[0] == 200, "the node still thinks it live"
    assert harness.gateway("GET", "/kv/k")[0] == 404, "the gateway checks the expiry with its own clock"
    assert harness.gateway("GET", "/kv?values=true")[1]["items"] == []
    assert version


def test_a_node_whose_clock_runs_ahead_does_not_make_a_live_key_flap(harness: Harness) -> None:
    """
    A node an hour fast turns a key with ten minutes to live into a tombstone of the same
    version; the gateway, which judges expiry by its own clock, keeps answering the value
    whichever replicas answer, in reads and listings, until the expiry by its own clock.
    """
    three_nodes(harness)
    version = harness.gateway("PUT", "/kv/k?ttl=600", b"v")[1]["version"]
    fast = harness.stores["c"]
    fast.clock.now = lambda: harness.clock.seconds() + 3600
    expired: list[int] = []
    fast.expire().addCallback(expired.append)
    harness.settle()
    assert expired == [1]
    assert fast.entry("k") == (None, version)
    for down in ("a", "b"):  # each read then has c's tombstone beside one value
        harness.crash_node(down)
        for _ in range(4):
            status, body = harness.gateway("GET", "/kv/k")
            assert (status, body.get("value")) == (200, "v"), down
        assert [item["key"] for item in harness.gateway("GET", "/kv?values=true")[1]["items"]] == ["k"]
        harness.start_node(down)
        harness.advance(5)  # probed and reachable again
    harness.clock.advance(600)
    assert harness.gateway("GET", "/kv/k")[0] == 404


def test_a_put_without_ttl_makes_an_expiring_key_permanent(harness: Harness) -> None:
    three_nodes(harness)
    harness.gateway("PUT", "/kv/k?ttl=5", b"v1")
    status, body = harness.gateway("PUT", "/kv/k", b"v2")
    assert status == 200 and "expires" not in body
    harness.clock.advance(3600)
    assert harness.gateway("GET", "/kv/k")[1]["value"] == "v2"


@pytest.mark.parametrize("ttl", ["0", "-3", "nan", "inf", "x", "400000000"])
def test_a_bad_ttl_is_a_400_on_node_and_gateway(harness: Harness, ttl: str) -> None:
    three_nodes(harness)
    for url in ("http://gateway.test", "http://a.test"):
        status, body = harness.call("PUT", f"{url}/kv/k?ttl={ttl}", b"v")
        assert status == 400 and body["success"] is False and "ttl" in body["error"]
    assert harness.gateway("GET", "/kv/k")[0] == 404


def test_a_node_takes_a_ttl_itself(harness: Harness) -> None:
    three_nodes(harness, "a")
    status, body = harness.call("PUT", "http://a.test/kv/k?ttl=2", b"v")
    assert status == 200 and body["expires"] == START + 2
    assert harness.call("GET", "http://a.test/kv/k")[1]["expires"] == START + 2
    harness.clock.advance(2)
    assert harness.call("GET", "http://a.test/kv/k")[0] == 404


def test_repair_never_brings_an_expired_value_back_and_collects_it(harness: Harness) -> None:
    three_nodes(harness)
    harness.crash_node("c")
    version = harness.gateway("PUT", "/kv/k?ttl=5", b"v")[1]["version"]
    assert harness.stores["c"].entry("k") is None
    harness.start_node("c")
    done = ensureDeferred(harness.repairer.sweep())
    harness.settle()
    assert done.called
    assert harness.stores["c"].entry("k") == ("v", version), "repair copied the entry with its expiry"
    harness.clock.advance(5)
    assert all(store.entry("k") == (None, version) for store in harness.stores.values())
    harness.clock.advance(120)  # past the tombstone grace of the harness's repairer
    done = ensureDeferred(harness.repairer.sweep())
    harness.settle()
    assert done.called
    assert all(store.entry("k") is None for store in harness.stores.values()), "collected like any tombstone"
    assert harness.gateway("GET", "/kv/k")[0] == 404


def test_repair_does_not_collect_a_live_key_a_fast_node_calls_expired(harness: Harness) -> None:
    """
    A key written with ten minutes to live, over a tombstone grace ago, on a cluster where one
    node runs an hour fast: that node reports it dead, but a sweep neither collects it on the
    owners nor hands a lacking owner the fast node's tombstone instead of the value.
    """
    three_nodes(harness)
    harness.crash_node("b")
    version = harness.gateway("PUT", "/kv/k?ttl=600", b"v")[1]["version"]
    harness.start_node("b")
    harness.clock.advance(120)  # past the harness repairer's grace of 60 s; 480 s still to live
    harness.stores["a"].clock.now = lambda: harness.clock.seconds() + 3600
    for _ in range(2):  # the first hands b the key, the second finds every owner holding it
        done = ensureDeferred(harness.repairer.sweep())
        harness.settle()
        assert done.called
    assert harness.repairer.progress.tombstones_collected == 0
    assert harness.stores["c"].entry("k") == ("v", version)
    assert harness.stores["b"].entry("k") == ("v", version), "the lacking owner got the value"
    assert harness.gateway("GET", "/kv/k")[1].get("value") == "v"
    harness.clock.advance(480)  # expired by every clock now: collected like any tombstone
    for _ in range(2):
        done = ensureDeferred(harness.repairer.sweep())
        harness.settle()
    assert all(store.entry("k") is None for store in harness.stores.values())


# Listing


def test_5000_keys_over_3_nodes_list_complete_in_order_with_one_node_down_and_no_deleted_key(
    harness: Harness,
) -> None:
    three_nodes(harness)
    keys = [f"key/{i:05d}" for i in range(5000)]
    for start in range(0, 5000, 1000):
        status, body = batch(harness, {"put": {k: f"v{k}" for k in keys[start : start + 1000]}})
        assert status == 200 and all(r["status"] == 200 for r in body["results"].values())
    batch(harness, {"put": {"other": "x", "kez": "y"}})  # outside the prefix
    # Delete 500 keys while c is down, so c still holds them live...
    harness.crash_node("c")
    deleted = set(keys[::10])
    for part in range(0, 500, 250):
        chunk = sorted(deleted)[part : part + 250]
        status, body = batch(harness, {"delete": chunk})
        assert status == 200 and all(r["status"] == 200 for r in body["results"].values())
    harness.start_node("c")
    assert harness.stores["c"].get(keys[0]) == f"v{keys[0]}"
    # ...then take a down: b holds the tombstones, c the stale values; the tombstones must win.
    harness.crash_node("a")
    listed: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        query = "/kv?prefix=key/&limit=100" + (f"&after={after}" if after else "")
        status, body = harness.gateway("GET", query)
        assert status == 200, body
        listed += body["keys"]
        pages += 1
        after = body["next"]
        if after is None:
            break
        assert pages < 200
    live = [k for k in keys if k not in deleted]
    assert listed == live, "every live key exactly once, in order, none deleted"
    assert pages >= 45


def test_a_listing_with_values_and_its_page_size_limits(harness: Harness) -> None:
    three_nodes(harness)
    batch(harness, {"put": {"a": "1", "b": "2", "c": "3"}})
    status, body = harness.gateway("GET", "/kv?values=true&limit=2")
    assert status == 200 and [(i["key"], i["value"]) for i in body["items"]] == [("a", "1"), ("b", "2")]
    assert body["next"] == "b"
    status, body = harness.gateway("GET", "/kv?values=true&after=b")
    assert [i["key"] for i in body["items"]] == ["c"] and body["next"] is None
    assert harness.gateway("GET", "/kv")[1] == {"success": True, "keys": ["a", "b", "c"], "next": None}
    for bad in ("limit=1001", "limit=0", "limit=x", "values=maybe"):
        status, body = harness.gateway("GET", f"/kv?{bad}")
        assert status == 400 and body["success"] is False, bad
    assert harness.gateway("GET", "/kv?limit=1000")[0] == 200


def test_a_listing_over_non_ascii_keys_is_in_byte_order(harness: Harness) -> None:
    three_nodes(harness)
    keys = ["z", "é", "日本", "\U0001f600", "a", "\ufffd"]
    batch(harness, {"put": {k: "v" for k in keys}})
    assert harness.gateway("GET", "/kv")[1]["keys"] == sorted(keys, key=lambda k: k.encode())
    assert harness.gateway("GET", "/kv?prefix=%E6%97%A5")[1]["keys"] == ["日本"]


def test_a_listing_over_many_tombstones_pages_on_with_bounded_work(harness: Harness) -> None:
    three_nodes(harness)
    batch(harness, {"put": {f"k{i:04d}": "v" for i in range(300)}})
    batch(harness, {"delete": [f"k{i:04d}" for i in range(299)]})
    status, body = harness.gateway("GET", "/kv?limit=10")
    assert status == 200 and body["keys"] == [] and body["next"] == "k0009", "ten tombstones a node, then next"
    keys, after = [], body["next"]
    while after is not None:
        body = harness.gateway("GET", f"/kv?limit=100&after={after}")[1]
        keys += body["keys"]
        after = body["next"]
    assert keys == ["k0299"]


def test_a_listing_with_too_many_nodes_down_is_a_503_not_a_short_page(harness: Harness) -> None:
    three_nodes(harness)
    batch(harness, {"put": {"a": "1"}})
    harness.crash_node("a")
    harness.crash_node("b")
    harness.crash_node("c")
    status, body = harness.gateway("GET", "/kv")
    assert status == 503 and body["success"] is False


def test_a_node_answering_a_listing_out_of_order_is_not_believed(harness: Harness) -> None:
    three_nodes(harness)
    batch(harness, {"put": {"a": "1", "b": "2"}})

    class Garbage(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return b'{"success": true, "entries": [["b", "1", "x"], ["a", "1", "x"]], "more": false}'

    harness.network.serve("c.test", Garbage())
    status, body = harness.gateway("GET", "/kv")
    assert status == 200 and body["keys"] == ["a", "b"], "c's answer is dropped as a failure; a and b suffice"


# Batch


def test_a_batch_answers_each_key_as_if_alone(harness: Harness) -> None:
    three_nodes(harness)
    harness.gateway("PUT", "/kv/old", b"o")
    status, body = batch(harness, {"get": ["old", "missing"], "put": {"new": "n"}, "delete": ["old2", "gone"]})
    assert status == 200 and body["success"] is True
    results = body["results"]
    assert results["old"] == {
        "status": 200,
        "success": True,
        "key": "old",
        "value": "o",
        "version": results["old"]["version"],
    }
    assert results["missing"]["status"] == 404 and results["missing"]["success"] is False
    assert results["new"]["status"] == 200 and results["new"]["value"] == "n"
    # A write's result carries its receipt, as the single-key answer does.
    assert len(results["new"]["replicas"]) >= 2 and set(results["new"]["replicas"]) <= {"a", "b", "c"}
    assert results["new"]["hinted"] == {}
    assert results["old2"]["status"] == 404 and results["gone"]["status"] == 404
    assert harness.gateway("GET", "/kv/new")[1]["value"] == "n"
    status, body = batch(harness, {"delete": ["new"]})
    assert body["results"]["new"]["status"] == 200 and len(body["results"]["new"]["replicas"]) >= 2
    assert harness.gateway("GET", "/kv/new")[0] == 404


def test_a_batch_goes_as_one_internal_request_per_node_and_kind(harness: Harness) -> None:
    three_nodes(harness)
    counts = counted(harness)
    status, body = batch(harness, {"put": {f"k{i}": "v" for i in range(100)}})
    assert status == 200 and len(body["results"]) == 100
    assert all(c["/internal/apply"] == 1 for c in counts.values()), counts
    for c in counts.values():
        c.clear()
    status, body = batch(harness, {"get": [f"k{i}" for i in range(100)]})
    assert all(r["status"] == 200 for r in body["results"].values())
    reads = [c["/internal/read"] for c in counts.values()]
    assert max(reads) == 1 and sum(reads) >= 2, counts


def test_a_batch_with_a_replica_too_few_gives_each_key_its_503(harness: Harness) -> None:
    three_nodes(harness)
    harness.crash_node("b")
    harness.crash_node("c")
    status, body = batch(harness, {"put": {"x": "1"}, "get": ["y"]})
    assert status == 200
    assert body["results"]["x"]["status"] == 503 and body["results"]["y"]["status"] == 503
    single = harness.gateway("PUT", "/kv/x", b"1")
    assert single[0] == 503
    x = body["results"]["x"]
    # Each key's 503 says what the single-key one does: who answered, who took it, whether it may appear.
    assert (x["answered"], x["needed"], x["partial"], x["replicas"]) == (1, 2, True, ["a"])
    assert {k: x[k] for k in ("answered", "needed", "partial", "replicas", "hinted")} == {
        k: single[1][k] for k in ("answered", "needed", "partial", "replicas", "hinted")
    }


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"get": "k"},
        {"put": ["k"]},
        {"get": [1]},
        {"get": [""]},
        {"get": ["a\x00"]},
        {"get": ["k"], "delete": ["k"]},
        {"put": {"k": 1}},
        {"fetch": ["k"]},
    ],
)
def test_a_malformed_batch_is_a_400_and_does_nothing(harness: Harness, body: object) -> None:
    three_nodes(harness)
    status, answer = batch(harness, body)
    assert status == 400 and answer["success"] is False


def test_a_batch_over_its_bounds_is_a_413(harness: Harness) -> None:
    three_nodes(harness)
    status, _ = batch(harness, {"get": [f"k{i}" for i in range(1001)]})
    assert status == 413
    status, _ = batch(harness, {"put": {"k": "x" * (1024 * 1024 + 1)}})
    assert status == 413
    status, _ = batch(harness, {"get": [f"k{i}" for i in range(600)], "delete": [f"d{i}" for i in range(400)]})
    assert status == 200


def test_a_batch_answers_values_up_to_its_budget_and_each_get_over_it_is_its_own_413(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is the larger of ANSWER_BUDGET and the value limit (1 MiB here): 6 x 300 KiB do not fit."""
    import kvd.resources

    monkeypatch.setattr(kvd.resources, "ANSWER_BUDGET", 1)
    three_nodes(harness)
    values = {f"big{i}": chr(ord("a") + i) * (300 * 1024) for i in range(6)}
    for key, value in values.items():
        assert harness.gateway("PUT", f"/kv/{key}", value.encode())[0] == 200
    status, body = batch(harness, {"get": [*values, "missing"], "put": {"small": "s"}})
    assert status == 200 and body["success"] is True
    results = body["results"]
    answered = {k: r for k, r in results.items() if k in values and r["status"] == 200}
    over = {k: r for k, r in results.items() if r["status"] == 413}
    assert answered and over and set(answered) | set(over) == set(values), results
    assert sum(len(r["value"]) for r in answered.values()) <= 1024 * 1024
    assert all(
        r == {"status": 413, "success": False, "key": k, "error": "answer too large: ask for fewer keys"}
        for k, r in over.items()
    )
    assert all(answered[k]["value"] == values[k] for k in answered)
    assert results["missing"]["status"] == 404 and results["small"]["status"] == 200
    # Asking again for what came back 413 gets more of it each time: the first value always fits.
    got, rounds = dict.fromkeys(answered), 0
    while len(got) < len(values):
        rounds += 1
        assert rounds <= len(values)
        _, again = batch(harness, {"get": [k for k in values if k not in got]})
        fresh = {k: r["value"] for k, r in again["results"].items() if r["status"] == 200}
        assert fresh and all(fresh[k] == values[k] for k in fresh)
        got.update(fresh)


def test_a_batch_answer_budget_counts_values_as_the_answer_carries_them_escapes_included(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A control character is 6 bytes of JSON: 4 x 100 KiB of them do not fit in 1 MiB of answer."""
    import kvd.resources

    monkeypatch.setattr(kvd.resources, "ANSWER_BUDGET", 1)
    three_nodes(harness)
    keys = [f"ctl{i}" for i in range(4)]
    for key in keys:
        assert harness.gateway("PUT", f"/kv/{key}", b"\x01" * (100 * 1024))[0] == 200
    status, body = batch(harness, {"get": keys})
    assert status == 200
    statuses = sorted(r["status"] for r in body["results"].values())
    assert statuses.count(200) == 1 and statuses.count(413) == 3, statuses
    assert len(json.dumps(body)) <= 1024 * 1024 + 1024


def test_listing_and_batches_need_the_client_token_when_one_is_set() -> None:
    from kvd.auth import Auth, bearer

    auth = Auth(client_token=b"t")
    for path in (b"/kv", b"/batch", b"/kv/k"):
        assert not auth.allows(path, None), path
        assert auth.allows(path, bearer(b"t")), path


def test_a_batch_body_may_be_as_large_as_an_internal_batch_and_no_larger() -> None:
    from kvd.keys import internal_message_limit
    from kvd.web import BoundedSite

    site = BoundedSite(Resource(), max_body=1000)
    assert site.limit_for(b"/batch") == internal_message_limit(1000) == site.limit_for(b"/internal/apply")
    assert site.limit_for(b"/kv/k") == site.limit_for(b"/kv") == 1000
