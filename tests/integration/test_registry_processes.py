"""Real processes: a node restored from an older copy of its data dir rejoins; two registries, one killed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from kvd.testing.processes import Kvd, Processes, request

from .test_cluster_processes import TTL, eventually, member_ids, statuses

pytestmark = pytest.mark.timeout(180)


def incarnation_of(data: Path) -> int:
    return int((data / "incarnation").read_text())


def test_a_node_restored_from_an_older_copy_of_its_data_dir_registers_again(
    processes: Processes, tmp_path: Path
) -> None:
    registry = processes.registry("--ttl", TTL).start()
    node = processes.node("a", None, "--registry", registry.url)
    data = tmp_path / "data" / "a"
    node.start()
    eventually(lambda: statuses(registry.port, "/registry/nodes") == {"a": "up"}, what="a registers")
    assert node.terminate() == 0
    shutil.copytree(data, tmp_path / "copy", symlinks=True)  # the backup: incarnation 1
    for _ in range(2):  # two restarts: the registry has now seen incarnation 3
        node.start()
        eventually(lambda: statuses(registry.port, "/registry/nodes") == {"a": "up"}, what="a registers")
        assert node.terminate() == 0
    assert incarnation_of(data) == 3
    shutil.rmtree(data)
    shutil.copytree(tmp_path / "copy", data, symlinks=True)  # restored: incarnation 1, next start 2
    node.start()
    eventually(lambda: statuses(registry.port, "/registry/nodes") == {"a": "up"}, what="the restored a registers")
    assert incarnation_of(data) == 4, "it moved past the registry's 3 and kept that in its data dir"
    assert "moving to incarnation 4" in node.log.read_text()
    assert node.terminate() == 0
    node.start()  # and a later restart counts on from there, with no refusal
    eventually(lambda: statuses(registry.port, "/registry/nodes") == {"a": "up"}, what="a registers again")
    assert incarnation_of(data) == 5
    assert node.log.read_text().count("moving to incarnation") == 1


def test_two_registries_one_killed_nodes_still_join_and_the_gateway_serves(processes: Processes) -> None:
    registries = [processes.registry("--ttl", TTL, name=f"registry{n}").start() for n in (1, 2)]
    listed = [arg for r in registries for arg in ("--registry", r.url)]
    nodes = [processes.node(n, None, *listed).start() for n in ("a", "b", "c")]
    gateway = processes.gateway(*listed, "--timeout", "2").start()
    everyone = {"a": "up", "b": "up", "c": "up"}
    for registry in registries:
        eventually(lambda r=registry: statuses(r.port, "/registry/nodes") == everyone, what="a, b, c in both")
    eventually(lambda: statuses(gateway.port, "/cluster") == everyone, what="the gateway sees a, b and c up")
    for i in range(30):
        assert request(gateway.port, "PUT", f"/kv/k{i}", b"before")[0] == 200

    registries[0].kill()
    for i in range(30):
        assert request(gateway.port, "PUT", f"/kv/k{i}", b"after")[0] == 200
        assert request(gateway.port, "GET", f"/kv/k{i}")[1]["value"] == "after"
    d: Kvd = processes.node("d", None, *listed).start()  # started after the kill: registers with the other
    nodes.append(d)
    eventually(
        lambda: statuses(gateway.port, "/cluster") == {**everyone, "d": "up"}, what="the gateway serves d as well"
    )
    assert member_ids(registries[1].port) == ["a", "b", "c", "d"]
    for i in range(30, 90):
        assert request(gateway.port, "PUT", f"/kv/k{i}", b"with d")[0] == 200
    assert request(d.port, "GET", "/node")[1]["keys"] > 0, "d owns some of the keys written since it joined"
    for i in range(90):
        assert request(gateway.port, "GET", f"/kv/k{i}")[0] == 200
    time.sleep(3 * float(TTL))  # several TTLs later the live registry still renews everyone
    assert statuses(gateway.port, "/cluster") == {**everyone, "d": "up"}
