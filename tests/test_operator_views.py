"""
The gateway's operator views: /cluster/plan (a dry run of a join or a removal, from the ring
alone) and /cluster/hot (the most requested keys of the last minute, in bounded memory), and
each node's ring share in /cluster.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from kvd.gateway import Cluster
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.hot import HotKeys
from kvd.gateway.nodes import NodeClients
from kvd.gateway.plan import Change, parse_change, plan, shares
from kvd.membership import NodeInfo
from kvd.resources import GatewayAPI, NodeAPI
from kvd.ring import Ring
from kvd.store import Store
from kvd.testing.network import Network
from kvd.testing.runners import ManualRunner
from kvd.validate import Invalid
from kvd.versions import HybridClock

# --- the plan, as pure code ------------------------------------------------------------------


def sampled_moves(before: Ring, after: Ring, replicas: int, keys: int = 20000) -> float:
    """The fraction of C{keys} random keys that gain an owner on the new ring."""
    rng = random.Random(7)
    moved = 0
    for _ in range(keys):
        key = f"k{rng.getrandbits(64)}"
        moved += not set(after.preference_list(key, replicas)) <= set(before.preference_list(key, replicas))
    return moved / keys


def test_a_join_moves_only_onto_the_joiner_about_replicas_over_members_of_the_keys() -> None:
    ring = Ring({"a": 1, "b": 1, "c": 1}, vnodes=200)
    result = plan(ring, Change("d", 1), replicas=2)
    assert {m.target for m in result.moves} == {"d"}
    assert {m.source for m in result.moves} == {"a", "b", "c"}
    assert sum(m.share for m in result.moves) == pytest.approx(result.moved_share)  # one copy per moved key
    assert result.moved_share == pytest.approx(2 / 4, abs=0.05)


def test_the_plan_matches_what_sampled_keys_do_on_the_changed_ring() -> None:
    ring = Ring({"a": 1, "b": 2, "c": 1, "d": 1}, vnodes=100)
    for change in (Change("e", 3), Change("b", None), Change("a", 2)):
        members = dict(ring.nodes)
        if change.weight is None:
            del members[change.node_id]
        else:
            members[change.node_id] = change.weight
        after = Ring(members, vnodes=100)
        assert plan(ring, change, 3).moved_share == pytest.approx(sampled_moves(ring, after, 3), abs=0.015), change


def test_removing_a_node_moves_its_share_from_it_to_the_others() -> None:
    ring = Ring({"a": 1, "b": 1, "c": 1, "d": 1}, vnodes=200)
    result = plan(ring, Change("c", None), replicas=3)
    assert {m.source for m in result.moves} == {"c"}
    assert {m.target for m in result.moves} == {"a", "b", "d"}
    assert result.moved_share == pytest.approx(3 / 4, abs=0.05)


def test_a_plan_changes_nothing_and_an_unchanged_weight_moves_nothing() -> None:
    ring = Ring({"a": 1, "b": 1}, vnodes=50)
    assert plan(ring, Change("a", 1), 2).moved_share == 0
    assert dict(ring.nodes) == {"a": 1, "b": 1}


def test_a_first_node_joining_an_empty_ring_moves_nothing_to_copy_from() -> None:
    assert plan(Ring({}, vnodes=10), Change("a", 1), 3).moves == ()


def test_shares_sum_to_one_and_follow_the_weights() -> None:
    found = shares(Ring({"a": 1, "b": 3}, vnodes=500))
    assert sum(found.values()) == pytest.approx(1.0)
    assert found["b"] == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(
    ("join", "remove"),
    [(None, None), ("x", "a"), ("bad id", None), ("x:0", None), ("x:abc", None), ("x:99999", None), (None, "zz")],
)
def test_bad_plan_requests_are_refused(join: str | None, remove: str | None) -> None:
    with pytest.raises(Invalid):
        parse_change(join, remove, {"a": 1})


def test_plan_requests_parse_an_id_and_an_optional_weight() -> None:
    assert parse_change("x", None, {}) == Change("x", 1)
    assert parse_change("x:3", None, {}) == Change("x", 3)
    assert parse_change(None, "a", {"a": 1}) == Change("a", None)


# --- the hot keys, as pure code --------------------------------------------------------------


def test_the_most_requested_keys_come_first_with_their_rates() -> None:
    clock = Clock()
    hot = HotKeys(clock, counters=8)
    for second in range(30):
        clock.advance(1)
        for _ in range(10):
            hot.record("hot")
        for _ in range(3):
            hot.record("warm")
        hot.record(f"cold-{second}")
    top = hot.top(2)
    assert [k.key for k in top] == ["hot", "warm"]
    assert top[0].requests <= 300 and top[0].requests >= 300 - 420 // 9  # never above, at most n/(counters+1) below
    assert top[0].rate == pytest.approx(10, rel=0.25)


def test_a_heavy_hitter_is_found_among_many_more_distinct_keys_than_counters() -> None:
    clock = Clock()
    hot = HotKeys(clock, counters=16)
    rng = random.Random(1)
    for i in range(20000):
        hot.record("hot" if i % 10 == 0 else f"k{rng.getrandbits(40)}")
    assert hot.top(1)[0].key == "hot"


def test_memory_stays_bounded_by_the_counters_of_each_slice() -> None:
    clock = Clock()
    hot = HotKeys(clock, counters=32, window=60, slices=6)
    for i in range(100000):
        if i % 1000 == 0:
            clock.advance(1)
        hot.record(f"k{i}")
    assert len(hot._counts) <= 32
    assert len(hot._past) <= 6 and all(len(counts) <= 32 for _, counts in hot._past)


def test_keys_requested_more_than_a_minute_ago_are_forgotten() -> None:
    clock = Clock()
    hot = HotKeys(clock)
    hot.record("old")
    clock.advance(30)
    hot.record("recent")
    assert {k.key for k in hot.top(5)} == {"old", "recent"}
    clock.advance(75)
    assert [k.key for k in hot.top(5)] == ["recent"] or [k.key for k in hot.top(5)] == []
    clock.advance(60)
    assert hot.top(5) == []


# --- through the gateway -----------------------------------------------------------------------


class Gateway:
    """A gateway over three in-memory nodes (static members), on a Clock."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.network = Network(self.clock)
        self.stores = []
        members = {}
        for node_id in ("a", "b", "c"):
            store = Store.open(str(tmp_path / node_id), clock=HybridClock(self.clock.seconds, node_id))
            self.stores.append(store)
            self.network.serve(f"{node_id}.test", NodeAPI(node_id, store).resource())
            members[node_id] = NodeInfo(node_id, f"http://{node_id}.test")
        self.cluster = cluster = Cluster(vnodes=64, replicas=3)
        cluster.update(members)
        nodes = NodeClients(self.network.peers(timeout=2.0))
        coordinator = Coordinator(cluster, nodes, HybridClock(self.clock.seconds, "gw"))
        self.hot = HotKeys(self.clock)
        self.network.serve("gateway.test", GatewayAPI(cluster, coordinator, hot=self.hot).resource())
        self.client = self.network.peers(timeout=60.0)

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        results = self.start(method, path, body)
        answer = results[0]
        return answer.status, json.loads(answer.body)

    def start(self, method: str, path: str, body: bytes | None = None) -> list[Any]:
        """A request under way: the list gets its answer once there is one."""
        results: list[Any] = []
        d = ensureDeferred(self.client.call(method, "http://gateway.test" + path, body))
        d.addBoth(results.append)
        self.network.flush()
        return results


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    g = Gateway(tmp_path)
    yield g
    for store in g.stores:
        store.abandon()


