"""
The gateway hop: GET req/s through a gateway with three nodes behind it, against GET req/s
straight to one node holding the same keys, in the same run, at 32 connections.

Target (issue 3): gateway >= 0.5 x node. Both measured with wrk; the node alone first, then
registry + 3 nodes + two gateways, one reading from one replica (--read-quorum 1: the hop
issue 3 measures) and one with the default read quorum of 2 (each GET asks two replicas and
answers the newest). Every process is stopped at the end.

    python bench/gateway.py [--duration 10] [--keys 1000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from checkout import ensure_kvd_importable
from report import machine, met, report_quiet
from servers import bench_processes, preload, wait_for_members
from wrk import GET_LUA, run_wrk, write_lua

TARGET = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per measurement")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys read")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    items = [(f"key{i}", "v" * 100) for i in range(args.keys)]

    with tempfile.TemporaryDirectory(prefix="kvd-bench-gw-") as tmp:
        workdir = Path(tmp)
        lua = write_lua(workdir, "get.lua", GET_LUA, n=args.keys, prefix="key")

        with bench_processes(workdir) as processes, processes.node("alone") as alone:
            assert alone.port is not None
            preload(alone.port, items)
            direct = run_wrk(alone.url, lua, args.duration, connections=args.connections)
        print(f"node alone      GET {direct.rps:10.0f} req/s   p99 {direct.p99_ms:7.2f} ms")

        with bench_processes(workdir) as processes:
            registry_url = processes.registry().start().url
            for number in range(1, 4):
                processes.node(f"node{number}", None, "--registry", registry_url).start()
            gateways = {}
            for quorum in ("1", "2"):
                gateway = processes.gateway(
                    "--registry", registry_url, "--read-quorum", quorum, name=f"gateway-r{quorum}"
                )
                gateways[quorum] = gateway.start().port
            wait_for_members(gateway, 3, 30)
            preload(gateways["2"], items)
            hops = {
                q: run_wrk(f"http://127.0.0.1:{port}", lua, args.duration, connections=args.connections)
                for q, port in gateways.items()
            }
        for quorum, hop in hops.items():
            ratio = hop.rps / direct.rps
            print(
                f"via gateway, R={quorum} GET {hop.rps:10.0f} req/s   p99 {hop.p99_ms:7.2f} ms   "
                f"gateway / node {ratio:.2f}   target >= {TARGET}   {met(ratio, TARGET)}"
            )


if __name__ == "__main__":
    main()
