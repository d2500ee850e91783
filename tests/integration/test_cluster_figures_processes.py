"""
GET /cluster's per-node figures with real processes: each node's key count as its own GET
/node says, and a hung node (SIGSTOP: its socket accepts, nothing answers) delaying /cluster
by no more than the figures' deadline, shown with no key count.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvd.gateway.figures import MAX_AGE, TIMEOUT
from kvd.testing.processes import Processes, request

from .test_cluster_processes import eventually

pytestmark = pytest.mark.timeout(120)
#: What a busy shared machine (CI runs suites side by side on two cores) may add to a request
#: on loopback: generous, as this bounds a hang, not a speed; without the figures' own
#: deadline, /cluster would wait for the gateway's --timeout (5 s) on the hung node.
SLACK = 2.0


def test_cluster_shows_each_nodes_keys_and_a_hung_node_delays_it_at_most_the_deadline(processes: Processes) -> None:
    cluster = processes.cluster(registry_options=("--ttl", "30"))
    gateway = cluster.gateway
    assert gateway.port is not None
    for i in range(20):
        assert request(gateway.port, "PUT", f"/kv/k{i}", b"v")[0] == 200

    def matching() -> bool:
        shown = {n["id"]: n["keys"] for n in request(gateway.port, "GET", "/cluster")[1]["nodes"]}
        own = [request(node.port, "GET", "/node")[1] for node in cluster.nodes if node.port is not None]
        return shown == {body["id"]: body["keys"] for body in own} and all(n == 20 for n in shown.values())

    eventually(matching, what="/cluster showing each node's own key count")

    hung = cluster.nodes[1]
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        took, shown = [], []
        deadline = time.monotonic() + 2 * MAX_AGE + 2 * TIMEOUT
        while time.monotonic() < deadline:
            started = time.monotonic()
            status, body = request(gateway.port, "GET", "/cluster", timeout=10)
            took.append(time.monotonic() - started)
            assert status == 200, body
            shown.append({n["id"]: n["keys"] for n in body["nodes"]})
            time.sleep(0.2)
        assert max(took) <= TIMEOUT + SLACK, f"/cluster took up to {max(took):.2f}s with a hung node"
        assert shown[-1]["b"] is None, "the hung node has no key count"
        assert shown[-1]["a"] == shown[-1]["c"] == 20
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    eventually(lambda: request(gateway.port, "GET", "/cluster")[1]["nodes"][1]["keys"] == 20, what="b's count back")
