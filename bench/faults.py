"""
Faults production clusters see, measured as issue 9's table does: a registry, three nodes and
a gateway, each its own process (N=3 W=2 R=2), wrk -c16 against the gateway; for each fault,
GET and PUT healthy and then with the fault, in one run, and the ratios against the targets:

    throughput with the fault >= 0.7 x healthy, p99 <= 3 x healthy, 0 errors.

Rows (each a function below, listed in ROWS; add a fault by adding one):

    sigstop   one node hung: SIGSTOP (its socket still accepts, nothing answers), SIGCONT after
    kill9     one node killed (kill -9), within its lease: a sequential client's read latency
              (one kept-alive connection), healthy vs after the kill; no wrk

    python bench/faults.py [--duration 5] [--rows sigstop]

Needs wrk (apt-get install -y wrk). Every process is stopped at the end, a stopped node is
continued first. Timings only print; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from attrs import frozen
from checkout import ensure_kvd_importable
from report import machine, met, report_quiet
from servers import Kvd, Processes, bench_processes, preload, request, wait_for_members
from wrk import GET_LUA, PUT_LUA, WrkResult, run_wrk, write_lua

THROUGHPUT_TARGET = 0.7
P99_TARGET = 3.0
KEYS = 1000
CONNECTIONS = 16


class FaultCluster:
    """A registry, nodes a, b and c and a gateway (N=3 W=2 R=2), each its own process."""

    def __init__(self, stack: ExitStack, workdir: Path, ttl: float) -> None:
        self.workdir = workdir
        self.processes: Processes = stack.enter_context(bench_processes(workdir))
        self.registry = self.processes.registry("--ttl", f"{ttl:g}").start()
        self.nodes: dict[str, Kvd] = {
            node_id: self.processes.node(node_id, None, "--registry", self.registry.url).start()
            for node_id in ("a", "b", "c")
        }
        self.gateway = self.processes.gateway(
            "--registry",
            self.registry.url,
            *("--replicas", "3", "--write-quorum", "2", "--read-quorum", "2"),
        ).start()
        wait_for_members(self.gateway, 3, 60)
        assert self.gateway.port is not None
        self.port = self.gateway.port
        self.url = f"http://127.0.0.1:{self.port}"
        preload(self.port, [(f"key{i}", "v" * 100) for i in range(KEYS)])
        self.get_lua = write_lua(workdir, "get.lua", GET_LUA, n=KEYS, prefix="key")
        self.put_lua = write_lua(workdir, "put.lua", PUT_LUA, n=KEYS, prefix="key", size=100)

    def load(self, duration: float) -> tuple[WrkResult, WrkResult]:
        """GET, then PUT, for C{duration} seconds each."""
        return (
            run_wrk(self.url, self.get_lua, duration, connections=CONNECTIONS),
            run_wrk(self.url, self.put_lua, duration, connections=CONNECTIONS),
        )

    def reachable(self) -> dict[str, bool]:
        return {n["id"]: bool(n.get("reachable", True)) for n in request(self.port, "GET", "/cluster")[1]["nodes"]}


@frozen
class Figures:
    """One fault's run: healthy and faulty GET and PUT, and notes."""

    fault: str
    healthy: tuple[WrkResult, WrkResult]
    faulty: tuple[WrkResult, WrkResult]
    notes: tuple[str, ...] = ()


