"""
The blocking kvd.Client and the kvd command: against real twistd processes, and against the
fake gateway on a loopback socket for the exact forms of every request (and the failures a
real cluster cannot be made to give on demand).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import kvd
from kvd.cli import main
from kvd.testing.fake_gateway import FakeGateway, serve_in_thread
from kvd.testing.processes import Cluster, Processes, free_port

from .test_cluster_processes import eventually

pytestmark = pytest.mark.timeout(120)
KVD = str(Path(sys.executable).parent / "kvd")


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """The installed kvd command, as a shell would run it."""
    return subprocess.run([KVD, *args], input=stdin, capture_output=True, timeout=30)


@pytest.fixture
def fake() -> Iterator[tuple[FakeGateway, str]]:
    gateway = FakeGateway()
    with serve_in_thread(gateway) as url:
        yield gateway, url


@pytest.fixture
def cluster(processes: Processes) -> Cluster:
    return processes.cluster(gateway_options=("--timeout", "2"))


# --- against real processes ------------------------------------------------------------------


def test_the_client_writes_reads_and_deletes_through_a_real_gateway(cluster: Cluster) -> None:
    with kvd.Client(cluster.gateway.url) as client:
        written = client.put("greeting", "hello wörld")
        assert client.get("greeting") == kvd.Entry("greeting", "hello wörld", written.version or "")
        assert sorted(client.owners("greeting")) == ["a", "b", "c"]
        assert client.delete("greeting").key == "greeting"
        with pytest.raises(kvd.NotFound):
            client.get("greeting")
        with pytest.raises(kvd.BadRequest):
            client.plan(remove="nobody")
        assert client.plan(join="d")["moved_share"] > 0
        assert [n["id"] for n in client.cluster()["nodes"]] == ["a", "b", "c"]
        for _ in range(5):  # greeting had four requests
            client.put("busy", "x")
        assert client.hot(1)["keys"][0]["key"] == "busy"


def test_the_client_lists_batches_watches_follows_and_updates_against_a_real_gateway(cluster: Cluster) -> None:
    """What the fake gateway below checks the form of, against the real thing now that it serves it."""
    with kvd.Client(cluster.gateway.url) as client:
        results = client.batch(put={f"k{i:03d}": str(i) for i in range(250)})
        assert len(results) == 250
        assert list(client.list("k", limit=100)) == [f"k{i:03d}" for i in range(250)]
        assert [e.value for e in client.items("k00")] == [str(i) for i in range(10)]
        start = client.changes().next
        first = client.put("c", "1", ttl=60)
        assert first.expires is not None
        with pytest.raises(kvd.PreconditionFailed):
            client.put("c", "2", if_version="0000000000010000000.nobody")
        second = client.put("c", "2", if_version=first.version)
        assert second.value == "2"
        assert client.update("c", lambda v: (v or "") + "+").value == "2+"
        assert "c" in [change.key for change in client.changes(cursor=start).changes]
        watching = client.watch("c", version=client.get("c").version, wait=5)
        client.put("c", "3")
        assert next(watching).value == "3"  # type: ignore[union-attr]
        with pytest.raises(kvd.PreconditionFailed):
            client.put("c", "4", if_absent=True)


def test_the_command_against_a_real_cluster(cluster: Cluster) -> None:
    url = cluster.gateway.url
    assert run("--url", url, "put", "a", "1").returncode == 0
    got = run("--url", url, "get", "a")
    assert (got.returncode, got.stdout) == (0, b"1\n")
    assert run("--url", url, "put", "b", "-", stdin=b"from stdin").returncode == 0
    assert json.loads(run("--url", url, "--json", "get", "b").stdout)["value"] == "from stdin"
    binary = bytes(range(256)) * 4
    assert run("--url", url, "put", "bin", "-", stdin=binary).returncode == 0, "bytes that are not UTF-8 are stored"
    assert run("--url", url, "get", "--raw", "bin").stdout == binary, "and given back exactly"
    assert sorted(run("--url", url, "owners", "a").stdout.split()) == [b"a", b"b", b"c"]
    table = run("--url", url, "cluster")
    assert table.returncode == 0 and all(n in table.stdout for n in (b" a ", b" b ", b" c ", b"up"))
    rows = json.loads(run("--url", url, "--json", "cluster").stdout)["nodes"]
    assert [(r["id"], r["status"]) for r in rows] == [("a", "up"), ("b", "up"), ("c", "up")]

    def counted() -> bool:  # the gateway keeps each node's count for a few seconds
        rows = json.loads(run("--url", url, "--json", "cluster").stdout)["nodes"]
        return sum(r["keys"] or 0 for r in rows) >= 6  # three keys, on at least two replicas each

    eventually(counted, seconds=20, what="the nodes' key counts in kvd cluster")
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9 and all(0.2 < r["share"] < 0.5 for r in rows)
    assert b"d" in run("--url", url, "plan", "--join", "d:2").stdout
    assert json.loads(run("--url", url, "--json", "hot", "-n", "1").stdout)["keys"][0]["key"] in ("a", "b")


def test_every_failure_is_one_line_on_stderr_and_a_nonzero_status(cluster: Cluster) -> None:
    missing = run("--url", cluster.gateway.url, "get", "nothing-here")
    assert missing.returncode == 1 and missing.stdout == b""
    assert missing.stderr.count(b"\n") == 1 and b"no such key" in missing.stderr
    refused = run("--url", f"http://127.0.0.1:{free_port()}", "get", "a")
    assert refused.returncode == 3 and refused.stderr.count(b"\n") == 1 and b"cannot reach" in refused.stderr
    usage = run("--url", cluster.gateway.url, "plan")
    assert usage.returncode == 2
    cluster.nodes[0].kill()
    cluster.nodes[1].kill()
    unavailable = run("--url", cluster.gateway.url, "put", "x", "1")
    assert unavailable.returncode == 1 and unavailable.stderr.count(b"\n") == 1


def test_a_gateway_that_cannot_be_reached_is_named_with_the_command_run(tmp_path: Path) -> None:
    """export asks /cluster first (for its progress bar): the one line names export, not that request."""
    refused = run("--url", f"http://127.0.0.1:{free_port()}", "export", str(tmp_path / "f"))
    assert refused.returncode == 3 and refused.stderr.count(b"\n") == 1
    assert refused.stderr.startswith(b"kvd: export: cannot reach http://127.0.0.1:"), refused.stderr


def test_a_file_import_cannot_read_is_exit_status_1_naming_it(tmp_path: Path) -> None:
    """As docs/cli.md says: a local file that cannot be read is status 1 (not click's usage error, 2)."""
    url = f"http://127.0.0.1:{free_port()}"  # never asked: the file is read first
    for path in (tmp_path / "nonexistent", tmp_path):
        failed = run("--url", url, "import", str(path))
        assert failed.returncode == 1 and failed.stdout == b""
        assert failed.stderr == f"kvd: import: cannot read {path}: ".encode() + failed.stderr.split(b": ")[-1]
        assert failed.stderr.count(b"\n") == 1 and b"Usage" not in failed.stderr


@pytest.mark.parametrize("url", ["notaurl", "ftp://host", "http://", "http://host:99999", "http://[::1"])
def test_a_bad_url_is_one_line_and_a_usage_error(url: str) -> None:
    """No urllib3 warning wall: the URL is checked before any request, exit status 2 as for usage errors."""
    for given in (("--url", url), ()):
        bad = subprocess.run(
            [KVD, *given, "get", "a"], capture_output=True, timeout=30, env={**os.environ, "KVD_URL": url}
        )
        assert bad.returncode == 2 and bad.stdout == b""
        assert (
            bad.stderr
            == f"kvd: --url {url!r} (or $KVD_URL) is not a gateway URL such as http://127.0.0.1:8000\n".encode()
        )


@pytest.mark.parametrize(
    "command", ["get", "put", "delete", "ls", "watch", "owners", "cluster", "export", "import", "plan", "hot"]
)
def test_every_subcommand_has_help(command: str) -> None:
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage: " in result.output


# --- against the fake gateway ------------------------------------------------------------------


def test_the_client_pages_batches_and_writes_conditionally(fake: tuple[FakeGateway, str]) -> None:
    gateway, url = fake
    with kvd.Client(url) as client:
        client.batch(put={f"k{i:03d}": str(i) for i in range(250)})
        assert list(client.list("k", limit=100)) == [f"k{i:03d}" for i in range(250)]
        assert [e.value for e in client.items("k00")] == [str(i) for i in range(10)]
        first = client.put("c", "1", ttl=5)
        assert first.expires is not None
        with pytest.raises(kvd.PreconditionFailed):
            client.put("c", "2", if_version="not-it")
        assert client.put("c", "2", if_version=first.version).value == "2"
        gateway.interfere["c"] = 3
        assert client.update("c", lambda v: (v or "") + "+").value == "someone else's+"
        with pytest.raises(kvd.PreconditionFailed):
            client.delete("c", if_version=first.version)


def test_the_client_watches_follows_changes_exports_and_imports(fake: tuple[FakeGateway, str]) -> None:
    gateway, url = fake
    with kvd.Client(url) as client:
        start = client.changes(cursor="0").next
        first = client.put("w", "1")
        gateway.interfere["w"] = 0
        assert next(client.watch("w", version=first.version)).value == "changed-by-someone"  # type: ignore[union-attr]
        assert [c.key for c in client.changes(cursor=start).changes] == ["w"]
        exported = list(client.export())
        gateway.data.clear()
        assert client.import_entries(exported)["imported"] == 1
        assert list(client.export()) == exported
    refused = kvd.Client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(kvd.ConnectionFailed):
        refused.get("k")


def test_the_command_lists_exports_and_imports(fake: tuple[FakeGateway, str], tmp_path: Path) -> None:
    gateway, url = fake
    for i in range(1200):
        gateway._write(f"key{i:04d}", f"value {i}")
    listed = run("--url", url, "ls", "key")
    assert listed.returncode == 0 and listed.stdout.split() == [f"key{i:04d}".encode() for i in range(1200)]
    backup = tmp_path / "backup.ndjson"
    exported = run("--url", url, "export", str(backup))
    assert exported.returncode == 0 and b"exported 1200 keys" in exported.stderr
    assert len(backup.read_bytes().splitlines()) == 1200
    gateway.data.clear()
    imported = run("--url", url, "import", str(backup))
    assert imported.returncode == 0 and b"imported 1200" in imported.stderr
    assert len(gateway.data) == 1200


def test_a_file_export_cannot_write_is_exit_status_1_naming_the_command_and_file(
    fake: tuple[FakeGateway, str], tmp_path: Path
) -> None:
    """As docs/cli.md says: one line naming the subcommand and the file, as import's does."""
    _, url = fake
    for path in (tmp_path / "no-such-dir" / "backup.ndjson", tmp_path):
        failed = run("--url", url, "export", str(path))
        assert failed.returncode == 1 and failed.stdout == b""
        assert failed.stderr == f"kvd: export: cannot write {path}: ".encode() + failed.stderr.split(b": ")[-1]
        assert failed.stderr.count(b"\n") == 1


def test_a_reader_that_goes_away_early_is_not_a_failure(fake: tuple[FakeGateway, str]) -> None:
    """`kvd ls | head -1`: the closed pipe ends kvd quietly, exit status 0, nothing on stderr."""
    gateway, url = fake
    for i in range(3000):
        gateway._write(f"key{i:04d}", "v" * 100)
    for args in (("ls",), ("export", "-")):
        with subprocess.Popen([KVD, "--url", url, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as kvd_:
            assert kvd_.stdout is not None and kvd_.stderr is not None
            kvd_.stdout.readline()
            kvd_.stdout.close()
            stderr = kvd_.stderr.read()
            assert kvd_.wait(timeout=30) == 0, (args, stderr)
        assert b"kvd:" not in stderr and b"Traceback" not in stderr and b"Broken pipe" not in stderr, (args, stderr)


def test_kvd_cluster_takes_each_nodes_figures_from_the_gateway(fake: tuple[FakeGateway, str]) -> None:
    """Only the gateway need be reachable: the nodes' URLs here refuse, yet a and b show their figures."""
    gateway, url = fake
    report = {"keys_to_send": 5, "sent": 4, "dropped": 0, "last_error": None}
    gateway.nodes = [
        {"id": "a", "url": "http://127.0.0.1:9", "weight": 1, "keys": 42, "requests": 7, "repair": report},
        {"id": "b", "url": "http://127.0.0.1:9", "weight": 1, "keys": 0, "requests": 1, "repair": None},
        {"id": "c", "url": "http://127.0.0.1:9", "weight": 1, "keys": None, "requests": 0, "repair": None},
    ]
    listed = run("--url", url, "--json", "cluster")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)["nodes"]}
    assert [(rows[n]["status"], rows[n]["keys"], rows[n]["repair"]) for n in "abc"] == [
        ("up", 42, report),
        ("up", 0, None),
        ("down", None, None),
    ]
    table = run("--url", url, "cluster")
    assert table.returncode == 0 and b"4/5" in table.stdout and b"42" in table.stdout


def test_the_command_sends_ttl_conditions_and_the_token(tmp_path: Path) -> None:
    gateway = FakeGateway(token="s3cret")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with serve_in_thread(gateway) as url:
        assert run("--url", url, "get", "a").returncode == 1  # no token: 401
        with_token = ("--url", url, "--token-file", str(token))
        assert run(*with_token, "put", "a", "1", "--ttl", "30").returncode == 0
        assert ("PUT", "/kv/a?ttl=30") in gateway.log
        version = json.loads(run(*with_token, "--json", "get", "a").stdout)["version"]
        lost = run(*with_token, "put", "a", "2", "--if-version", "other")
        assert lost.returncode == 1 and b"precondition" in lost.stderr
        assert run(*with_token, "put", "a", "2", "--if-version", version).returncode == 0
        assert run(*with_token, "put", "a", "3", "--if-absent").returncode == 1
        env_run = subprocess.run(
            [KVD, "--token-file", str(token), "get", "a"],
            capture_output=True,
            timeout=30,
            env={"KVD_URL": url, "PATH": "/usr/bin:/bin"},
        )
        assert env_run.stdout == b"2\n"
