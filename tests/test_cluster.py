"""
The whole cluster in one process, with no sockets: a registry, nodes and a gateway talking
through the production transport and real Klein resources over an in-memory network, on a Clock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource

from kvd.gateway import Cluster
from kvd.incarnation import next_incarnation, raise_incarnation
from kvd.membership import CARRY_SECONDS, Heartbeat, NodeInfo, Union, parse_members, union
from kvd.registry import Registry
from kvd.registry_client import RegistryClient
from kvd.resources import RegistryAPI
from kvd.testing.cluster import TTL, Hang, Harness
from kvd.testing.runners import ManualRunner


def test_nodes_register_at_start_and_the_gateway_sees_them(harness: Harness) -> None:
    harness.watcher.start()
    for node_id in ("a", "b", "c"):
        harness.start_node(node_id)
    harness.advance(1)
    status, body = harness.gateway("GET", "/cluster")
    assert status == 200
    assert body == {
        "success": True,
        "nodes": [
            {
                "id": n,
                "url": f"http://{n}.test",
                "weight": 1,
                "status": "up",
                "reachable": True,
                "timeout": 2.0,
                "keys": 0,  # from its own GET /node
                "requests": 1,  # that GET /node: nothing else was sent to it yet
                "repair": None,  # no sweep has reported to it
            }
            for n in ("a", "b", "c")
        ],
        "replicas": 3,
        "vnodes": 64,
        "write_quorum": 2,
        "read_quorum": 2,
        "repair": body["repair"],
    }


def test_every_write_lands_on_all_owners_with_one_version(harness: Harness) -> None:
    harness.watcher.start()
    for node_id in ("a", "b", "c", "d"):
        harness.start_node(node_id)
    harness.advance(1)
    for i in range(30):
        key = f"key{i}"
        status, body = harness.gateway("PUT", f"/kv/{key}", b"v%d" % i)
        assert status == 200 and body == {
            "success": True,
            "key": key,
            "value": f"v{i}",
            "version": body["version"],
            "replicas": body["replicas"],
            "hinted": {},
        }
        owners = harness.gateway("GET", f"/cluster/owners/{key}")[1]["nodes"]
        assert len(owners) == 3
        assert len(body["replicas"]) >= 2 and set(body["replicas"]) <= set(owners), "the receipt names owners"
        assert all(harness.stores[o].entry(key) == (f"v{i}", body["version"]) for o in owners)
        others = set(harness.stores) - set(owners)
        assert all(harness.stores[o].entry(key) is None for o in others)
        assert harness.gateway("GET", f"/kv/{key}") == (
            200,
            {"success": True, "key": key, "value": f"v{i}", "version": body["version"]},
        )
    status, body = harness.gateway("DELETE", "/kv/key0")
    assert status == 200 and body["key"] == "key0"
    assert harness.gateway("GET", "/kv/key0")[0] == 404
    assert harness.gateway("DELETE", "/kv/key0")[0] == 404


def test_heartbeats_keep_a_live_node_registered_past_many_ttls(harness: Harness) -> None:
    harness.start_node("a")
    harness.advance(TTL * 5)
    assert harness.registry.is_member("a")


def test_a_crashed_node_is_marked_down_after_the_ttl_kept_on_the_ring_and_removed_by_delete(harness: Harness) -> None:
    harness.watcher.start()
    for node_id in ("a", "b", "c", "d"):
        harness.start_node(node_id)
    harness.advance(1)
    owners = {f"k{i}": harness.cluster.owners(f"k{i}") for i in range(50)}
    harness.crash_node("b")
    harness.advance(TTL / 2)
    assert harness.cluster.down == frozenset(), "still within the lease"
    harness.advance(TTL)
    assert set(harness.cluster.members) == {"a", "b", "c", "d"}, "down is not gone"
    assert harness.cluster.down == {"b"} and harness.cluster.members["b"].status == "down"
    assert {k: harness.cluster.owners(k) for k in owners} == owners, "no key moves when a node goes down"
    assert [n["status"] for n in harness.gateway("GET", "/cluster")[1]["nodes"]] == ["up", "down", "up", "up"]
    assert harness.call("DELETE", "http://registry.test/registry/nodes/b")[0] == 200  # an operator removes it
    harness.advance(1)
    assert set(harness.cluster.members) == {"a", "c", "d"} and harness.cluster.down == frozenset()


def test_a_down_node_is_forgotten_after_forget_after(harness: Harness) -> None:
    harness.registry.forget_after = 30.0
    harness.watcher.start()
    harness.start_node("a")
    harness.start_node("b")
    harness.advance(1)
    harness.crash_node("b")
    harness.advance(TTL + 25)
    assert harness.cluster.down == {"b"}
    harness.advance(10)
    assert set(harness.cluster.members) == {"a"}


def test_a_node_back_from_down_is_up_again_and_catches_up_through_repair(harness: Harness) -> None:
    harness.watcher.start()
    for node_id in ("a", "b", "c", "d"):
        harness.start_node(node_id)
    harness.advance(1)
    keys = [f"k{i}" for i in range(40)]
    mine = [k for k in keys if "c" in harness.cluster.owners(k)]
    harness.crash_node("c")
    harness.advance(TTL + 1)
    assert harness.cluster.down == {"c"}
    for key in keys:
        assert harness.gateway("PUT", f"/kv/{key}", b"while-c-was-down")[0] == 200
    sweep(harness)  # a sweep while c is down drops no hinted copy and pushes nothing to c...
    assert harness.repairer.progress.last_error is None, "...and is not cut short by c"
    held = sum(1 for k in mine for n in ("a", "b", "d") if harness.stores[n].entry(k) is not None)
    assert held == 3 * len(mine), "each of c's keys is on its two live owners and on one fallback"
    harness.start_node("c", incarnation=2)
    harness.advance(1)
    assert harness.cluster.down == frozenset()
    sweep(harness)
    sweep(harness)
    for key in keys:
        holders = {n for n, store in harness.stores.items() if store.entry(key) is not None}
        assert holders == set(harness.cluster.owners(key)), key
        assert harness.stores["c"].entry(key) is None or harness.stores["c"].entry(key)[0] == "while-c-was-down"  # type: ignore[index]


def sweep(harness: Harness) -> None:
    d = ensureDeferred(harness.repairer.sweep())
    harness.settle()
    assert d.called, "the sweep did not finish"


def test_a_stopped_node_leaves_at_once(harness: Harness) -> None:
    harness.watcher.start()
    harness.start_node("a")
    heartbeat = harness.start_node("b")
    harness.advance(1)
    stopped = ensureDeferred(heartbeat.stop())
    harness.settle()
    assert stopped.called
    harness.advance(1)
    assert set(harness.cluster.members) == {"a"}
    assert not harness.registry.is_member("b")


def test_a_restarted_registry_relearns_nodes_and_the_gateway_keeps_serving(harness: Harness) -> None:
    harness.watcher.start()
    harness.start_node("a")
    harness.start_node("b")
    harness.advance(1)
    assert harness.gateway("PUT", "/kv/k", b"v")[0] == 200

    harness.network.down.add("registry.test")  # the registry dies...
    harness.advance(TTL * 2)
    assert set(harness.cluster.members) == {"a", "b"}, "the gateway serves from the last membership"
    assert harness.gateway("GET", "/kv/k")[1]["value"] == "v"
    harness.crash_node("b")  # ...and a node dies while nobody is watching

    harness.registry = Registry(TTL)  # the registry comes back empty
    harness.network.serve("registry.test", RegistryAPI(harness.registry, harness.clock).resource())
    harness.network.down.discard("registry.test")
    harness.advance(TTL)
    assert {m.id for m in harness.registry.members()} == {"a"}, "live nodes registered again"
    assert set(harness.cluster.members) == {"a", "b"}, "old members are carried for a while"
    assert harness.gateway("GET", "/kv/k")[0] in (200, 503)  # b is down: a read quorum of 2 may fail
    harness.advance(CARRY_SECONDS)
    assert set(harness.cluster.members) == {"a"}, "and dropped once the carry ends, without a long poll's delay"


def test_a_registry_restart_is_seen_even_when_its_index_comes_back_the_same(harness: Harness) -> None:
    harness.watcher.start()
    harness.start_node("a")
    harness.advance(1)
    index = harness.watcher.index
    harness.registry = Registry(TTL)
    harness.network.serve("registry.test", RegistryAPI(harness.registry, harness.clock).resource())
    harness.registry.index = index  # the same index, by coincidence; a's re-registration then moves it up
    harness.advance(15)  # the long poll held by the old registry times out; the watcher asks the new one
    assert harness.watcher._carry, "the new epoch told the gateway the registry restarted"


def test_a_replica_that_does_not_answer_does_not_hold_up_a_quorum(harness: Harness) -> None:
    for node_id in ("a", "b"):
        harness.start_node(node_id)
    harness.network.serve("slow.test", Hang())
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in ("a", "b", "slow")})
    assert harness.gateway("PUT", "/kv/k", b"v")[0] == 200, "answered after a and b, without waiting for slow"
    assert harness.gateway("GET", "/kv/k")[1]["value"] == "v"


def test_too_few_replicas_is_a_503_saying_how_many_answered_never_a_hang(harness: Harness) -> None:
    harness.start_node("a")
    harness.network.serve("slow.test", Hang())
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in ("a", "slow", "gone")})
    results: list[Any] = []
    ensureDeferred(harness._call("PUT", "http://gateway.test/kv/k", b"v")).addBoth(results.append)
    harness.settle()
    assert not results, "waiting for a second replica"
    harness.advance(3)
    assert len(results) == 1
    status, body = results[0]
    assert status == 503 and body["success"] is False and body["key"] == "k"
    assert (body["answered"], body["needed"]) == (1, 2) and "slow" in body["error"] and "gone" in body["error"]


def test_no_nodes_is_503(harness: Harness) -> None:
    status, body = harness.gateway("GET", "/kv/k")
    assert status == 503 and body["success"] is False and "no storage nodes" in body["error"]


def test_the_gateway_checks_keys_and_values_itself(harness: Harness) -> None:
    harness.cluster.update({"gone": NodeInfo("gone", "http://gone.test")})
    assert harness.gateway("PUT", "/kv/%FF", b"v")[0] == 400
    assert harness.gateway("GET", "/kv/")[0] == 400
    assert harness.gateway("GET", "/cluster/owners/")[0] == 400


def test_owners_list_replicas_distinct_nodes_first_owner_first(harness: Harness) -> None:
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abcd"})
    status, body = harness.gateway("GET", "/cluster/owners/a%2Fb")
    assert status == 200 and body["key"] == "a/b"
    assert len(body["nodes"]) == 3 and len(set(body["nodes"])) == 3
    assert body["nodes"][0] == harness.cluster.ring.owner("a/b")


def test_a_node_restored_from_an_older_data_dir_moves_past_the_incarnation_the_registry_saw(harness: Harness) -> None:
    harness.watcher.start()
    harness.start_node("a")
    first = harness.start_node("b", incarnation=3)
    harness.settle()
    stopped = ensureDeferred(first.stop())
    harness.settle()
    assert stopped.called and not harness.registry.is_member("b")
    persisted: list[int] = []
    with capturedLogs() as events:
        restored = harness.start_node("b", incarnation=2, on_incarnation=persisted.append)  # an older copy
        harness.advance(1)
    assert persisted == [4], "the new incarnation is handed over to be kept in the data dir"
    assert restored.incarnation == 4
    member = harness.registry.member("b")
    assert member is not None and member.up and member.incarnation == 4
    assert set(harness.cluster.members) == {"a", "b"} and harness.cluster.down == frozenset()
    lines = [formatEvent(e) for e in events if e.get("log_namespace") == "kvd.membership"]
    moved = [line for line in lines if "incarnation 3" in line and "incarnation 4" in line]
    assert len(moved) == 1, lines
    harness.advance(TTL * 3)
    assert persisted == [4] and harness.registry.is_up("b"), "it stays registered, without moving again"


def test_a_409_that_names_no_incarnation_is_retried_with_backoff_as_before(harness: Harness) -> None:
    harness.network.serve("old-registry.test", Refuses())
    persisted: list[int] = []
    heartbeat = Heartbeat(
        RegistryClient(harness.peers, "http://old-registry.test"),
        "b",
        "http://b.test",
        2,
        harness.clock,
        on_incarnation=persisted.append,
    )
    heartbeat.start()
    harness.advance(5)
    heartbeat._stopped = True
    assert persisted == [] and heartbeat.incarnation == 2 and heartbeat._outage is not None


class Refuses(Resource):
    """A registry of before restores could rejoin: its 409 does not say which incarnation it saw."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setResponseCode(409)
        request.setHeader(b"content-type", b"application/json")
        return b'{"success": false, "error": "Node b incarnation 2 is older than incarnation 3"}'


