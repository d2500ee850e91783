"""Real processes: a registry, three nodes and a gateway on loopback ports; and the dev role."""

from __future__ import annotations

import http.client
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvd.testing.processes import Kvd, Processes, free_port, private_network_for, request

pytestmark = pytest.mark.timeout(180)
TTL = "1.5"


def eventually(check: Callable[[], bool], seconds: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{what} did not hold within {seconds}s")


def member_ids(port: int, path: str = "/registry/nodes") -> list[str]:
    return [n["id"] for n in request(port, "GET", path)[1]["nodes"]]


def start_cluster(processes: Processes, *gateway_options: str) -> tuple[Kvd, list[Kvd], Kvd]:
    """A registry, nodes a, b and c, and a gateway (given C{gateway_options}), each a process."""
    cluster = processes.cluster(registry_options=("--ttl", TTL), gateway_options=("--timeout", "2", *gateway_options))
    registry, nodes, gateway = cluster.registry, cluster.nodes, cluster.gateway
    eventually(lambda: len(request(gateway.port, "GET", "/cluster")[1]["nodes"]) == 3, what="gateway sees 3 nodes")
    return registry, nodes, gateway


def test_clients_reach_every_key_through_the_gateway(processes: Processes) -> None:
    registry, nodes, gateway = start_cluster(processes)
    for i in range(60):
        status, body = request(gateway.port, "PUT", f"/kv/k{i}", f"v{i}".encode())
        assert (status, body["key"], body["value"]) == (200, f"k{i}", f"v{i}")
    eventually(
        lambda: [request(n.port, "GET", "/node")[1]["keys"] for n in nodes] == [60, 60, 60],
        what="every key on all three replicas",
    )
    for i in range(60):
        assert request(gateway.port, "GET", f"/kv/k{i}")[1]["value"] == f"v{i}"


def test_head_through_the_gateway_answers_at_once(processes: Processes) -> None:
    registry, nodes, gateway = start_cluster(processes)
    request(gateway.port, "PUT", "/kv/h", b"v")
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=3)
    try:
        for path, expected in (("/kv/h", 200), ("/kv/absent", 404)):
            connection.request("HEAD", path)
            response = connection.getresponse()
            response.read()
            assert response.status == expected
    finally:
        connection.close()


def statuses(port: int, path: str) -> dict[str, str]:
    return {n["id"]: n["status"] for n in request(port, "GET", path)[1]["nodes"]}


def test_a_killed_node_is_marked_down_after_the_ttl_kept_and_removed_by_delete(processes: Processes) -> None:
    registry, nodes, gateway = start_cluster(processes)
    owners = [request(gateway.port, "GET", f"/cluster/owners/k{i}")[1]["nodes"] for i in range(20)]
    nodes[1].kill()
    down = {"a": "up", "b": "down", "c": "up"}
    eventually(lambda: statuses(registry.port, "/registry/nodes") == down, what="b is marked down in the registry")
    assert member_ids(registry.port) == ["a", "b", "c"], "down is not gone"
    assert list(statuses(registry.port, "/registry/nodes?status=up")) == ["a", "c"]
    eventually(lambda: statuses(gateway.port, "/cluster") == down, what="the gateway sees b down")
    assert [request(gateway.port, "GET", f"/cluster/owners/k{i}")[1]["nodes"] for i in range(20)] == owners
    assert request(gateway.port, "PUT", "/kv/after", b"x")[0] == 200
    assert request(registry.port, "DELETE", "/registry/nodes/b")[0] == 200  # an operator removes it
    eventually(lambda: member_ids(gateway.port, "/cluster") == ["a", "c"], what="the gateway drops b once removed")


def test_two_of_three_replicas_down_is_a_503_never_a_silent_partial_success(processes: Processes) -> None:
    nodes = [processes.node(n).start() for n in ("a", "b", "c")]
    port = free_port()
    gateway = processes.kvd(
        "static-gateway",
        "--role",
        "gateway",
        *[f"--node={n}=http://127.0.0.1:{node.port}" for n, node in zip("abc", nodes, strict=True)],
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        port=port,
    ).start()
    assert request(gateway.port, "PUT", "/kv/k", b"before")[0] == 200
    nodes[0].kill()
    assert request(gateway.port, "PUT", "/kv/k", b"one down")[0] == 200
    assert request(gateway.port, "GET", "/kv/k")[1]["value"] == "one down"
    nodes[1].kill()
    for method, body in (("PUT", b"two down"), ("GET", None), ("DELETE", None)):
        status, answer = request(gateway.port, method, "/kv/k", body, timeout=15)
        assert status == 503 and answer["success"] is False, answer
        assert answer["needed"] == 2 and answer["answered"] < 2, answer


def test_nodes_come_back_after_a_registry_restart_and_the_gateway_serves_meanwhile(processes: Processes) -> None:
    registry, nodes, gateway = start_cluster(processes)
    assert request(gateway.port, "PUT", "/kv/k", b"v")[0] == 200
    registry.kill()
    time.sleep(3)  # several TTLs with the registry gone
    assert request(gateway.port, "GET", "/kv/k")[1]["value"] == "v"
    assert len(request(gateway.port, "GET", "/cluster")[1]["nodes"]) == 3
    registry.start()
    eventually(lambda: member_ids(registry.port) == ["a", "b", "c"], what="nodes re-register")
    assert request(gateway.port, "GET", "/kv/k")[0] == 200


def test_a_stopped_node_leaves_the_registry_at_once(processes: Processes) -> None:
    registry, nodes, gateway = start_cluster(processes)
    assert nodes[2].terminate() == 0
    assert member_ids(registry.port) == ["a", "b"]


def test_a_gateway_with_a_static_node_list(processes: Processes) -> None:
    node = processes.node("solo").start()
    port = free_port()
    gateway = processes.kvd(
        "static-gateway",
        "--role",
        "gateway",
        "--node",
        f"solo=http://127.0.0.1:{node.port}",
        "--replicas=1",
        "--write-quorum=1",
        "--read-quorum=1",
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        port=port,
    ).start()
    assert request(gateway.port, "PUT", "/kv/x", b"y")[0] == 200
    assert request(node.port, "GET", "/kv/x")[1]["value"] == "y"


def test_the_dev_role_runs_the_whole_cluster_in_one_process(processes: Processes, tmp_path: Path) -> None:
    """In a private network namespace when there is one: the dev role's fixed ports may be taken here."""
    private = private_network_for(8000, 8500, 8001, 8002, 8003)
    dev = processes.kvd("dev", "--role", "dev", port=8000, private_network=private).start()
    with dev.network():
        eventually(lambda: len(request(8000, "GET", "/cluster")[1]["nodes"]) == 3, what="dev cluster has 3 nodes")
        status, body = request(8000, "PUT", "/kv/greeting", b"hello")
        assert (status, body["key"], body["value"]) == (200, "greeting", "hello")
        assert request(8000, "GET", "/kv/greeting")[1]["value"] == "hello"
        owners = request(8000, "GET", "/cluster/owners/greeting")[1]["nodes"]
        assert sorted(owners) == ["node1", "node2", "node3"]
        assert member_ids(8500) == ["node1", "node2", "node3"]
    assert sorted(p.name for p in (tmp_path / "kvd-data").iterdir()) == ["node1", "node2", "node3"]
    assert dev.terminate() == 0
