"""
The whole cluster in one process, for tests and simulations: a registry, nodes and a gateway
talking kvd's production transport over the in-memory network (L{kvd.testing.network}), on
one C{Clock}. Tests drive it with L{Harness.advance} and L{Harness.settle}, and crash, pause
or cut off its hosts through L{Harness.network}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvd.gateway import Cluster
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.nodes import NodeClients
from kvd.gateway.repair import Repairer
from kvd.membership import Heartbeat, Watcher
from kvd.registry import Registry
from kvd.registry_client import RegistryClient
from kvd.resources import GatewayAPI, NodeAPI, RegistryAPI
from kvd.store import Store
from kvd.testing.network import Network
from kvd.versions import HybridClock

__all__ = ["TTL", "Hang", "Harness"]

#: The registry's lease in the simulation, in seconds.
TTL = 9.0


class Hang(Resource):
    """A node that accepts requests and never answers."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


class Harness:
    """A registry, a gateway and the nodes a test starts, on one clock and one in-memory network."""

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
        self.beats: dict[str, list[Heartbeat]] = {}
        self.cluster = Cluster(vnodes=64, replicas=3)
        self.watcher = Watcher(self.registry_client(), self.clock, self.cluster.update, wait=5.0)
        nodes = NodeClients(self.peers)
        self.coordinator = Coordinator(self.cluster, nodes, HybridClock(self.clock.seconds, "gw"))
        self.repairer = Repairer(self.cluster, nodes, self.clock.seconds, tombstone_grace=60)
        gateway = GatewayAPI(self.cluster, self.coordinator, repairer=self.repairer, clock=self.clock)
        self.network.serve("gateway.test", gateway.resource())

    def registry_client(self, host: str = "registry.test") -> RegistryClient:
        return RegistryClient(self.peers, f"http://{host}")

    def add_registry(self, host: str) -> Registry:
        registry = Registry(TTL)
        self.network.serve(host, RegistryAPI(registry, self.clock).resource())
        return registry

    def start_node(
        self,
        node_id: str,
        incarnation: int = 1,
        registries: tuple[str, ...] = ("registry.test",),
        on_incarnation: Any = None,
    ) -> Heartbeat:
        store = (
            self.stores[node_id]
            if node_id in self.stores
            else Store.open(str(self.tmp_path / node_id), clock=HybridClock(self.clock.seconds, node_id))
        )
        self.stores[node_id] = store
        host = f"{node_id}.test"
        self.network.down.discard(host)
        self.network.serve(host, NodeAPI(node_id, store, clock=self.clock).resource())
        beats = [
            Heartbeat(
                self.registry_client(registry),
                node_id,
                f"http://{host}",
                incarnation,
                self.clock,
                on_incarnation=on_incarnation,
            )
            for registry in registries
        ]
        self.heartbeats[node_id], self.beats[node_id] = beats[0], beats
        for heartbeat in beats:
            heartbeat.start()
        self.settle()
        return beats[0]

    def crash_node(self, node_id: str) -> None:
        """The node's process dies: it stops answering and stops renewing."""
        for heartbeat in self.beats[node_id]:
            heartbeat._stopped = True
            pending = heartbeat._pending
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
