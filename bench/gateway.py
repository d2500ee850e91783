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
import time
from contextlib import ExitStack
from pathlib import Path

from _common import (
    GET_LUA,
    Server,
    ensure_kvd_importable,
    free_port,
    kvd_argv,
    machine,
    met,
    named_node_argv,
    preload,
    report_quiet,
    request,
    run_wrk,
    write_lua,
)

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

        port = free_port()
        with Server("alone", named_node_argv(workdir, "alone", port), port, workdir):
            preload(port, items)
            direct = run_wrk(f"http://127.0.0.1:{port}", lua, args.duration, connections=args.connections)
        print(f"node alone      GET {direct.rps:10.0f} req/s   p99 {direct.p99_ms:7.2f} ms")

        with ExitStack() as stack:
            registry_port = free_port()
            registry_url = f"http://127.0.0.1:{registry_port}"
            stack.enter_context(
                Server(
                    "registry",
                    kvd_argv(
                        workdir,
                        "registry",
                        "--role",
                        "registry",
                        "--listen",
                        f"tcp:{registry_port}:interface=127.0.0.1",
                    ),
                    registry_port,
                    workdir,
                )
            )
            for number in range(1, 4):
                node_port = free_port()
                argv = named_node_argv(workdir, f"node{number}", node_port, "--registry", registry_url)
                stack.enter_context(Server(f"node{number}", argv, node_port, workdir))
            gateways = {}
            for quorum in ("1", "2"):
                gateway_port = free_port()
                stack.enter_context(
                    Server(
                        f"gateway-r{quorum}",
                        kvd_argv(
                            workdir,
                            f"gateway-r{quorum}",
                            "--role",
                            "gateway",
                            "--registry",
                            registry_url,
                            "--read-quorum",
                            quorum,
                            "--listen",
                            f"tcp:{gateway_port}:interface=127.0.0.1",
                        ),
                        gateway_port,
                        workdir,
                    )
                )
                gateways[quorum] = gateway_port
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                status, body, _ = request(gateways["2"], "GET", "/cluster")
                if status == 200 and body.count(b'"id"') == 3:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("the gateway did not see 3 nodes within 30 s")
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
