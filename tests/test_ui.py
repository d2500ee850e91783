"""
The dashboard's server side, with no sockets: the page itself (self-contained), the ring's
sampled arcs (C{/cluster/ring}) and each replica's version of a key (C{/cluster/key/{key}}),
on the in-memory cluster of L{test_cluster}. The page in a browser: tests/browser/.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.web.test.requesthelper import DummyRequest

from kvd import ui
from kvd.auth import Auth
from kvd.membership import NodeInfo
from kvd.resources import GatewayAPI
from kvd.ring import POINT_SPACE, Ring
from kvd.testing.cluster import Hang, Harness


def start(harness: Harness, ids: str) -> None:
    """Nodes C{ids}, running, and the gateway's members (without a watcher, so a crashed one stays)."""
    for node_id in ids:
        harness.start_node(node_id)
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in ids})


def raw(harness: Harness, path: str) -> Any:
    """The gateway's answer to GET path (status, body bytes)."""
    results: list[Any] = []
    ensureDeferred(harness.client.call("GET", "http://gateway.test" + path)).addBoth(results.append)
    harness.settle()
    assert results, f"GET {path} did not finish"
    return results[0]


# --- the ring, sampled -----------------------------------------------------------------------


def test_ring_arcs_are_runs_of_the_owner_of_each_slices_middle() -> None:
    ring = Ring({"a": 1, "b": 1, "c": 2}, vnodes=16)
    runs = ui.ring_arcs(ring, 360)
    assert runs[0][0] == 0
    assert all(x[1] != y[1] for x, y in zip(runs, runs[1:], strict=False)), "a run ends where the owner changes"
    starts = [start for start, _ in runs]
    for i in range(360):
        owner = [node for start, node in runs if start <= i][-1]
        assert owner == ring.owner_at((2 * i + 1) * POINT_SPACE // 720), i
    assert starts == sorted(set(starts))


def test_shares_add_up_and_follow_the_weights_roughly() -> None:
    ring = Ring({"a": 1, "b": 3}, vnodes=400)
    shares = ui.shares(ui.ring_arcs(ring, 4096), 4096)
    assert set(shares) == {"a", "b"} and sum(shares.values()) == pytest.approx(1)
    assert 0.15 < shares["a"] < 0.35


def test_ring_arcs_of_one_node_and_of_no_nodes() -> None:
    assert ui.ring_arcs(Ring({"only": 1}, vnodes=4), 360) == [(0, "only")]
    assert ui.shares([(0, "only")], 360) == {"only": 1.0}
    assert ui.ring_arcs(Ring({}), 360) == []
    with pytest.raises(ValueError):
        ui.ring_arcs(Ring({}), 0)


def test_the_gateway_serves_the_ring_and_refuses_bad_segment_counts(harness: Harness) -> None:
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abc"})
    status, body = harness.gateway("GET", "/cluster/ring")
    assert status == 200 and body["success"] is True and body["segments"] == ui.DEFAULT_SEGMENTS
    assert set(body["shares"]) == {"a", "b", "c"}
    assert [(arc["start"], arc["node"]) for arc in body["arcs"]] == ui.ring_arcs(harness.cluster.ring)
    assert harness.gateway("GET", "/cluster/ring?segments=12")[1]["segments"] == 12
    for bad in ("0", "4097", "x", "-1", "1.5"):
        status, body = harness.gateway("GET", f"/cluster/ring?segments={bad}")
        assert status == 400 and body["success"] is False and "segments" in body["error"], bad


# --- a key's replicas ------------------------------------------------------------------------


def test_each_owner_says_which_version_it_holds(harness: Harness) -> None:
    start(harness, "abcd")
    status, written = harness.gateway("PUT", "/kv/a%2Fb", b"<v>")
    assert status == 200
    status, body = harness.gateway("GET", "/cluster/key/a%2Fb")
    assert status == 200 and body["key"] == "a/b"
    owners = harness.gateway("GET", "/cluster/owners/a%2Fb")[1]["nodes"]
    assert [row["node"] for row in body["replicas"]] == owners, "owners first, in order; empty fallbacks left out"
    for row in body["replicas"]:
        assert (row["role"], row["version"], row["deleted"], row["error"]) == ("owner", written["version"], False, None)
    assert "<v>" not in json.dumps(body), "versions only, never values"

    harness.gateway("DELETE", "/kv/a%2Fb")
    assert all(row["deleted"] for row in harness.gateway("GET", "/cluster/key/a%2Fb")[1]["replicas"])


def test_a_key_nobody_holds_and_a_fallback_holding_a_hinted_write(harness: Harness) -> None:
    start(harness, "abcd")
    body = harness.gateway("GET", "/cluster/key/never")[1]
    assert [row["version"] for row in body["replicas"]] == [None, None, None]

    owners, fallbacks = harness.cluster.placement("k")
    harness.crash_node(owners[0])
    status, written = harness.gateway("PUT", "/kv/k", b"v")
    assert status == 200
    rows = {row["node"]: row for row in harness.gateway("GET", "/cluster/key/k")[1]["replicas"]}
    assert rows[owners[0]]["version"] is None and rows[owners[0]]["error"], "the unreachable owner, with why"
    assert rows[fallbacks[0]] == {
        "node": fallbacks[0],
        "role": "fallback",
        "version": written["version"],
        "deleted": False,
        "error": None,
    }


def test_a_node_that_never_answers_does_not_stall_the_lookup(harness: Harness) -> None:
    start(harness, "ab")
    harness.network.serve("slow.test", Hang())
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in ("a", "b", "slow")})
    results: list[Any] = []
    ensureDeferred(harness._call("GET", "http://gateway.test/cluster/key/k", None)).addBoth(results.append)
    harness.settle()
    assert not results
    harness.advance(3)
    status, body = results[0]
    assert status == 200
    rows = {row["node"]: row for row in body["replicas"]}
    assert rows["slow"]["error"] and rows["a"]["error"] is None and rows["b"]["error"] is None


def test_a_lookup_checks_its_key_and_needs_nodes(harness: Harness) -> None:
    assert harness.gateway("GET", "/cluster/key/")[0] == 400
    assert harness.gateway("GET", "/cluster/key/%00")[0] == 400
    status, body = harness.gateway("GET", "/cluster/key/k")
    assert status == 503 and "no storage nodes" in body["error"]


def test_the_client_token_guards_key_lookups_but_not_the_page() -> None:
    auth = Auth(client_token=b"t")
    assert not auth.allows(b"/cluster/key/k", None)
    assert auth.allows(b"/cluster/key/k", b"Bearer t")
    assert auth.allows(b"/ui", None) and auth.allows(b"/cluster/ring", None)


# --- the page --------------------------------------------------------------------------------


def test_the_page_is_html_that_loads_nothing_from_elsewhere(harness: Harness) -> None:
    answer = raw(harness, "/ui")
    assert answer.status == 200
    request = DummyRequest([b"ui"])
    assert GatewayAPI.dashboard(GatewayAPI(harness.cluster, harness.coordinator), request) == answer.body
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    assert b"default-src 'none'" in request.responseHeaders.getRawHeaders(b"content-security-policy")[0]
    page = answer.body.decode()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "<script>" in page
    # The only URL in it is the SVG namespace, which is a name, not something fetched.
    assert set(re.findall(r"\w+://[^\s\"']*", page)) == {"http://www.w3.org/2000/svg"}
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert ".innerHTML" not in page, "server data goes in as text only"
