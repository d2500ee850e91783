"""Benchmark a kvd node's HTTP GET and PUT against a bare twisted.web server of the same answers.

Usage: python bench/node_http.py [--duration S] [--keys N] [--rounds R] [--no-pin]

For each server in turn (never both at once): start it on a free loopback port, PUT --keys
keys of ~100-byte values, run wrk (-t2 -c32) with a Lua script cycling GETs over those
keys, then one cycling PUTs of a 100-byte body over them. The node runs with its default
flags (no access log, --fsync always: every PUT is fsynced, with group commit); the
baseline is bench/bare_server.py (a plain isLeaf Resource over a dict, access log off,
no fsync). Prints req/s and p99 latency for each, and node/bare ratios.
Target: node GET >= 0.45 x bare GET. PUT has no target (the bare server does not fsync).

By default the server is pinned to core 0 and wrk to core 1 with taskset, so the two
compete for no CPU; --no-pin lets the scheduler place them. Prints numbers only.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from checkout import code_version, ensure_kvd_importable
from cores import add_pin_arguments, pin_cores
from profiling import PySpy, add_profile_argument, summarize_profile
from report import machine, median, met, report_quiet
from servers import Server, free_port, http_request, node_argv, preload, twistd_command
from wrk import GET_LUA, PUT_LUA, WrkResult, add_wrk_arguments, run_wrk, write_lua

GET_TARGET = 0.45
_RUN = itertools.count(1)
VALUE_BYTES = 100
PREFIX = "bench-key-"


def measure(
    name: str,
    argv_for_port: object,
    workdir: Path,
    items: list[tuple[str, str]],
    get_lua: Path,
    put_lua: Path,
    args: argparse.Namespace,
    cores: tuple[int | None, int | None],
    samples: dict[str, tuple[int, str | None, bytes]],
) -> dict[str, WrkResult]:
    server_cpu, wrk_cpu = cores
    port = free_port()
    argv = argv_for_port(port)  # type: ignore[operator]
    with Server(name, argv, port, workdir, cpu=server_cpu) as server:
        preload(port, items)
        key, value = items[0]
        answer = http_request(port, "GET", f"/kv/{key}")
        status, body, headers = answer.status, answer.body, answer.headers
        print(f"  {name}: GET /kv/{key} -> {status} {headers.get('content-type')} {len(body)} bytes")
        samples[name] = (status, headers.get("content-type"), body)
        url = f"http://127.0.0.1:{port}"
        results = {}
        for method, script in (("GET", get_lua), ("PUT", put_lua)):
            if args.warmup:
                run_wrk(url, script, args.warmup, args.threads, args.connections, wrk_cpu)
            profile = Path(args.profile) / f"{name}-{method}-{next(_RUN)}.txt" if args.profile else None
            with PySpy(server.pid, profile, args.duration) if profile else contextlib.nullcontext():
                result = run_wrk(url, script, args.duration, args.threads, args.connections, wrk_cpu)
            print(
                f"  {name} {method}: {result.rps:10.0f} req/s  p50 {result.latency.get('50', float('nan')):6.2f} ms"
                f"  p99 {result.p99_ms:6.2f} ms  ({result.requests} requests)"
            )
            results[method] = result
            if profile:
                print("\n".join("    " + line for line in summarize_profile(profile)))
        return results


def compare_answers(bare: tuple[int, str | None, bytes], node: tuple[int, str | None, bytes]) -> str:
    """Whether the two servers gave the same answer, and if not, how the node's differs."""
    if bare == node:
        return "same status, content-type and body bytes"
    if bare[:2] != node[:2]:
        return f"DIFFERENT: bare {bare[:2]}, node {node[:2]}"
    bare_body, node_body = json.loads(bare[2]), json.loads(node[2])
    if any(node_body.get(k) != v for k, v in bare_body.items()):
        return f"DIFFERENT bodies: bare {bare[2]!r}, node {node[2]!r}"
    extra = sorted(set(node_body) - set(bare_body))
    return (
        f"same status, content-type and fields, but the node's answer carries more: {', '.join(extra)} "
        f"({len(node[2])} bytes against {len(bare[2])}; the contract allows more fields)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_wrk_arguments(parser, rounds_of="bare-then-node")
    add_pin_arguments(parser)
    add_profile_argument(parser)
    args = parser.parse_args(argv)

    kvd_at = ensure_kvd_importable()
    cores = pin_cores(args)
    print(f"machine: {machine()}")
    report_quiet()
    print(f"kvd from {kvd_at} ({code_version(kvd_at)}); twistd: {' '.join(twistd_command())}")
    if cores[0] is None:
        print("pinning: none (server and wrk share both cores)")
    else:
        print(f"pinning: server on core {cores[0]}, wrk on core {cores[1]} (taskset)")
    print(
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s (+{args.warmup:g}s warm-up), "
        f"{args.keys} keys, {VALUE_BYTES}-byte values"
    )

    items = [(f"{PREFIX}{i}", f"{i:08d}" + "x" * (VALUE_BYTES - 8)) for i in range(args.keys)]
    runs: dict[str, list[dict[str, WrkResult]]] = {"bare": [], "node": []}
    samples: dict[str, tuple[int, str | None, bytes]] = {}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvd-bench-") as tmp:
        work = Path(tmp)
        get_lua = write_lua(work, "get.lua", GET_LUA, n=args.keys, prefix=PREFIX)
        put_lua = write_lua(work, "put.lua", PUT_LUA, n=args.keys, prefix=PREFIX, size=VALUE_BYTES)
        bare_script = str(Path(__file__).resolve().parent / "bare_server.py")
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}")
            runs["bare"].append(
                measure(
                    "bare",
                    lambda port: [sys.executable, bare_script, "--port", str(port)],
                    work,
                    items,
                    get_lua,
                    put_lua,
                    args,
                    cores,
                    samples,
                )
            )
            data_dir, log = work / f"node-data-{round_}", work / f"node-{round_}.log"
            runs["node"].append(
                measure(
                    "node",
                    lambda port, data_dir=data_dir, log=log: node_argv(port, data_dir, log),
                    work,
                    items,
                    get_lua,
                    put_lua,
                    args,
                    cores,
                    samples,
                )
            )

    def figure(server: str, method: str) -> tuple[float, float]:
        results = [r[method] for r in runs[server]]
        return median([r.rps for r in results]), median([r.p99_ms for r in results])

    def paired(method: str) -> list[float]:
        return [n[method].rps / b[method].rps for b, n in zip(runs["bare"], runs["node"], strict=True)]

    print("a GET from each: " + compare_answers(samples["bare"], samples["node"]))
    print()
    print(f"summary ({'median of ' + str(args.rounds) + ' rounds' if args.rounds > 1 else '1 round'}):")
    print(f"  {'':4} {'bare req/s':>11} {'node req/s':>11} {'ratio':>6}  {'bare p99':>9} {'node p99':>9}  target")
    for method in ("GET", "PUT"):
        bare_rps, bare_p99 = figure("bare", method)
        node_rps, node_p99 = figure("node", method)
        ratios = paired(method)
        ratio = median(ratios)
        if method == "GET":
            target = f">= {GET_TARGET:.2f} x bare: {met(ratio, GET_TARGET)}"
        else:
            target = "none (node fsyncs every PUT, bare keeps a dict)"
        figures = f"{bare_rps:11.0f} {node_rps:11.0f} {ratio:6.2f}  {bare_p99:7.2f}ms {node_p99:7.2f}ms"
        print(f"  {method:4} {figures}  {target}")
        if len(ratios) > 1:
            print(
                f"       (node/bare in each round: {', '.join(f'{r:.2f}' for r in ratios)}; the ratio is their median)"
            )


if __name__ == "__main__":
    main()
