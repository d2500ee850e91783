"""
Conditional writes: PUT with If-Match through a gateway (Paxos over the key's three owners:
prepare, accept, commit) against plain PUT (one replicated write) through the same gateway,
in the same run, at 32 connections, with CPU per request of all the cluster's processes.

Target (issue 10): conditional / plain >= 0.4 (Cassandra's LWT is about 0.25). Each
conditional PUT names ``If-Match: *`` on a preloaded key and the keys cycle, so the figure is
the cost of a round with no contention (contended rounds back off and retry).

    python bench/cas.py [--duration 10] [--keys 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from checkout import ensure_kvd_importable
from report import machine, met, report_quiet
from servers import bench_processes, preload, wait_for_members
from wrk import PUT_LUA, run_wrk, write_lua

TARGET = 0.4

CAS_LUA = PUT_LUA.replace(
    'return wrk.format("PUT", "/kv/{prefix}" .. i, nil, body)',
    'return wrk.format("PUT", "/kv/{prefix}" .. i, {{["If-Match"] = "*"}}, body)',
)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per measurement")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys written")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    items = [(f"key{i}", "v" * 100) for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="kvd-bench-cas-") as tmp:
        workdir = Path(tmp)
        plain_lua = write_lua(workdir, "put.lua", PUT_LUA, n=args.keys, prefix="key", size=100)
        cas_lua = write_lua(workdir, "cas.lua", CAS_LUA, n=args.keys, prefix="key", size=100)
        with bench_processes(workdir) as processes:
            registry = processes.registry().start()
            started = [registry]
            for number in range(1, 4):
                started.append(processes.node(f"node{number}", None, "--registry", registry.url).start())
            gateway = processes.gateway("--registry", registry.url).start()
            started.append(gateway)
            wait_for_members(gateway, 3, 30)
            assert gateway.port is not None
            preload(gateway.port, items)
            pids = [p.pid for p in started]
            results = {}
            for name, lua in (("plain PUT", plain_lua), ("If-Match PUT", cas_lua)):
                before = cpu_seconds(pids)
                result = run_wrk(gateway.url, lua, args.duration, connections=args.connections)
                cpu = cpu_seconds(pids) - before
                results[name] = result
                print(
                    f"{name:13} {result.rps:9.0f} req/s   p99 {result.p99_ms:7.2f} ms   "
                    f"CPU {1e6 * cpu / max(1, result.requests):7.0f} us/request (all processes)"
                )
    ratio = results["If-Match PUT"].rps / results["plain PUT"].rps
    print(f"conditional / plain {ratio:.2f}   target >= {TARGET}   {met(ratio, TARGET)}")


if __name__ == "__main__":
    main()
