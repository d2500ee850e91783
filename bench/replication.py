"""
Replication's costs, measured in one run:

1. Replicated PUT (N=3, W=2, fsync on) through a gateway with three nodes behind it, against
   PUT straight to one node alone, 32 connections each (wrk). Target (issue 4): >= 0.35.
2. Catch-up: a node is killed (kill -9) while 10,000 writes land through the gateway, then
   restarted; the time until it holds them all, with no client reading them. Target: <= 10 s.

    python bench/replication.py [--duration 10] [--writes 10000]

Every process is stopped at the end. Timings only print; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from checkout import ensure_kvd_importable
from report import machine, met, report_quiet
from servers import Kvd, Processes, bench_processes, preload, request, wait_for_members
from wrk import PUT_LUA, run_wrk, write_lua

PUT_TARGET = 0.35
CATCH_UP_TARGET = 10.0


class Cluster:
    """registry + 3 nodes + gateway, each its own process, stopped when C{stack} closes."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.processes: Processes = stack.enter_context(bench_processes(workdir))
        self.registry_url = self.processes.registry("--ttl", "3").start().url
        self.nodes: dict[str, Kvd] = {}
        for node_id in ("a", "b", "c"):
            self.start_node(node_id)
        self.gateway = self.processes.gateway("--registry", self.registry_url, "--repair-interval", "0.5").start()
        assert self.gateway.port is not None
        self.gateway_port = self.gateway.port
        self.wait_members(3)

    def start_node(self, node_id: str) -> None:
        """Start node C{node_id}: a new one, or one killed before, again on its port and data."""
        if node_id not in self.nodes:
            self.nodes[node_id] = self.processes.node(node_id, None, "--registry", self.registry_url)
        self.nodes[node_id].start()

    def kill(self, node_id: str) -> None:
        self.nodes[node_id].kill()

    def wait_members(self, count: int, seconds: float = 30) -> None:
        wait_for_members(self.gateway, count, seconds)

    def keys_on(self, node_id: str) -> int:
        port = self.nodes[node_id].port
        assert port is not None
        status, body = request(port, "GET", "/node")
        return int(body["keys"]) if status == 200 else -1


def write_many(port: int, count: int, prefix: str, threads: int = 16) -> float:
    """PUT C{count} keys through 16 kept-alive connections; the seconds it took."""

    def worker(start: int) -> None:
        preload(port, [(f"{prefix}{i}", "v" * 100) for i in range(start, count, threads)])

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per PUT measurement")
    parser.add_argument("--writes", type=int, default=10_000, help="writes landing while a node is down")
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()

    with tempfile.TemporaryDirectory(prefix="kvd-bench-repl-") as tmp:
        workdir = Path(tmp)
        lua = write_lua(workdir, "put.lua", PUT_LUA, n=1000, prefix="key", size=100)
        with bench_processes(workdir) as processes, processes.node("alone") as alone:
            direct = run_wrk(alone.url, lua, args.duration)
        print(f"PUT, one node alone           {direct.rps:9.0f} req/s  p99 {direct.p99_ms:7.2f} ms")

        with ExitStack() as stack:
            cluster = Cluster(stack, workdir)
            replicated = run_wrk(f"http://127.0.0.1:{cluster.gateway_port}", lua, args.duration)
            ratio = replicated.rps / direct.rps
            print(f"PUT via gateway, N=3 W=2      {replicated.rps:9.0f} req/s  p99 {replicated.p99_ms:7.2f} ms")
            print(f"replicated / direct           {ratio:9.2f}   target >= {PUT_TARGET}   {met(ratio, PUT_TARGET)}")

            base = cluster.keys_on("b")
            cluster.kill("b")
            took = write_many(cluster.gateway_port, args.writes, "catchup-")
            print(f"{args.writes} writes with b down    {took:9.2f} s")
            restarted = time.monotonic()
            cluster.start_node("b")
            deadline = restarted + 120
            while cluster.keys_on("b") < base + args.writes and time.monotonic() < deadline:
                time.sleep(0.05)
            caught_up = time.monotonic() - restarted
            held = cluster.keys_on("b") - base
            print(
                f"b holds {held}/{args.writes} after restart + {caught_up:.2f} s   target <= {CATCH_UP_TARGET:g} s   "
                f"{met(caught_up, CATCH_UP_TARGET, at_least=False) if held >= args.writes else 'MISSED'}"
            )


if __name__ == "__main__":
    main()
