"""
Idle watchers: N long-poll watches (``GET /kv/{key}?wait=300&version=``, keys nobody writes)
held open on one gateway with three nodes behind it, from one client process of raw asyncio
sockets. Prints the gateway's resident memory per watcher and the CPU the gateway and the
nodes use while the watchers sit idle (target, issue 10: < 0.5% of a core), then wakes a
few watchers with writes and times how long each took to answer.

The open-file limit is raised to its hard limit here; the processes started inherit it.

    python bench/watch.py [--watchers 10000] [--idle 10]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from checkout import ensure_kvd_importable
from report import machine, report_quiet
from servers import cpu_seconds

TARGET_CPU = 0.5  # percent of one core


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def open_watch(port: int, key: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /kv/{key}?wait=300&version= HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def bench(gateway_port: int, node_pids: list[int], gateway_pid: int, watchers: int, idle: float) -> None:
    from kvd.testing.processes import request

    before = rss_bytes(gateway_pid)
    started = time.perf_counter()
    connections = []
    for start in range(0, watchers, 500):
        batch = [open_watch(gateway_port, f"idle{i}") for i in range(start, min(start + 500, watchers))]
        connections += await asyncio.gather(*batch)
    opened = time.perf_counter() - started
    await asyncio.sleep(3)  # let every watch reach its wait
    after = rss_bytes(gateway_pid)
    print(f"{watchers} watches opened in {opened:.1f}s")
    print(
        f"gateway RSS: {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB with the watchers: "
        f"{(after - before) / watchers / 1024:.1f} KiB per watcher"
    )
    pids = {"gateway": gateway_pid, **{f"node{i + 1}": pid for i, pid in enumerate(node_pids)}}
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(idle)
    for name, pid in pids.items():
        share = (cpu_seconds(pid) - cpu_before[name]) / idle * 100
        met = "met" if share < TARGET_CPU else "NOT met"
        verdict = f" (target < {TARGET_CPU}%: {met})" if name == "gateway" else ""
        print(f"{name} CPU while {watchers} watchers idle for {idle:g}s: {share:.2f}% of a core{verdict}")
    # Wake a few and time it.
    delays = []
    for i in range(0, min(watchers, 10)):
        reader, _ = connections[i]
        t0 = time.perf_counter()
        await asyncio.to_thread(request, gateway_port, "PUT", f"/kv/idle{i}", b"woken")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        delays.append(time.perf_counter() - t0)
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
    delays.sort()
    print(
        f"write -> watcher answered (incl. the PUT): median {delays[len(delays) // 2] * 1000:.1f} ms, "
        f"max {delays[-1] * 1000:.1f} ms"
    )
    for _, writer in connections:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--watchers", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds the watchers sit idle while CPU is measured")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.watchers + 200:
        raise SystemExit(f"the open-file limit is {hard}: too low for {args.watchers} watchers")
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    from kvd.testing.processes import Processes

    with tempfile.TemporaryDirectory(prefix="kvd-bench-watch-") as tmp, Processes(Path(tmp)) as processes:
        cluster = processes.cluster()
        asyncio.run(
            bench(
                cluster.gateway.port,
                [node.pid for node in cluster.nodes],
                cluster.gateway.pid,
                args.watchers,
                args.idle,
            )
        )


if __name__ == "__main__":
    main()