def two_registries(harness: Harness) -> tuple[Registry, Union]:
    second = harness.add_registry("registry2.test")
    merged = Union(harness.cluster.update)
    merged.follow(harness.registry_client("registry.test"), harness.clock, wait=5.0)
    merged.follow(harness.registry_client("registry2.test"), harness.clock, wait=5.0)
    merged.start()
    return second, merged


BOTH = ("registry.test", "registry2.test")


def test_with_two_registries_losing_either_changes_nothing_and_nodes_still_join(harness: Harness) -> None:
    second, merged = two_registries(harness)
    try:
        for node_id in ("a", "b"):
            harness.start_node(node_id, registries=BOTH)
        harness.advance(1)
        assert {m.id for m in second.members()} == {m.id for m in harness.registry.members()} == {"a", "b"}
        assert set(harness.cluster.members) == {"a", "b"}
        assert harness.gateway("PUT", "/kv/k", b"v")[0] == 200

        harness.network.down.add("registry.test")  # the first registry dies and stays down
        harness.advance(TTL * 2)
        assert set(harness.cluster.members) == {"a", "b"} and harness.cluster.down == frozenset()
        harness.start_node("c", registries=BOTH)  # a node started afterwards still joins, through the other
        harness.advance(1)
        assert set(harness.cluster.members) == {"a", "b", "c"} and harness.cluster.down == frozenset()
        assert harness.gateway("PUT", "/kv/k2", b"v2")[0] == 200
        assert harness.gateway("GET", "/kv/k")[1]["value"] == "v"

        harness.crash_node("b")  # the live registry still tells the gateway about an outage
        harness.advance(TTL + 1)
        assert harness.cluster.down == {"b"}
    finally:
        merged.stop()


