"""
What the gateway's hot-key counting (GET /cluster/hot) costs.

Two measurements, in the same run:

1. ``HotKeys.record`` alone, in ns per call, on three workloads: one key over and over, a
   skewed one (Zipf-like, 100k keys), and the worst case for the summary: every request a new
   key (each fills a counter, and every 513th pass lowers all 512).
2. GET through four gateways in front of the same registry and three nodes, two counting (the
   default) and two started with ``--no-hot-keys``, in the start order counting, not, not,
   counting (an A/A run found the first-started of two identical gateways dearer), measured
   with wrk in alternating rounds (the order reversed every round) so that drift on a shared
   machine falls on both: req/s,
   and the gateway's own CPU per request (user + system time from /proc over the requests
   wrk counted), the steadier figure on a busy machine, since another process taking the
   core lowers req/s but not the CPU each request costs. Both gateways are warmed up alike
   first (the keys are loaded through a third gateway).

With ``--same`` both gateways run ``--no-hot-keys`` (an A/A run): the gap it prints is the
one between two identical gateways, the floor under which a cost cannot be told apart.

Target (issue 11): counting costs under 3% of gateway throughput. Every process is stopped at
the end; nothing here fails on a timing.

    python bench/hot_keys.py [--duration 5] [--rounds 3] [--keys 1000] [--same]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from checkout import ensure_kvd_importable
from report import machine, median, met, report_quiet
from servers import bench_processes, cpu_seconds, preload, wait_for_members
from wrk import GET_LUA, run_wrk, write_lua

ensure_kvd_importable()

from kvd.gateway.hot import HotKeys  # noqa: E402

TARGET = 0.03
CALLS = 300_000


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


def record_cost(keys: list[str]) -> float:
    """ns per record() over C{keys}."""
    clock = _Clock()
    hot = HotKeys(clock)
    record = hot.record
    started = time.perf_counter()
    for key in keys:
        record(key)
    return (time.perf_counter() - started) / len(keys) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per round and gateway")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys read")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--same",
        action="store_true",
        help="an A/A check: start the counting gateway with --no-hot-keys too, to see the two gateways' own gap",
    )
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()

    rng = random.Random(1)
    workloads = {
        "one key": ["hot"] * CALLS,
        "zipf-like, 100k keys": [f"k{int(100_000 ** rng.random())}" for _ in range(CALLS)],
        "every key new": [f"k{i}" for i in range(CALLS)],
    }
    costs = {}
    for name, keys in workloads.items():
        costs[name] = min(record_cost(keys) for _ in range(3))
        print(f"record(), {name:22s} {costs[name]:7.0f} ns/call")

    items = [(f"key{i}", "v" * 100) for i in range(args.keys)]
    with tempfile.TemporaryDirectory(prefix="kvd-bench-hot-") as tmp:
        workdir = Path(tmp)
        lua = write_lua(workdir, "get.lua", GET_LUA, n=args.keys, prefix="key")
        with bench_processes(workdir) as processes:
            registry_url = processes.registry().start().url
            for number in range(1, 4):
                processes.node(f"node{number}", None, "--registry", registry_url).start()
            same = ("--no-hot-keys",) if args.same else ()
            # Four gateways started in the order on, off, off, on: an A/A run showed the
            # first-started of two identical gateways ~6 % dearer per request, so each side gets
            # one early and one late gateway, and a bias by start order falls on both alike.
            layout = [("on", same), ("off", ("--no-hot-keys",)), ("off", ("--no-hot-keys",)), ("on", same)]
            gateways = [
                (label, processes.gateway("--registry", registry_url, *flags, name=f"gateway-{n}-{label}").start())
                for n, (label, flags) in enumerate(layout)
            ]
            loader = processes.gateway("--registry", registry_url, "--no-hot-keys", name="gateway-load").start()
            for _, gateway in [*gateways, ("load", loader)]:
                wait_for_members(gateway, 3, 30)
            assert loader.port is not None
            preload(loader.port, items)
            loader.stop()
            for _, gateway in gateways:
                run_wrk(gateway.url, lua, 1, connections=args.connections)
            rates: dict[str, list[float]] = {"on": [], "off": []}
            cpu: dict[str, list[float]] = {"on": [], "off": []}
            for number in range(args.rounds):
                for label, gateway in gateways if number % 2 == 0 else gateways[::-1]:
                    before = cpu_seconds(gateway.pid)
                    result = run_wrk(gateway.url, lua, args.duration, connections=args.connections)
                    used = cpu_seconds(gateway.pid) - before
                    rates[label].append(result.rps)
                    cpu[label].append(used / max(result.requests, 1) * 1e6)
    on_rps, off_rps = median(rates["on"]), median(rates["off"])
    cost = 1 - on_rps / off_rps
    on_cpu, off_cpu = median(cpu["on"]), median(cpu["off"])
    cpu_cost = on_cpu / off_cpu - 1
    print(f"gateway GET, counting on   {on_rps:9.0f} req/s   rounds {[round(r) for r in rates['on']]}")
    print(f"gateway GET, --no-hot-keys {off_rps:9.0f} req/s   rounds {[round(r) for r in rates['off']]}")
    print(f"throughput cost {cost:+.1%}   target < {TARGET:.0%}   {met(cost, TARGET, at_least=False)}")
    print(f"gateway CPU per GET, counting on   {on_cpu:6.1f} us   rounds {[round(c, 1) for c in cpu['on']]}")
    print(f"gateway CPU per GET, --no-hot-keys {off_cpu:6.1f} us   rounds {[round(c, 1) for c in cpu['off']]}")
    print(f"CPU cost {cpu_cost:+.1%}   target < {TARGET:.0%}   {met(cpu_cost, TARGET, at_least=False)}")
    worst = max(costs.values())
    print(
        f"record() at {on_rps:.0f} req/s, worst workload: {worst * on_rps / 1e9:.2%} of one core "
        "(the gateway is one process on one core)"
    )


if __name__ == "__main__":
    main()
