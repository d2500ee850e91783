"""
The whole cluster in one process, with no sockets: a registry, nodes and a gateway talking
through the production transport and real Klein resources over an in-memory network, on a Clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvd.gateway import Cluster
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.nodes import NodeClients
from kvd.gateway.repair import Repairer
from kvd.membership import CARRY_SECONDS, Heartbeat, NodeInfo, Watcher
from kvd.registry import Registry
from kvd.registry_client import RegistryClient
from kvd.resources import GatewayAPI, NodeAPI, RegistryAPI
from kvd.store import Store
from kvd.testing.network import Network
from kvd.versions import HybridClock

TTL = 9.0


class Hang(Resource):
    """A node that accepts requests and never answers."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = Clock()
        self.network = Network(self.clock)
        self.peers = self.network.peers(timeout=2.0)
        self.client = self.network.peers(timeout=60.0)  # the test's own client is patient
        self.registry = Registry(TTL)
        self.network.serve("registry.test", RegistryAPI(self.registry, self.clock).resource())
        self.stores: dict[str, Store] = {}
        self.heartbeats: dict[str, Heartbeat] = {}
        self.cluster = Cluster(vnodes=64, replicas=3)
        self.watcher = Watcher(self.registry_client(), self.clock, self.cluster.update, wait=5.0)
        nodes = NodeClients(self.peers)
        self.coordinator = Coordinator(self.cluster, nodes, HybridClock(self.clock.seconds, "gw"))
        self.repairer = Repairer(self.cluster, nodes, self.clock.seconds, tombstone_grace=60)
        gateway = GatewayAPI(self.cluster, self.coordinator, repairer=self.repairer, clock=self.clock)
        self.network.serve("gateway.test", gateway.resource())

    def registry_client(self) -> RegistryClient:
        return RegistryClient(self.peers, "http://registry.test")

    def start_node(self, node_id: str, incarnation: int = 1) -> Heartbeat:
        store = (
            self.stores[node_id]
            if node_id in self.stores
            else Store.open(str(self.tmp_path / node_id), clock=HybridClock(self.clock.seconds, node_id))
        )
        self.stores[node_id] = store
        host = f"{node_id}.test"
        self.network.down.discard(host)
        self.network.serve(host, NodeAPI(node_id, store, clock=self.clock).resource())
        heartbeat = Heartbeat(self.registry_client(), node_id, f"http://{host}", incarnation, self.clock)
        self.heartbeats[node_id] = heartbeat
        heartbeat.start()
        self.settle()
        return heartbeat

    def crash_node(self, node_id: str) -> None:
        """The node's process dies: it stops answering and stops renewing."""
        self.heartbeats[node_id]._stopped = True
        pending = self.heartbeats[node_id]._pending
        if pending is not None and pending.active():
            pending.cancel()
        self.network.down.add(f"{node_id}.test")

    def settle(self) -> None:
        self.network.flush()

    def advance(self, seconds: float, step: float = 0.5) -> None:
        elapsed = 0.0
        while elapsed < seconds:
            self.clock.advance(step)
            self.settle()
            elapsed += step

    def call(self, method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
        results: list[Any] = []
        d = ensureDeferred(self._call(method, url, body))
        d.addBoth(results.append)
        self.settle()
        assert results, f"{method} {url} did not finish"
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]  # type: ignore[no-any-return]

    async def _call(self, method: str, url: str, body: bytes | None) -> tuple[int, Any]:
        answer = await self.client.call(method, url, body)
        return answer.status, json.loads(answer.body)

    def gateway(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        return self.call(method, "http://gateway.test" + path, body)

    def close(self) -> None:
        self.watcher.stop()
        for store in self.stores.values():
            store.abandon()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_nodes_register_at_start_and_the_gateway_sees_them(harness: Harness) -> None:
    harness.watcher.start()
    for node_id in ("a", "b", "c"):
        harness.start_node(node_id)
    harness.advance(1)
    status, body = harness.gateway("GET", "/cluster")
    assert status == 200
    assert body == {
        "success": True,
        "nodes": [{"id": n, "url": f"http://{n}.test", "weight": 1} for n in ("a", "b", "c")],
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


def test_a_crashed_node_is_dropped_after_the_ttl_and_the_gateway_follows(harness: Harness) -> None:
    harness.watcher.start()
    harness.start_node("a")
    harness.start_node("b")
    harness.advance(1)
    assert set(harness.cluster.members) == {"a", "b"}
    harness.crash_node("b")
    harness.advance(TTL / 2)
    assert set(harness.cluster.members) == {"a", "b"}, "still within the lease"
    harness.advance(TTL)
    assert set(harness.cluster.members) == {"a"}


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
    assert harness.gateway("PUT", "/kv/a%2F", b"\xff")[0] == 400
    assert harness.gateway("GET", "/kv/")[0] == 400
    assert harness.gateway("GET", "/cluster/owners/")[0] == 400


def test_owners_list_replicas_distinct_nodes_first_owner_first(harness: Harness) -> None:
    harness.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abcd"})
    status, body = harness.gateway("GET", "/cluster/owners/a%2Fb")
    assert status == 200 and body["key"] == "a/b"
    assert len(body["nodes"]) == 3 and len(set(body["nodes"])) == 3
    assert body["nodes"][0] == harness.cluster.ring.owner("a/b")
