"""Benchmark what durability costs a kvd node: PUT req/s with --fsync always vs --fsync never.

Usage: python bench/fsync.py [--duration S] [--keys N] [--rounds R] [--no-pin]

For each mode in turn (never both at once): start a node on a free loopback port with a
fresh data dir, PUT --keys keys, then run wrk (-t2 -c32) with a Lua script cycling PUTs of a
100-byte body over those keys. With --fsync always every answer waits for its journal
record's fsync, and writes that arrive during an fsync share the next one (group commit);
with --fsync never the journal is written but never fsynced.
Target: always >= 0.7 x never.

Also prints the disk's own latency for one small append + fsync in the same temp dir, for
scale. By default the node is pinned to core 0 and wrk to core 1 (taskset); --no-pin lets
the scheduler place them. Prints numbers only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from checkout import code_version, ensure_kvd_importable
from cores import add_pin_arguments, pin_cores
from profiling import PySpy, add_profile_argument, summarize_profile
from report import machine, median, met, report_quiet
from servers import Server, free_port, node_argv, preload, twistd_command
from wrk import PUT_LUA, WrkResult, add_wrk_arguments, run_wrk, write_lua

TARGET = 0.7
VALUE_BYTES = 100
PREFIX = "bench-key-"


def fsync_latency_ms(directory: Path, count: int = 200, limit_seconds: float = 10.0) -> float:
    """Median milliseconds of one 140-byte append + fsync to a file in C{directory}."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    samples = []
    started = time.monotonic()
    try:
        for _ in range(count):
            if time.monotonic() - started > limit_seconds:
                break
            t = time.perf_counter()
            os.write(fd, b"x" * 139 + b"\n")
            os.fsync(fd)
            samples.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        os.remove(path)
    return median(samples)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_wrk_arguments(parser, rounds_of="always-then-never")
    parser.add_argument("--dir", default=None, help="make the data dirs under DIR (default: the system temp dir)")
    add_pin_arguments(parser)
    add_profile_argument(parser)
    args = parser.parse_args(argv)

    kvd_at = ensure_kvd_importable()
    server_cpu, wrk_cpu = pin_cores(args)
    print(f"machine: {machine()}")
    report_quiet()
    print(f"kvd from {kvd_at} ({code_version(kvd_at)}); twistd: {' '.join(twistd_command())}")
    if server_cpu is None:
        print("pinning: none (node and wrk share both cores)")
    else:
        print(f"pinning: node on core {server_cpu}, wrk on core {wrk_cpu} (taskset)")
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s (+{args.warmup:g}s warm-up) PUTs, "
        f"{args.keys} keys, {VALUE_BYTES}-byte values"
    )

    items = [(f"{PREFIX}{i}", "p" * VALUE_BYTES) for i in range(args.keys)]
    results: dict[str, list[WrkResult]] = {"always": [], "never": []}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvd-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        print(f"disk: one 140-byte append + fsync in {work}: median {fsync_latency_ms(work):.2f} ms")
        put_lua = write_lua(work, "put.lua", PUT_LUA, n=args.keys, prefix=PREFIX, size=VALUE_BYTES)
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}")
            for mode in ("always", "never"):
                port = free_port()
                name = f"node-fsync-{mode}-{round_}"
                argv = node_argv(port, work / f"{name}-data", work / f"{name}.log", "--fsync", mode)
                with Server(name, argv, port, work, cpu=server_cpu) as server:
                    preload(port, items)
                    url = f"http://127.0.0.1:{port}"
                    if args.warmup:
                        run_wrk(url, put_lua, args.warmup, args.threads, args.connections, wrk_cpu)
                    profile = Path(args.profile) / f"fsync-{mode}-{round_}.txt" if args.profile else None
                    with PySpy(server.pid, profile, args.duration) if profile else contextlib.nullcontext():
                        result = run_wrk(url, put_lua, args.duration, args.threads, args.connections, wrk_cpu)
                    journal = sum(p.stat().st_size for p in (work / f"{name}-data").glob("journal-*.jsonl"))
                print(
                    f"  --fsync {mode:6}: {result.rps:8.0f} PUT/s  p50 {result.latency.get('50', float('nan')):6.2f} ms"
                    f"  p99 {result.p99_ms:6.2f} ms  ({result.requests} requests, journal {journal / 1e6:.1f} MB)"
                )
                results[mode].append(result)
                if profile:
                    print("\n".join("    " + line for line in summarize_profile(profile)))

    always = median([r.rps for r in results["always"]])
    never = median([r.rps for r in results["never"]])
    ratios = [a.rps / n.rps for a, n in zip(results["always"], results["never"], strict=True)]
    ratio = median(ratios)
    print()
    print(f"summary ({'median of ' + str(args.rounds) + ' rounds' if args.rounds > 1 else '1 round'}):")
    p99 = {mode: median([r.p99_ms for r in results[mode]]) for mode in results}
    print(f"  PUT/s --fsync always (group commit): {always:8.0f}   p99 {p99['always']:.2f} ms")
    print(f"  PUT/s --fsync never  (unsafe)      : {never:8.0f}   p99 {p99['never']:.2f} ms")
    spread = f"  (rounds: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
    print(f"  ratio always / never, same round   : {ratio:8.2f}   target >= {TARGET}: {met(ratio, TARGET)}{spread}")


if __name__ == "__main__":
    main()
