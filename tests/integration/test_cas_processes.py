"""Conditional writes with real processes: a counter that read-then-If-Match loops never miscount."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kvd.testing.processes import Processes, request

from .test_cluster_processes import eventually, start_cluster

pytestmark = pytest.mark.timeout(240)

CLIENTS, ADDS = 20, 10


def test_twenty_clients_adding_through_two_gateways_while_a_node_is_killed_count_exactly(
    processes: Processes,
) -> None:
    """
    Each client adds 1 ten times by reading the counter and writing it back with If-Match.
    The value keeps the ids of its last writes, so a client whose write had an unclear answer
    (a 503, a timeout) can tell whether it took before trying again.
    """
    registry, nodes, gateway = start_cluster(processes, "--replicas", "3", "--write-quorum", "2")
    second = processes.gateway("--registry", registry.url, "--timeout", "2", name="gateway2").start()
    eventually(lambda: len(request(second.port, "GET", "/cluster")[1]["nodes"]) == 3, what="gateway2 sees 3 nodes")
    ports = [gateway.port, second.port]
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()

    def client(number: int) -> None:
        port = ports[number % 2]
        for i in range(ADDS):
            op = f"{number}-{i}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    status, body = request(port, "GET", "/kv/counter", timeout=5)
                    if status == 200:
                        current = json.loads(body["value"])
                        if op in current["ops"]:
                            break  # an earlier try took
                        headers = {"If-Match": f'"{body["version"]}"'}
                    elif status == 404:
                        current, headers = {"n": 0, "ops": []}, {"If-None-Match": "*"}
                    else:
                        time.sleep(0.05)
                        continue
                    new = {"n": current["n"] + 1, "ops": ([*current["ops"], op])[-3 * CLIENTS :]}
                    status, _ = request(
                        port, "PUT", "/kv/counter", json.dumps(new).encode(), timeout=10, headers=headers
                    )
                    if status == 200:
                        break
                except OSError:
                    pass
            else:
                with lock:
                    errors.append(f"client {number} could not add {op}")
                return
            with lock:
                done[0] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: done[0] >= 40, seconds=60, what="adds going through")
        nodes[1].kill()
        before = done[0]
        eventually(lambda: done[0] >= before + 40 or done[0] == CLIENTS * ADDS, seconds=60, what="adds with b dead")
        nodes[1].start()
    finally:
        for t in threads:
            t.join(timeout=150)
    assert not errors, errors
    assert done[0] == CLIENTS * ADDS
    for port in ports:
        status, body = request(port, "GET", "/kv/counter")
        assert status == 200 and json.loads(body["value"])["n"] == CLIENTS * ADDS


def test_a_conditional_write_with_a_two_second_ttl_expires_on_every_replica(processes: Processes) -> None:
    """If-None-Match: * with ?ttl=2 takes a lease: held until it expires everywhere, then free to take again."""
    registry, nodes, gateway = start_cluster(processes, "--replicas", "3", "--write-quorum", "2")
    status, body = request(gateway.port, "PUT", "/kv/lease?ttl=2", b"holder-1", headers={"If-None-Match": "*"})
    assert status == 200 and body["expires"] > time.time(), body
    taken = request(gateway.port, "PUT", "/kv/lease?ttl=2", b"holder-2", headers={"If-None-Match": "*"})
    assert taken[0] == 412 and taken[1]["version"] == body["version"]
    eventually(
        lambda: all(request(n.port, "GET", "/kv/lease")[1].get("version") == body["version"] for n in nodes),
        what="every replica holds the lease with its expiry",
    )
    time.sleep(max(0.0, body["expires"] - time.time()) + 0.3)
    assert request(gateway.port, "GET", "/kv/lease")[0] == 404
    assert [request(n.port, "GET", "/kv/lease")[0] for n in nodes] == [404, 404, 404]
    status, again = request(gateway.port, "PUT", "/kv/lease", b"holder-2", headers={"If-None-Match": "*"})
    assert status == 200 and "expires" not in again, "an expired lease counts as absent"
