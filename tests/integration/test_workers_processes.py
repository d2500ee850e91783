"""
A gateway run with --workers: one port served by several real processes, membership followed
once and forwarded, repair run once, workers restarted when they die and gone when the main
process goes (stopped or killed).
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvd.testing.processes import Kvd, Processes, free_port, http_request, request, wait_for_members

from .test_cluster_processes import eventually as _eventually

pytestmark = pytest.mark.timeout(180)
WORKER_PATTERN = re.compile(rb"-m\0kvd\.workers\0")


def eventually(check: Callable[[], bool], seconds: float = 20.0, what: str = "condition") -> None:
    """The shared helper, with a longer default: a worker takes about 2 s to start."""
    _eventually(check, seconds, what)


def workers_of(pid: int) -> set[int]:
    """The running kvd worker processes whose parent is C{pid}."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        fields = stat.rsplit(b")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != b"Z" and WORKER_PATTERN.search(cmdline):
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def scrape(port: int, tls: ssl.SSLContext | None = None) -> dict[str, float]:
    """One /metrics on a new connection, as {sample name: value} (samples without labels)."""
    answer = http_request(port, "GET", "/metrics", timeout=5, tls=tls)
    assert answer.status == 200
    samples = {}
    for line in answer.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def answering_pids(
    port: int, want: int, tls: ssl.SSLContext | None = None, tries: int = 400
) -> dict[int, dict[str, float]]:
    """The processes that answered /metrics over up to C{tries} new connections, until C{want} of them did."""
    seen: dict[int, dict[str, float]] = {}
    for _ in range(tries):
        samples = scrape(port, tls)
        seen[int(samples["kvd_gateway_pid"])] = samples
        if len(seen) >= want:
            break
    return seen


