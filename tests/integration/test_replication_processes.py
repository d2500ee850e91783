"""Replication with real processes: kill -9 under load, catch-up, a join and a leave."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kvd.testing.processes import Kvd, Processes, request

from .test_cluster_processes import eventually, member_ids, start_cluster

pytestmark = pytest.mark.timeout(240)


def cluster(processes: Processes) -> tuple[Kvd, dict[str, Kvd], Kvd, str]:
    registry, nodes, gateway = start_cluster(
        processes, "--replicas", "3", "--write-quorum", "2", "--read-quorum", "2", "--repair-interval", "0.3"
    )
    return registry, dict(zip("abc", nodes, strict=True)), gateway, f"http://127.0.0.1:{registry.port}"


def keys_on(node: Kvd) -> int:
    return int(request(node.port, "GET", "/node")[1]["keys"])


def test_kill_9_under_load_loses_nothing_and_the_node_catches_up(processes: Processes) -> None:
    registry, nodes, gateway, _ = cluster(processes)
    acknowledged: dict[str, str] = {}
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(number: int) -> None:
        i = 0
        while not stop.is_set():
            key, value = f"w{number}-{i}", f"v{i}"
            try:
                status, body = request(gateway.port, "PUT", f"/kv/{key}", value.encode(), timeout=10)
            except OSError as e:
                failures.append(str(e))
                return
            if status == 200:
                with lock:
                    acknowledged[key] = value
            else:
                failures.append(f"{status} {body}")
            i += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        eventually(lambda: len(acknowledged) > 200, what="writes flowing")
        nodes["b"].kill()
        before = len(acknowledged)
        eventually(lambda: len(acknowledged) > before + 300, what="writes go on with b dead")
        # Reads keep working with one replica of three gone.
        sample = list(acknowledged.items())[:50]
        for key, value in sample:
            assert request(gateway.port, "GET", f"/kv/{key}")[1]["value"] == value
        nodes["b"].start()
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures[:5]
    total = len(acknowledged)
    eventually(lambda: keys_on(nodes["b"]) == total, seconds=60, what=f"b catches up to {total} keys")
    assert [keys_on(n) for n in nodes.values()] == [total] * 3
    for key, value in list(acknowledged.items())[::7]:
        assert request(nodes["b"].port, "GET", f"/kv/{key}")[1]["value"] == value


def test_a_fourth_node_joins_and_a_node_leaves_and_keys_end_on_exactly_three(
    processes: Processes, tmp_path: Path
) -> None:
    registry, nodes, gateway, url = cluster(processes)
    for i in range(300):
        assert request(gateway.port, "PUT", f"/kv/k{i}", b"v")[0] == 200
    nodes["d"] = processes.node("d", None, "--registry", url).start()
    eventually(lambda: len(request(gateway.port, "GET", "/cluster")[1]["nodes"]) == 4, what="d joins")
    eventually(
        lambda: sum(keys_on(n) for n in nodes.values()) == 900 and keys_on(nodes["d"]) > 0,
        seconds=60,
        what="300 keys x 3 replicas, some on d",
    )
    assert nodes["a"].terminate() == 0  # leaves the registry at once
    del nodes["a"]
    eventually(lambda: member_ids(registry.port) == ["b", "c", "d"], what="a left")
    eventually(
        lambda: [keys_on(n) for n in nodes.values()] == [300, 300, 300], seconds=60, what="every key on b, c and d"
    )
    for i in range(0, 300, 17):
        assert request(gateway.port, "GET", f"/kv/k{i}")[1]["value"] == "v"
