"""
Real processes: a node killed (kill -9) and kept down for several leases is marked down, not
removed: no key changes owners; writes for it go to fallbacks with hints and succeed; once it
is back it gets them (its own /kv/) and no key is left on a node that does not own it.
"""

from __future__ import annotations

import time

import pytest

from kvd.testing.processes import Processes, request

from .test_cluster_processes import eventually, statuses

pytestmark = pytest.mark.timeout(180)
TTL = 2.0
DOWN = 4 * TTL


def test_a_node_down_for_several_leases_moves_no_key_and_gets_its_writes_when_it_returns(
    processes: Processes,
) -> None:
    cluster = processes.cluster(
        node_ids=("a", "b", "c", "d"),
        registry_options=("--ttl", f"{TTL:g}"),
        gateway_options=("--replicas", "3", "--write-quorum", "2", "--read-quorum", "2", "--repair-interval", "1"),
    )
    gateway, registry = cluster.gateway, cluster.registry
    nodes = {n.args[n.args.index("--node-id") + 1]: n for n in cluster.nodes}
    keys = [f"k{i}" for i in range(80)]

    def owners() -> dict[str, list[str]]:
        return {key: request(gateway.port, "GET", f"/cluster/owners/{key}")[1]["nodes"] for key in keys}

    before = owners()
    assert any("d" in o for o in before.values()) and any("d" not in o for o in before.values())
    for key in keys:
        assert request(gateway.port, "PUT", f"/kv/{key}", b"before")[0] == 200
    nodes["d"].kill()
    killed = time.monotonic()
    eventually(lambda: statuses(registry.port, "/registry/nodes")["d"] == "down", what="d marked down")
    round_ = 0
    while time.monotonic() - killed < DOWN:  # writes during the outage, the owners checked all along
        round_ += 1
        for key in keys:
            status, body = request(gateway.port, "PUT", f"/kv/{key}", f"during {round_}".encode())
            assert status == 200, body
        assert owners() == before, "a down node keeps its place in the ring"
    assert statuses(gateway.port, "/cluster")["d"] == "down"
    nodes["d"].start()
    eventually(lambda: statuses(gateway.port, "/cluster")["d"] == "up", what="d up again")
    assert owners() == before, "and its return moves nothing either"
    expected = f"during {round_}"

    def placed() -> bool:
        for key, key_owners in before.items():
            for node_id, node in nodes.items():
                status, body = request(node.port, "GET", f"/kv/{key}")
                held = status == 200 and body["value"] == expected
                if held != (node_id in key_owners):
                    return False
        return True

    eventually(placed, seconds=30, what="every sampled key on exactly its owners, d's own writes included")
    for key in keys:
        assert request(gateway.port, "GET", f"/kv/{key}")[1]["value"] == expected