def test_the_plan_endpoint_answers_a_dry_run_and_changes_nothing(gateway: Gateway) -> None:
    status, body = gateway.call("GET", "/cluster/plan?join=d:2")
    assert status == 200 and body["success"] is True
    assert {m["to"] for m in body["moves"]} == {"d"} and 0 < body["moved_share"] < 1
    assert all(set(m) == {"from", "to", "share"} for m in body["moves"])
    assert [n["id"] for n in gateway.call("GET", "/cluster")[1]["nodes"]] == ["a", "b", "c"]
    # With three nodes and three replicas, the other two already hold every key of b's.
    assert gateway.call("GET", "/cluster/plan?remove=b")[1] == {"success": True, "moves": [], "moved_share": 0.0}


def test_one_plan_is_worked_out_at_a_time_and_another_meanwhile_is_a_503(gateway: Gateway) -> None:
    threads = ManualRunner()
    gateway.cluster.run = threads
    first = gateway.start("GET", "/cluster/plan?join=d")
    assert first == [] and len(threads.jobs) == 1, "the dry run waits for its thread"
    status, body = gateway.call("GET", "/cluster/plan?remove=b")
    assert status == 503 and "another plan" in body["error"]
    threads.run_one()
    gateway.network.flush()
    assert first[0].status == 200 and json.loads(first[0].body)["moved_share"] > 0
    second = gateway.start("GET", "/cluster/plan?remove=b")  # the first is done: taken
    threads.run_one()
    gateway.network.flush()
    assert second[0].status == 200


@pytest.mark.parametrize("query", ["", "?join=a&remove=b", "?remove=nobody", "?join=x:-1", "?join=%ff"])
def test_a_bad_plan_request_is_a_400_with_an_error(gateway: Gateway, query: str) -> None:
    status, body = gateway.call("GET", "/cluster/plan" + query)
    assert status == 400 and body["success"] is False and body["error"]


def test_the_hot_endpoint_counts_key_requests_through_the_gateway(gateway: Gateway) -> None:
    for _ in range(5):
        gateway.call("PUT", "/kv/busy", b"v")
    gateway.call("GET", "/kv/quiet")
    gateway.call("GET", "/kv/busy")
    status, body = gateway.call("GET", "/cluster/hot?n=1")
    assert status == 200 and body["window"] == 60
    assert [(k["key"], k["requests"]) for k in body["keys"]] == [("busy", 6)]
    assert body["keys"][0]["rate"] > 0


@pytest.mark.parametrize("query", ["?n=0", "?n=101", "?n=x"])
def test_a_bad_hot_request_is_a_400(gateway: Gateway, query: str) -> None:
    assert gateway.call("GET", "/cluster/hot" + query)[0] == 400
