"""The coordinator's quorum writes leave nothing for the cyclic garbage collector."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from kvd.gateway import Cluster
from kvd.gateway.coordinator import Coordinator, WriteOutcome
from kvd.gateway.nodes import Written
from kvd.membership import NodeInfo
from kvd.versions import HybridClock


class _Node:
    def __init__(self, newer: list[str]) -> None:
        self.newer = newer

    def apply_key(self, key: str, value: str | None, version: str) -> Deferred[Written]:
        # Holds a newer version once (from a coordinator whose clock runs ahead), then takes the write.
        return succeed(Written(True, self.newer.pop() if self.newer else version))

    def apply_key_to(self, reply: Any, key: str, value: str | None, version: str) -> None:
        # As a node client does for a quorum's gathering: the outcome straight to the reply.
        self.apply_key(key, value, version).addCallback(reply.callback)


class _Health:
    clock = Clock()
    judged_unreachable: frozenset[str] = frozenset()

    def reachable(self, node_id: str) -> bool:
        return True


class _Nodes:
    health = _Health()

    def __init__(self, newer: list[str]) -> None:
        self.node = _Node(newer)

    def __call__(self, info: NodeInfo) -> _Node:
        return self.node


def _coordinator(newer: list[str]) -> Coordinator:
    cluster = Cluster(vnodes=8, replicas=3)
    cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abc"})
    nodes: Any = _Nodes(newer)
    return Coordinator(cluster, nodes, HybridClock(Clock().seconds, "gw"))


def test_a_quorum_write_and_its_later_rounds_leave_no_reference_cycles() -> None:
    outcomes: list[Any] = []
    far_ahead = "ffffffffffff000000.x"
    coordinator = _coordinator([far_ahead])
    gc.collect()
    gc.disable()
    try:
        for i in range(50):
            coordinator.write(f"k{i}", "v").addBoth(outcomes.append)
        coordinator.write("ttl", "v", ttl=5.0).addBoth(outcomes.append)
        found = gc.collect()
    finally:
        gc.enable()
    assert all(isinstance(outcome, WriteOutcome) for outcome in outcomes), outcomes[:1]
    assert outcomes[0].version > far_ahead, "the first write went round again, past the newer version"
    assert found == 0, f"{found} objects were left in reference cycles by 51 writes"