def test_with_two_registries_a_member_is_up_if_either_says_so_and_the_union_is_taken(harness: Harness) -> None:
    second, merged = two_registries(harness)
    try:
        harness.start_node("a", registries=BOTH)
        harness.start_node("only1", registries=("registry.test",))
        harness.start_node("only2", registries=("registry2.test",))
        harness.advance(1)
        assert set(harness.cluster.members) == {"a", "only1", "only2"}
        # a's lease runs out in the first registry only (say, a network path to it is cut)
        for heartbeat in harness.beats["a"][:1]:
            heartbeat._stopped = True
            if heartbeat._pending is not None and heartbeat._pending.active():
                heartbeat._pending.cancel()
        harness.advance(TTL + 1)
        assert not harness.registry.is_up("a") and second.is_up("a")
        assert harness.cluster.down == frozenset(), "up in one registry is up"
    finally:
        merged.stop()


def test_with_every_registry_gone_the_gateway_serves_from_the_last_union(harness: Harness) -> None:
    second, merged = two_registries(harness)
    try:
        harness.start_node("a", registries=BOTH)
        harness.start_node("b", registries=BOTH)
        harness.advance(1)
        harness.network.down.update(BOTH)
        harness.advance(TTL * 2)
        assert set(harness.cluster.members) == {"a", "b"} and harness.cluster.down == frozenset()
        assert harness.gateway("PUT", "/kv/k", b"v")[0] == 200
    finally:
        merged.stop()


