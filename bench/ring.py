"""Benchmark kvd.ring: balance, movement on a join, build time, lookup speed.

Usage: python bench/ring.py [--keys N] [--timed-keys M]

Prints numbers only; nothing here asserts on a timing. Lookup speed is compared
with the uhashring package on the same node set when it is installed
(pip install uhashring).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from kvd.ring import DEFAULT_VNODES, Ring

try:
    from uhashring import HashRing
except ImportError:
    HashRing = None

NODES = [f"node-{i}" for i in range(1, 11)]
JOINER = "node-11"


def one_pass(lookup: Callable[[str], object], keys: Sequence[str]) -> float:
    started = time.perf_counter()
    for key in keys:
        lookup(key)
    return time.perf_counter() - started


def fitting(lookup: Callable[[str], object], keys: Sequence[str], budget: float) -> Sequence[str]:
    """The prefix of ``keys`` one pass of ``lookup`` gets through in about ``budget`` seconds."""
    probe = keys[:1000]
    each = one_pass(lookup, probe) / len(probe)
    return keys[: max(len(probe), int(budget / each))]


def rates(lookups: dict[str, tuple[Callable[[str], object], Sequence[str]]], rounds: int = 5) -> dict[str, float]:
    """Best lookups per second of each lookup over its keys.

    The lookups take turns round after round, so a change in the machine's
    load hits them all alike rather than skewing their ratios.
    """
    best = dict.fromkeys(lookups, float("inf"))
    for _ in range(rounds):
        for name, (lookup, keys) in lookups.items():
            best[name] = min(best[name], one_pass(lookup, keys))
    return {name: len(keys) / best[name] for name, (_, keys) in lookups.items()}


def timed(build: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    built = build()
    return built, time.perf_counter() - started


def row(label: str, value: str) -> None:
    print(f"{label:<44} {value}")


def ring_memory(members: dict[str, int]) -> int:
    """Bytes held by a freshly built ring of ``members``."""
    tracemalloc.start()
    try:
        ring = Ring(members)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del ring
    return held


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys for balance and movement")
    parser.add_argument("--timed-keys", type=int, default=200_000, help="keys per lookup-speed pass")
    args = parser.parse_args(argv)
    keys = [f"key-{i}" for i in range(args.keys)]
    timed_keys = [f"key-{i}" for i in range(args.timed_keys)]
    hundred = {f"node-{i}": 1 for i in range(1, 101)}

    row("python", f"{platform.python_version()} on {os.cpu_count()} cores")
    row("DEFAULT_VNODES", str(DEFAULT_VNODES))
    ring, build_10 = timed(lambda: Ring(dict.fromkeys(NODES, 1)))
    _, build_100 = timed(lambda: Ring(hundred))
    row("build, 10 nodes", f"{build_10 * 1000:.1f} ms")
    row("build, 100 nodes", f"{build_100 * 1000:.1f} ms")
    row("memory, 100 nodes", f"{ring_memory(hundred) / 2**20:.1f} MiB")

    owners = [ring.owner(key) for key in keys]
    counts = Counter(owners)
    mean = len(keys) / len(NODES)
    row(f"busiest/mean, 10 nodes, {len(keys):,} keys", f"{max(counts.values()) / mean:.4f}  (target <= 1.05)")
    row("quietest/mean", f"{min(counts.values()) / mean:.4f}")

    joined = Ring(dict.fromkeys([*NODES, JOINER], 1))
    moved = [(old, new) for old, new in zip(owners, map(joined.owner, keys), strict=True) if old != new]
    fraction = len(moved) / len(keys)
    row("moved when an 11th node joins", f"{fraction:.4f}  vs 1/11 = {1 / 11:.4f}")
    row("  moved / (1/11)", f"{fraction * 11:.3f}  (target <= 1.05)")
    row("  all moved keys went to the joiner", str(all(new == JOINER for _, new in moved)))

    fresh = Ring(dict.fromkeys(NODES, 1))
    cold = len(timed_keys) / one_pass(lambda key: fresh.preference_list(key, 3), timed_keys)
    lookups: dict[str, tuple[Callable[[str], object], Sequence[str]]] = {
        "kvd owner": (ring.owner, timed_keys),
        "kvd preference_list": (lambda key: ring.preference_list(key, 3), timed_keys),
    }
    if HashRing is None:
        others = []
    else:
        others = [DEFAULT_VNODES, 160]
    for vnodes in others:
        other, build = timed(lambda vnodes=vnodes: HashRing(nodes=NODES, vnodes=vnodes))
        row(f"uhashring build, 10 nodes, vnodes={vnodes}", f"{build * 1000:.1f} ms")
        get_node = other.get_node

        def first_three(key: str, other: Any = other) -> object:
            return list(other.range(key, 3))

        lookups[f"uhashring {vnodes} get_node"] = (get_node, fitting(get_node, timed_keys, 1.0))
        lookups[f"uhashring {vnodes} range"] = (first_three, fitting(first_three, timed_keys, 1.0))
    speed = rates(lookups)

    print(f"lookups/s, 10 nodes, best of 5 interleaved passes over up to {len(timed_keys):,} keys:")
    row("  kvd owner(k)", f"{speed['kvd owner']:12,.0f}")
    row("  kvd preference_list(k, 3)", f"{speed['kvd preference_list']:12,.0f}")
    row("  kvd preference_list(k, 3), first pass", f"{cold:12,.0f}  (fresh ring, tables empty)")
    if HashRing is None:
        print("uhashring is not installed (pip install uhashring): skipping the comparison")
        return
    for vnodes in others:
        owner, pref = speed[f"uhashring {vnodes} get_node"], speed[f"uhashring {vnodes} range"]
        print(f"  uhashring, vnodes={vnodes}:")
        row("    get_node(k)", f"{owner:12,.0f}  kvd owner is {speed['kvd owner'] / owner:.2f}x")
        row(
            "    list(range(k, 3))", f"{pref:12,.0f}  kvd preference_list is {speed['kvd preference_list'] / pref:.2f}x"
        )


if __name__ == "__main__":
    main()
