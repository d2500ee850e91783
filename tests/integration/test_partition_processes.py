"""
Real processes: one node cut off from the gateway by iptables (every TCP packet to its port
dropped) while it still renews its lease with the registry. Under load no request fails, and
once the cut heals the writes made during it reach the node within 30 s.

Needs root and iptables (CI installs it in .ci/run); skipped with the reason elsewhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from kvd.testing.firewall import Firewall, iptables_unavailable
from kvd.testing.processes import Processes, request

from .test_cluster_processes import eventually, statuses

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def firewall() -> Iterator[Firewall]:
    why = iptables_unavailable()
    if why is not None:
        pytest.skip(f"iptables cannot run here: {why}")
    with Firewall() as wall:  # removes its chain and the jump to it, whatever the test did
        yield wall


def reachable(gateway_port: int) -> dict[str, bool]:
    return {n["id"]: n["reachable"] for n in request(gateway_port, "GET", "/cluster")[1]["nodes"]}


def test_a_node_cut_off_from_the_gateway_fails_no_request_and_gets_the_writes_after_healing(
    processes: Processes, firewall: Firewall
) -> None:
    cluster = processes.cluster(
        registry_options=("--ttl", "2"),
        gateway_options=("--replicas", "3", "--write-quorum", "2", "--read-quorum", "2", "--repair-interval", "1"),
    )
    gateway, cut = cluster.gateway, cluster.nodes[1]  # node b
    assert cut.port is not None
    for i in range(50):
        assert request(gateway.port, "PUT", f"/kv/seed{i}", b"s")[0] == 200
    failures: list[str] = []
    during: dict[str, str] = {}  # keys acknowledged while b was cut off, and their values
    counts = {"reads": 0, "writes": 0}
    lock = threading.Lock()
    stop = threading.Event()
    cutting = threading.Event()

    def client(number: int) -> None:
        i = 0
        while not stop.is_set():
            write = i % 2 == 0
            key, value = f"c{number}-{i}", f"v{number}-{i}"
            was_cut = cutting.is_set()
            try:
                if write:
                    status, body = request(gateway.port, "PUT", f"/kv/{key}", value.encode(), timeout=15)
                else:
                    status, body = request(gateway.port, "GET", f"/kv/seed{i % 50}", timeout=15)
            except OSError as e:
                failures.append(f"{'PUT' if write else 'GET'}: {e}")
                return
            with lock:
                if status != 200:
                    failures.append(f"{status} {body}")
                elif write and was_cut and cutting.is_set():
                    during[key] = value
                counts["writes" if write else "reads"] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: counts["reads"] > 100, what="requests flowing")
        cutting.set()
        firewall.cut(cut.port)
        eventually(lambda: not reachable(gateway.port)["b"], what="the cut-off node judged unreachable")
        before = dict(counts)
        time.sleep(4)  # two leases: the registry still has b up, it renews on another port
        assert counts["reads"] > before["reads"] + 50, "reads go on while the node is cut off"
        assert counts["writes"] > before["writes"] + 50, "writes go on while the node is cut off"
        assert statuses(cluster.registry.port, "/registry/nodes")["b"] == "up", "b still renews its lease"
        cutting.clear()
        firewall.heal()
        healed = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    assert len(during) > 50, len(during)

    def missing() -> list[str]:
        absent = []
        for key, value in during.items():
            status, body = request(cut.port, "GET", f"/kv/{key}")
            if status != 200 or body["value"] != value:
                absent.append(key)
        return absent

    eventually(lambda: not missing(), seconds=30, what="every write made during the cut on b (its own /kv/)")
    print(f"{len(during)} cut-time writes on b {time.monotonic() - healed:.1f} s after healing")
    eventually(lambda: all(reachable(gateway.port).values()), what="b reachable again")
