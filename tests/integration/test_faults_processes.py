"""
Faults production clusters see, with real processes: a node hung (SIGSTOP: its socket still
accepts, nothing answers) under load, then resumed (SIGCONT). Latency figures are for
bench/faults.py; this checks that no request fails and that reads and writes go on.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from kvd.testing.processes import Processes, request

from .test_cluster_processes import eventually

pytestmark = pytest.mark.timeout(180)


def reachable(gateway_port: int) -> dict[str, bool]:
    return {n["id"]: n["reachable"] for n in request(gateway_port, "GET", "/cluster")[1]["nodes"]}


def test_a_hung_node_under_load_fails_no_request_and_is_used_again_once_it_resumes(processes: Processes) -> None:
    # A lease longer than the pause: the registry keeps the hung node, only this gateway routes around it.
    cluster = processes.cluster(
        registry_options=("--ttl", "30"),
        gateway_options=("--replicas", "3", "--write-quorum", "2", "--read-quorum", "2", "--timeout", "5"),
    )
    gateway, nodes = cluster.gateway, cluster.nodes
    hung = nodes[1]  # node b
    for i in range(50):
        assert request(gateway.port, "PUT", f"/kv/seed{i}", b"s")[0] == 200
    failures: list[str] = []
    counts = {"reads": 0, "writes": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client(number: int) -> None:
        i = 0
        while not stop.is_set():
            write = i % 2 == 0
            try:
                if write:
                    status, body = request(gateway.port, "PUT", f"/kv/c{number}-{i}", b"v", timeout=15)
                else:
                    status, body = request(gateway.port, "GET", f"/kv/seed{i % 50}", timeout=15)
            except OSError as e:
                failures.append(f"{'PUT' if write else 'GET'}: {e}")
                return
            if status != 200:
                failures.append(f"{status} {body}")
            with lock:
                counts["writes" if write else "reads"] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    stopped = False
    try:
        eventually(lambda: counts["reads"] > 200, what="requests flowing")
        os.kill(hung.pid, signal.SIGSTOP)
        stopped = True
        eventually(lambda: not reachable(gateway.port)["b"], what="the hung node judged unreachable")
        before = dict(counts)
        time.sleep(3)
        assert counts["reads"] > before["reads"] + 100, "reads go on while the node is hung"
        assert counts["writes"] > before["writes"] + 100, "writes go on while the node is hung"
        status, body = request(gateway.port, "GET", "/readyz")
        assert status == 200 and len(body["down"]) == 1, "two of three reachable: still ready"
        os.kill(hung.pid, signal.SIGCONT)
        stopped = False
        eventually(lambda: all(reachable(gateway.port).values()), what="the resumed node reachable again")
        before = dict(counts)
        time.sleep(1)
        assert counts["reads"] > before["reads"], "and requests still flow"
    finally:
        if stopped:
            os.kill(hung.pid, signal.SIGCONT)
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
