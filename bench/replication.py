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
import http.client
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from _common import (
    PUT_LUA,
    Server,
    ensure_kvd_importable,
    free_port,
    kvd_argv,
    machine,
    met,
    named_node_argv,
    report_quiet,
    request,
    run_wrk,
    write_lua,
)

PUT_TARGET = 0.35
CATCH_UP_TARGET = 10.0


class Cluster:
    """registry + 3 nodes + gateway, each its own process."""

    def __init__(self, stack: ExitStack, workdir: Path) -> None:
        self.stack, self.workdir = stack, workdir
        registry_port = free_port()
        self.registry_url = f"http://127.0.0.1:{registry_port}"
        stack.enter_context(
            Server(
                "registry",
                kvd_argv(
                    workdir,
                    "registry",
                    "--role",
                    "registry",
                    "--ttl",
                    "3",
                    "--listen",
                    f"tcp:{registry_port}:interface=127.0.0.1",
                ),
                registry_port,
                workdir,
            )
        )
        self.nodes: dict[str, Server] = {}
        self.ports: dict[str, int] = {}
        for node_id in ("a", "b", "c"):
            self.start_node(node_id)
        self.gateway_port = free_port()
        stack.enter_context(
            Server(
                "gateway",
                kvd_argv(
                    workdir,
                    "gateway",
                    "--role",
                    "gateway",
                    "--registry",
                    self.registry_url,
                    "--repair-interval",
                    "0.5",
                    "--listen",
                    f"tcp:{self.gateway_port}:interface=127.0.0.1",
                ),
                self.gateway_port,
                workdir,
            )
        )
        self.wait_members(3)

    def start_node(self, node_id: str) -> None:
        port = self.ports.setdefault(node_id, free_port())
        server = Server(
            node_id, named_node_argv(self.workdir, node_id, port, "--registry", self.registry_url), port, self.workdir
        )
        self.nodes[node_id] = self.stack.enter_context(server)

    def kill(self, node_id: str) -> None:
        process = self.nodes[node_id].process
        assert process is not None
        process.kill()
        process.wait(10)

    def wait_members(self, count: int, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            status, body, _ = request(self.gateway_port, "GET", "/cluster")
            if status == 200 and body.count(b'"url"') == count:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the gateway did not see {count} nodes")

    def keys_on(self, node_id: str) -> int:
        status, body, _ = request(self.ports[node_id], "GET", "/node")
        import json

        return int(json.loads(body)["keys"]) if status == 200 else -1


def write_many(port: int, count: int, prefix: str, threads: int = 16) -> float:
    """PUT C{count} keys through 16 kept-alive connections; the seconds it took."""

    def worker(start: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for i in range(start, count, threads):
                connection.request("PUT", f"/kv/{prefix}{i}", body=b"v" * 100)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"PUT {prefix}{i}: {response.status}")
        finally:
            connection.close()

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
        port = free_port()
        with Server("alone", named_node_argv(workdir, "alone", port), port, workdir):
            direct = run_wrk(f"http://127.0.0.1:{port}", lua, args.duration)
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