def test_a_listing_without_statuses_lists_members_up_and_unknown_statuses_read_as_up() -> None:
    listing = [
        {"id": "a", "url": "http://a/"},
        {"id": "b", "url": "http://b", "status": "down"},
        {"id": "c", "url": "http://c", "status": "sideways"},
        {"id": "d", "url": "http://d", "weight": True},
    ]
    assert parse_members(listing) == {
        "a": NodeInfo("a", "http://a"),
        "b": NodeInfo("b", "http://b", 1, "down"),
        "c": NodeInfo("c", "http://c"),
    }


def test_the_union_has_every_member_up_if_any_listing_has_it_up() -> None:
    first = {"a": NodeInfo("a", "http://a1", 1, "down"), "b": NodeInfo("b", "http://b1", 1, "down")}
    second = {"a": NodeInfo("a", "http://a2"), "c": NodeInfo("c", "http://c2", 1, "down")}
    assert union([first, second]) == {
        "a": NodeInfo("a", "http://a2"),
        "b": NodeInfo("b", "http://b1", 1, "down"),
        "c": NodeInfo("c", "http://c2", 1, "down"),
    }
    assert union([]) == {}


def test_a_raised_incarnation_is_kept_in_the_data_dir_and_never_lowered(tmp_path: Path) -> None:
    assert next_incarnation(str(tmp_path)) == 1
    assert raise_incarnation(str(tmp_path), 4) == 4
    assert raise_incarnation(str(tmp_path), 2) == 4
    assert next_incarnation(str(tmp_path)) == 5, "the next start counts on from the raised one"


