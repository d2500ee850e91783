"""
A node's store taking replicated writes, in process: L{Store.apply_batch} of batches as a
loaded gateway sends them (--batch items, rising versions, over --keys keys), with what a node
keeps beside its dict (range digests and key sets from C{index_ranges}, the write order index
L{kvd.changes.ChangeIndex}), and a journal write that costs nothing (the fsync is not what this
measures). CPU microseconds per item, the best of a few rounds; --calls also counts the
Python function calls per item, a figure the machine's load does not move; and the garbage
collector's passes during the rounds, by generation, with the longest (a pause of the
node's event loop, were it serving). Prints figures only.

    python bench/node_apply.py [--keys 1000] [--batch 14] [--batches 5000] [--rounds 5] [--calls]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from typing import Any

from checkout import code_version, ensure_kvd_importable
from twisted.internet.defer import Deferred, succeed


def free_write(f: Any) -> Deferred[Any]:
    return succeed(0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=14, help="items per batch (a loaded node saw 14 a commit)")
    parser.add_argument("--batches", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", action="store_true", help="count Python calls per item (slow)")
    parser.add_argument(
        "--freeze", action="store_true", help="gc.freeze() once the store is built, as a node could after start-up"
    )
    args = parser.parse_args()
    kvd_dir = ensure_kvd_importable()
    from kvd.changes import ChangeIndex
    from kvd.store import Store
    from kvd.versions import HybridClock, encode

    print(f"kvd from {kvd_dir} ({code_version(kvd_dir)}); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="kvd-bench-apply-") as tmp:
        store = Store.open(tmp, clock=HybridClock(lambda: 1_700_000_000.0, "n"), fsync=False, write=free_write)
        store.index_ranges()
        ChangeIndex.follow(store)
        value = "v" * 100
        counter = [0]

        def batches(n: int) -> list[list[list[Any]]]:
            out = []
            for _ in range(n):
                items = []
                for _ in range(args.batch):
                    counter[0] += 1
                    i = counter[0]
                    items.append([f"key{i % args.keys}", value, encode(1_700_000_000_000 + i, 0, "gw")])
                out.append(items)
            return out

        for items in batches(args.keys // args.batch + 1):  # every key held once
            store.apply_batch(items)
        if args.freeze:
            gc.collect()
            gc.freeze()
        passes = [0, 0, 0]
        longest = [0.0, 0.0, 0.0]
        began = [0.0]

        def collected(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                generation = info["generation"]
                passes[generation] += 1
                longest[generation] = max(longest[generation], time.perf_counter() - began[0])

        gc.callbacks.append(collected)
        best = float("inf")
        for _ in range(args.rounds):
            work = batches(args.batches)
            started = time.process_time()
            for items in work:
                store.apply_batch(items)
            best = min(best, time.process_time() - started)
        gc.callbacks.remove(collected)
        per_item = best / (args.batches * args.batch) * 1e6
        print(
            f"apply_batch of {args.batch} items over {args.keys} keys: "
            f"{per_item:.2f} us CPU per item (best of {args.rounds})"
        )
        items = args.rounds * args.batches * args.batch
        print(
            f"  garbage collections over {items:,} items: "
            + ", ".join(f"generation {g} {passes[g]} (longest {longest[g] * 1000:.2f} ms)" for g in range(3))
        )
        del work
        gc.collect()
        started = time.perf_counter()
        gc.collect()
        print(
            f"  a full collection, the store's structures alone: {(time.perf_counter() - started) * 1000:.2f} ms"
            f" ({len(gc.get_objects()):,} objects tracked)"
        )
        if args.calls:
            calls = [0]

            def count(frame: Any, event: str, arg: Any) -> None:
                if event in ("call", "c_call"):
                    calls[0] += 1

            work = batches(200)
            sys.setprofile(count)
            for items in work:
                store.apply_batch(items)
            sys.setprofile(None)
            print(f"  {calls[0] / (200 * args.batch):.1f} Python calls per item")
        store.abandon()


if __name__ == "__main__":
    main()