def errors(result: WrkResult) -> int:
    """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
    return result.non2xx + sum(int(n) for n in re.findall(r"\d+", result.socket_errors))


def show(figures: Figures) -> None:
    print(f"\n{figures.fault}")
    print(f"  {'':5} {'healthy req/s':>14} {'p99 ms':>8}   {'faulty req/s':>13} {'p99 ms':>8} {'errors':>7}")
    for method, healthy, faulty in zip(("GET", "PUT"), figures.healthy, figures.faulty, strict=True):
        throughput = faulty.rps / healthy.rps if healthy.rps else 0.0
        p99 = faulty.p99_ms / healthy.p99_ms if healthy.p99_ms else float("inf")
        print(
            f"  {method:5} {healthy.rps:14.0f} {healthy.p99_ms:8.2f}   {faulty.rps:13.0f} {faulty.p99_ms:8.2f}"
            f" {errors(faulty):7d}"
        )
        print(
            f"        throughput {throughput:5.2f} x  target >= {THROUGHPUT_TARGET}"
            f"  {met(throughput, THROUGHPUT_TARGET)};"
            f"  p99 {p99:5.2f} x  target <= {P99_TARGET:g}  {met(p99, P99_TARGET, at_least=False)};"
            f"  errors {errors(faulty)}  target 0  {'MET' if errors(faulty) == 0 else 'MISSED'}"
        )
    for note in figures.notes:
        print(f"  {note}")


@contextmanager
def stopped(process: Kvd) -> Iterator[None]:
    """C{process} hung (SIGSTOP) inside the block, continued (SIGCONT) after it, whatever happens."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


# The rows: each takes the cluster and the seconds per wrk run, applies its fault and undoes it.


def sigstop(cluster: FaultCluster, duration: float) -> Figures:
    """One node hung (SIGSTOP) while wrk runs; continued after."""
    healthy = cluster.load(duration)
    with stopped(cluster.nodes["b"]):
        faulty = cluster.load(duration)
        judged = cluster.reachable()
    started = time.monotonic()
    while not all(cluster.reachable().values()) and time.monotonic() - started < 30:
        time.sleep(0.05)
    back = time.monotonic() - started
    return Figures(
        "one node hung (SIGSTOP: TCP accepts, nothing answers)",
        healthy,
        faulty,
        (
            f"gateway's view while hung: {judged}",
            f"reachable again {back:.2f} s after SIGCONT"
            if all(cluster.reachable().values())
            else "NOT reachable again",
        ),
    )


def kill9(cluster: FaultCluster, duration: float) -> Figures | None:
    """One node killed (kill -9): a sequential client's reads, before the registry drops its lease."""
    healthy = sequential_reads(cluster.port, duration)
    cluster.nodes["b"].kill()
    killed = sequential_reads(cluster.port, duration)
    print("\none node killed (kill -9), a sequential client's GETs while the lease runs")
    for name, (latencies, failed) in (("healthy", healthy), ("b killed", killed)):
        ordered = sorted(latencies)
        print(
            f"  {name:9} {len(ordered):6d} reads  median {1000 * ordered[len(ordered) // 2]:7.2f} ms"
            f"  p99 {1000 * ordered[int(len(ordered) * 0.99)]:7.2f} ms  max {1000 * ordered[-1]:7.2f} ms"
            f"  failed {failed}"
        )
    print(f"  gateway's view: {cluster.reachable()}")
    return None


def sequential_reads(port: int, duration: float) -> tuple[list[float], int]:
    """GETs one after another over one kept-alive connection for C{duration} seconds: latencies, failures."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    latencies, failed, i = [], 0, 0
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            started = time.monotonic()
            connection.request("GET", f"/kv/key{i % KEYS}")
            response = connection.getresponse()
            response.read()
            latencies.append(time.monotonic() - started)
            failed += response.status != 200
            i += 1
    finally:
        connection.close()
    return latencies, failed


#: Each row takes the cluster and the seconds per measurement, and gives its figures (or prints its own).
ROWS: dict[str, Callable[[FaultCluster, float], Figures | None]] = {"sigstop": sigstop, "kill9": kill9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per measurement")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which rows, of {', '.join(ROWS)}")
    parser.add_argument("--ttl", type=float, default=10.0, help="the registry's lease, seconds")
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    print(f"3 nodes + gateway, N=3 W=2 R=2, wrk -c{CONNECTIONS}, {args.duration:g} s per run, --ttl {args.ttl:g}")
    for name in args.rows.split(","):
        row = ROWS[name.strip()]
        with tempfile.TemporaryDirectory(prefix="kvd-bench-faults-") as tmp, ExitStack() as stack:
            figures = row(FaultCluster(stack, Path(tmp), args.ttl), args.duration)
            if figures is not None:
                show(figures)


if __name__ == "__main__":
    main()
