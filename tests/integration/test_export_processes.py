"""
`kvd export` and `kvd import` against real twistd processes: a backup and a restore into the
same cluster change nothing, and a restore into a second, empty cluster of another size
gives the same data.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import kvd
from kvd.testing.processes import Cluster, Processes, wait_for_members

pytestmark = pytest.mark.timeout(180)
KVD = str(Path(sys.executable).parent / "kvd")


def run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([KVD, *args], capture_output=True, timeout=60)


def everything(url: str) -> dict[str, tuple[str, str]]:
    with kvd.Client(url) as client:
        return {e.key: (e.value, e.version) for e in client.export()}


def test_export_then_import_changes_nothing_and_restores_into_a_bigger_empty_cluster(
    processes: Processes, tmp_path: Path
) -> None:
    source = processes.cluster(gateway_options=("--timeout", "2"))
    url = source.gateway.url
    with kvd.Client(url) as client:
        written = client.batch(put={f"key{i:03d}": f"value {i} ✓" for i in range(300)})
        assert all(item.status == 200 for item in written.values())
        client.put("short-lived", "x", ttl=3600)
        client.delete("key007")
    before = everything(url)
    assert len(before) == 300 and "key007" not in before and "short-lived" in before
    backup = tmp_path / "backup.ndjson"
    exported = run("--url", url, "export", str(backup))
    assert exported.returncode == 0, exported.stderr
    assert b"exported 300 keys" in exported.stderr
    lines = [json.loads(line) for line in backup.read_bytes().splitlines()]
    assert {e["key"]: (e["value"], e["version"]) for e in lines} == before
    imported = run("--url", url, "--json", "import", str(backup))
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout) == {"imported": 300, "skipped": 0, "failed": 0, "errors": []}
    assert everything(url) == before

    registry = processes.registry(name="registry-2").start()
    nodes = [processes.node(n, None, "--registry", registry.url).start() for n in ("p", "q", "r", "s", "t")]
    gateway = processes.gateway("--registry", registry.url, "--timeout", "2", name="gateway-2").start()
    target = Cluster(registry, nodes, gateway)
    wait_for_members(target.gateway, 5)
    assert everything(target.gateway.url) == {}
    restored = run("--url", target.gateway.url, "import", str(backup))
    assert restored.returncode == 0, restored.stderr
    assert everything(target.gateway.url) == before
    with kvd.Client(target.gateway.url) as client:
        assert client.get("key042").value == "value 42 ✓"
        assert client.get("short-lived").expires is not None


def test_a_bad_file_makes_kvd_import_fail_naming_the_line(processes: Processes, tmp_path: Path) -> None:
    source = processes.cluster(gateway_options=("--timeout", "2"))
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b'{"key": "a", "value": "1", "version": "nope"}\n')
    result = run("--url", source.gateway.url, "import", str(bad))
    assert result.returncode != 0 and b"line 1" in result.stderr
