"""
A gateway on one core or more: GET and PUT req/s and CPU per request through a gateway run with
--workers 1 and with --workers W (default 2), the same registry and three nodes behind both, in
the same run, printed as ratios (W workers / 1).

CPU per request is utime + stime of every gateway process (the main one and its workers, from
/proc) over the wrk run, divided by the requests wrk counted. The nodes, the registry and wrk
share the machine's cores with the gateway: on a 2-core machine a second worker has little room,
so the ratio says what the mechanism costs and gains here, not on a machine with cores to spare.
Rounds alternate the two gateways (1, W, 1, W, ...) so drift in the machine's load hits both.

    python bench/workers.py [--duration 10] [--rounds 2] [--workers 2] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from checkout import ensure_kvd_importable
from report import cpu_busy, machine, median, report_quiet
from servers import STARTUP_SECONDS, Kvd, bench_processes, cpu_seconds, http_request, preload, wait_for_members
from wrk import GET_LUA, PUT_LUA, WrkResult, run_wrk, write_lua


def workers_of(pid: int) -> list[int]:
    """The live worker processes of gateway C{pid} (its children running kvd.workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == pid and b"kvd.workers" in cmdline:
            found.append(int(entry))
    return found


def gateway_pids(gateway: Kvd) -> list[int]:
    return [gateway.pid, *workers_of(gateway.pid)]


def wait_for_workers(gateway: Kvd, count: int) -> None:
    """Until C{count} distinct processes have answered /metrics on the gateway's port."""
    assert gateway.port is not None
    if count == 1:
        return  # a single process does not name itself in /metrics
    deadline = time.monotonic() + STARTUP_SECONDS
    seen: set[str] = set()
    while time.monotonic() < deadline and len(seen) < count:
        body = http_request(gateway.port, "GET", "/metrics").body.decode()
        seen |= {line for line in body.splitlines() if line.startswith("kvd_gateway_pid ")}
        if len(seen) < count:
            time.sleep(0.02)
    if len(seen) < count:
        raise RuntimeError(f"{gateway.name}: only {len(seen)} of {count} processes answering")


def internal_requests(node: Kvd) -> float:
    """The /internal/ requests (replication batches, reads, digests) C{node} has answered."""
    assert node.port is not None
    body = http_request(node.port, "GET", "/metrics").body.decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in body.splitlines()
        if line.startswith("kvd_http_requests_total{") and 'route="/internal/*"' in line
    )


def measure(gateway: Kvd, node: Kvd, lua: Path, args: argparse.Namespace) -> tuple[WrkResult, float, float]:
    """
    One wrk run: its result, the gateway's CPU microseconds per request (all its processes), and
    the requests C{node} answered for the gateway per client request (fewer: larger batches).
    """
    pids = gateway_pids(gateway)
    before = {pid: cpu_seconds(pid) for pid in pids}
    internal = internal_requests(node)
    result = run_wrk(gateway.url, lua, args.duration, threads=args.threads, connections=args.connections)
    used = sum(cpu_seconds(pid) - before[pid] for pid in pids)
    internal = internal_requests(node) - internal
    if sorted(gateway_pids(gateway)) != sorted(pids):
        print(f"    warning: {gateway.name}'s processes changed during the run")
    if not result.requests:
        return result, float("nan"), float("nan")
    return result, used / result.requests * 1e6, internal / result.requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (1 worker, W workers); medians printed")
    parser.add_argument("--workers", type=int, default=2, help="W: the workers of the second gateway")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    items = [(f"key{i}", "v" * args.value_size) for i in range(args.keys)]
    counts = (1, args.workers)
    figures: dict[tuple[int, str], list[tuple[float, float, float]]] = {}

    with tempfile.TemporaryDirectory(prefix="kvd-bench-workers-") as tmp:
        workdir = Path(tmp)
        get_lua = write_lua(workdir, "get.lua", GET_LUA, n=args.keys, prefix="key")
        put_lua = write_lua(workdir, "put.lua", PUT_LUA, n=args.keys, prefix="key", size=args.value_size)
        with bench_processes(workdir) as processes:
            registry = processes.registry().start()
            nodes = [processes.node(node_id, None, "--registry", registry.url).start() for node_id in ("a", "b", "c")]
            gateways = {
                count: processes.gateway(
                    "--registry", registry.url, "--workers", str(count), name=f"gateway-{count}w"
                ).start()
                for count in counts
            }
            for count, gateway in gateways.items():
                wait_for_members(gateway, 3, STARTUP_SECONDS)
                wait_for_workers(gateway, count)
            port = gateways[1].port
            assert port is not None
            preload(port, items)
            for round_number in range(1, args.rounds + 1):
                busy = cpu_busy(0.5)
                print(f"round {round_number}" + (f" (machine {busy:.0f}% busy before it)" if busy is not None else ""))
                for count in counts:
                    for method, lua in (("PUT", put_lua), ("GET", get_lua)):
                        result, cpu_us, internal = measure(gateways[count], nodes[0], lua, args)
                        figures.setdefault((count, method), []).append((result.rps, cpu_us, result.p99_ms))
                        print(
                            f"  --workers {count}  {method}  {result.rps:8.0f} req/s   p99 {result.p99_ms:7.2f} ms"
                            f"   gateway CPU {cpu_us:6.0f} us/request   node a: {internal:.2f} requests per request"
                        )

    print(f"\nmedians of {args.rounds} rounds, wrk -t{args.threads} -c{args.connections}, {args.duration:.0f} s each")
    for method in ("PUT", "GET"):
        one = [median([f[i] for f in figures[(1, method)]]) for i in range(3)]
        many = [median([f[i] for f in figures[(args.workers, method)]]) for i in range(3)]
        print(
            f"{method}: --workers 1 {one[0]:7.0f} req/s {one[1]:5.0f} us/req p99 {one[2]:6.2f} ms | "
            f"--workers {args.workers} {many[0]:7.0f} req/s {many[1]:5.0f} us/req p99 {many[2]:6.2f} ms | "
            f"ratio req/s {many[0] / one[0]:.2f}, CPU/request {many[1] / one[1]:.2f}"
        )


if __name__ == "__main__":
    main()