# --- rings built off the reactor ---------------------------------------------------------------


def members(*ids: str, down: tuple[str, ...] = ()) -> dict[str, NodeInfo]:
    return {i: NodeInfo(i, f"http://{i}.test", status="down" if i in down else "up") for i in ids}


def test_while_a_ring_is_built_the_gateway_routes_with_the_last_complete_view() -> None:
    builds = ManualRunner()
    cluster = Cluster(vnodes=16, replicas=3, run=builds)
    ready = cluster.ready()
    cluster.update(members("a", "b", "c"))
    assert cluster.view().members == {} and len(builds.jobs) == 1  # nothing routed half-built
    assert not ready.called  # a --workers worker takes no connection yet
    builds.run_one()
    assert ready.called and cluster.ready().called
    before = cluster.view()
    assert set(before.members) == {"a", "b", "c"} and set(before.ring.nodes) == {"a", "b", "c"}
    cluster.update(members("b", "c", "d"))  # a removed, d joined
    # Until the new ring is ready, members and ring are the old ones together: every id the
    # ring places is a member the gateway can reach.
    assert cluster.view() is before and set(before.owners("k")) <= set(before.members)
    builds.run_one()
    after = cluster.view()
    assert set(after.members) == {"b", "c", "d"} and set(after.ring.nodes) == {"b", "c", "d"}


def test_changes_arriving_during_a_build_cost_one_more_build_with_the_newest() -> None:
    builds = ManualRunner()
    cluster = Cluster(vnodes=16, replicas=3, run=builds)
    cluster.update(members("a", "b"))
    for joined in ("c", "d", "e"):
        cluster.update(members("a", "b", joined))
    cluster.update(members("a", "b", "e", down=("a",)))
    assert len(builds.jobs) == 1
    builds.run_one()
    assert set(cluster.view().members) == {"a", "b"} and len(builds.jobs) == 1
    builds.run_one()
    assert not builds.jobs
    view = cluster.view()
    assert set(view.ring.nodes) == {"a", "b", "e"} and view.down == {"a"}


def test_a_change_of_status_alone_builds_no_ring_and_applies_at_once() -> None:
    builds = ManualRunner()
    cluster = Cluster(vnodes=16, replicas=3, run=builds)
    cluster.update(members("a", "b", "c"))
    builds.run_one()
    ring = cluster.ring
    cluster.update(members("a", "b", "c", down=("b",)))
    assert not builds.jobs and cluster.ring is ring and cluster.view().down == {"b"}


def test_a_failed_build_is_done_on_the_spot_so_membership_is_never_lost() -> None:
    def failing(f: Callable[[], Any]) -> Deferred[Any]:
        return fail(RuntimeError("no threads left"))

    cluster = Cluster(vnodes=16, replicas=3, run=failing)
    with capturedLogs() as events:
        cluster.update(members("a", "b", "c"))
    assert set(cluster.view().ring.nodes) == {"a", "b", "c"}
    assert any("building the ring failed" in formatEvent(e) for e in events)


def test_what_follows_the_members_hears_of_a_membership_only_once_it_is_in_use() -> None:
    """The failure detector must not forget a member the gateway still routes to mid-build."""
    builds = ManualRunner()
    told: list[set[str]] = []
    cluster = Cluster(vnodes=16, replicas=3, run=builds, adopted=lambda m: told.append(set(m)))
    cluster.update(members("a", "b", "c"))
    builds.run_one()
    cluster.update(members("a", "b"))  # c removed: routed to until the new ring is in use
    assert told == [{"a", "b", "c"}]
    builds.run_one()
    assert told == [{"a", "b", "c"}, {"a", "b"}]