@pytest.fixture
def reaper() -> Iterator[set[int]]:
    """Pids of workers to kill at the end of the test, should one outlive its main process."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def start(
    processes: Processes, reaper: set[int], *options: str, nodes: tuple[str, ...] = ("a", "b", "c")
) -> tuple[Kvd, list[Kvd], Kvd]:
    cluster = processes.cluster(
        node_ids=nodes,
        registry_options=("--ttl", "1.5"),
        gateway_options=("--workers", "3", "--timeout", "2", *options),
    )
    gateway = cluster.gateway
    eventually(lambda: len(workers_of(gateway.pid)) == 2, what="two workers running")
    reaper.update(workers_of(gateway.pid))
    eventually(lambda: len(answering_pids(gateway.port, 3, tries=50)) == 3, what="all three processes answering")
    return cluster.registry, cluster.nodes, gateway


def test_three_processes_serve_one_port_hear_a_node_join_and_stop_with_the_main_one(
    processes: Processes, reaper: set[int]
) -> None:
    registry, nodes, gateway = start(processes, reaper, nodes=("a", "b"))
    workers = workers_of(gateway.pid)
    # Every process takes connections (the kernel hands each to whichever accepts first).
    seen = answering_pids(gateway.port, 3)
    assert set(seen) == {gateway.pid, *workers}
    assert {samples["kvd_gateway_worker"] for samples in seen.values()} == {0, 1, 2}
    # Repair figures are the main process's alone.
    assert "kvd_repair_backlog" in seen[gateway.pid]
    assert all("kvd_repair_backlog" not in seen[pid] for pid in workers)
    for i in range(30):
        assert request(gateway.port, "PUT", f"/kv/k{i}", f"v{i}".encode())[0] == 200
    for i in range(30):
        assert request(gateway.port, "GET", f"/kv/k{i}")[1]["value"] == f"v{i}"
    for i in range(0, 30, 2):
        assert request(gateway.port, "DELETE", f"/kv/k{i}")[0] == 200
    for i in range(30):
        assert request(gateway.port, "GET", f"/kv/k{i}")[0] == (404 if i % 2 == 0 else 200)

    # A node joins through the registry: the main process hears it and tells its workers.
    processes.node("c", None, "--registry", registry.url).start()

    def all_see_three() -> bool:
        found = answering_pids(gateway.port, 3)
        return len(found) == 3 and all(s["kvd_ring_members"] == 3 for s in found.values())

    eventually(all_see_three, what="every process's ring has node c")
    assert "worker" not in " ".join(
        line for line in gateway.log.read_text().splitlines() if "ignoring a membership line" in line
    )

    assert gateway.terminate() == 0
    eventually(lambda: not any(alive(pid) for pid in workers), seconds=5, what="workers gone after SIGTERM")


def internal_calls(node: Kvd) -> float:
    """How many /internal/ requests C{node} has answered."""
    body = http_request(node.port, "GET", "/metrics").body.decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith("kvd_http_requests_total{") and 'route="/internal/*"' in line
    )


def test_repair_sweeps_run_in_the_main_process_only(processes: Processes, reaper: set[int]) -> None:
    registry, nodes, gateway = start(processes, reaper, "--repair-interval", "0.2")
    request(gateway.port, "PUT", "/kv/r", b"1")
    time.sleep(1.0)
    calls_before = internal_calls(nodes[0])
    # Each sweep of a quiet cluster asks every node for its digests once: the nodes see one
    # sweeper's worth of calls, not three.
    started = time.monotonic()
    time.sleep(3.0)
    calls = internal_calls(nodes[0]) - calls_before
    elapsed = time.monotonic() - started
    assert calls <= 1.5 * elapsed / 0.2 + 3, f"{calls} /internal/ calls to one node in {elapsed:.1f}s"
    assert calls >= 0.3 * elapsed / 0.2, f"only {calls} /internal/ calls: is repair running at all?"
    # /cluster shows the main process's sweeps, and none on a worker's answer.
    repairs = [request(gateway.port, "GET", "/cluster")[1]["repair"] for _ in range(60)]
    assert None in repairs
    assert max(r["rounds"] for r in repairs if r is not None) > 5


def test_a_worker_killed_is_started_again_and_requests_keep_being_answered(
    processes: Processes, reaper: set[int]
) -> None:
    registry, nodes, gateway = start(processes, reaper)
    request(gateway.port, "PUT", "/kv/x", b"1")
    before = workers_of(gateway.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    failures, answered, started = 0, 0, time.monotonic()
    replacement: set[int] = set()
    while time.monotonic() - started < 3.0 or not replacement:
        assert time.monotonic() - started < 15.0, "no worker started in place of the killed one"
        try:
            status, body = request(gateway.port, "GET", "/kv/x", timeout=2)
            assert (status, body["value"]) == (200, "1")
            answered += 1
        except OSError:
            failures += 1
        replacement = workers_of(gateway.pid) - before
    reaper.update(replacement)
    assert victim not in workers_of(gateway.pid)
    assert len(workers_of(gateway.pid)) == 2
    # Only a request on a connection the killed worker had taken can fail.
    assert failures <= 1, f"{failures} failed, {answered} answered"
    assert answered > 20
    new = replacement.pop()
    eventually(lambda: new in answering_pids(gateway.port, 3, tries=50), what="the new worker answering")


def test_kill_9_of_the_main_process_takes_its_workers_with_it(processes: Processes, reaper: set[int]) -> None:
    registry, nodes, gateway = start(processes, reaper)
    workers = workers_of(gateway.pid)
    gateway.kill()
    eventually(lambda: not any(alive(pid) for pid in workers), seconds=10, what="workers gone after kill -9")


def test_workers_over_tls_share_an_ssl_port(processes: Processes, reaper: set[int], tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(server))
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    node = processes.node("a").start()
    port = free_port()
    gateway = processes.kvd(
        "gateway",
        "--role",
        "gateway",
        "--node",
        f"a={node.url}",
        "--replicas",
        "1",
        "--read-quorum",
        "1",
        "--write-quorum",
        "1",
        "--workers",
        "2",
        "--listen",
        f"ssl:{port}:interface=127.0.0.1:privateKey={server}",
        port=port,
        tls=client,
    ).start()
    eventually(lambda: len(workers_of(gateway.pid)) == 1, what="the worker running")
    reaper.update(workers_of(gateway.pid))
    wait_for_members(gateway, 1)
    eventually(
        lambda: set(answering_pids(port, 2, tls=client, tries=50)) == {gateway.pid, *workers_of(gateway.pid)},
        what="both processes answering over TLS",
    )
    assert request(port, "PUT", "/kv/t", b"tls", tls=client)[0] == 200
    assert request(port, "GET", "/kv/t", tls=client)[1]["value"] == "tls"


def test_workers_refuse_a_listen_socket_they_cannot_share(processes: Processes, tmp_path: Path) -> None:
    gateway = processes.kvd(
        "gateway",
        "--role",
        "gateway",
        "--node",
        "a=http://127.0.0.1:1",
        "--workers",
        "2",
        "--listen",
        f"unix:{tmp_path / 'gw.sock'}",
        port=None,
    )
    status, output = gateway.run_to_exit()
    assert status == 2
    sock = tmp_path / "gw.sock"
    assert output.strip().splitlines() == [
        f"twistd kvd: --workers 2 needs a tcp: or ssl: --listen, not 'unix:{sock}' (see twistd kvd --help)"
    ]
