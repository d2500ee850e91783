"""Benchmark kvd.store alone (no HTTP): put rate vs store size, restart time, memory per key.

Usage: python bench/store.py [--keys N] [--puts P] [--only abc] [--repeats R] [--dir DIR]

a. puts/s, fsync on, into a store already holding --keys keys vs one holding --small-keys
   keys: --puts fresh random keys with 100-byte values, issued in batches of --batch
   concurrent puts, each batch awaited before the next (so group commit applies), with the
   reactor running and journal writes on a real thread pool (deferToThreadPool, as the node
   does). Both stores are built through Store.put (so every key has whatever the store
   keeps with it, e.g. a version) and Store.compact, as in (b).
   Target: big >= 0.8 x small. Also prints, for the big store, one compaction (snapshot of
   all keys) timed after the puts, the longest reactor stall during it (how late a 1 ms
   LoopingCall's ticks came, beyond their period), and its cost spread
   over the puts that trigger it, since those puts pay it too.
b. restart: Store.open of a data dir holding --keys keys of 100-byte values vs json.load of
   one plain JSON object holding the same final keys and values. The dir is made through
   the store: every key written by Store.put, a snapshot written by Store.compact, then a
   journal of 5% overwrites, 0.5% deletes and 0.5% new keys.
   Target: Store.open <= 2 x json.load.
c. memory per key: RSS growth (/proc/self/statm) in a fresh process across Store.open of the
   dir of (b), vs in another fresh process across json.load of the plain JSON file of (b),
   which builds a plain dict of exactly the same key/value strings.
   Target: store <= 2 x dict.

Every measurement runs in a fresh subprocess of this script; cases alternate and medians
over --repeats are reported. Files are read once before (b) so both sides find them in the
page cache. Prints numbers only.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from checkout import code_version, ensure_kvd_importable
from report import machine, median, met, report_quiet
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

PUT_TARGET = 0.8
RESTART_TARGET = 2.0
MEMORY_TARGET = 2.0
VALUE_BYTES = 100
WORKER_SECONDS = 1200
#: Puts made before the timed ones in (a), to warm the thread pool and code paths.
WARMUP_PUTS = 1000
#: Period of the lag probe during the compaction in (a).
PROBE_SECONDS = 0.001


# Data


def random_items(n: int, seed: int, prefix: str = "") -> list[tuple[str, str]]:
    """C{n} distinct random keys (16 hex digits after C{prefix}) with 100-character values."""
    rng = random.Random(seed)
    seen: set[str] = set()
    items: list[tuple[str, str]] = []
    while len(items) < n:
        key = prefix + rng.randbytes(8).hex()
        if key in seen:
            continue
        seen.add(key)
        items.append((key, base64.b64encode(rng.randbytes(VALUE_BYTES * 3 // 4)).decode()))
    return items


class Batched:
    """
    A store Runner that holds the store's blocking work until L{drain}: thousands of puts
    then share one journal write, so building a million-key dir takes seconds, with no
    reactor. Used only to build data dirs, never in a timed part.
    """

    def __init__(self) -> None:
        self.pending: deque[tuple[Callable[[], Any], Deferred[Any]]] = deque()

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((f, d))
        return d

    def drain(self) -> None:
        while self.pending:
            f, d = self.pending.popleft()
            try:
                result = f()
            except Exception:
                d.errback()
            else:
                d.callback(result)


def fill(directory: Path, items: list[tuple[str, str]], run: Batched) -> Any:
    """A store in C{directory} holding C{items}, each written by Store.put (so each has a version)."""
    from kvd.store import Store
    from kvd.versions import HybridClock

    store = Store.open(str(directory), clock=HybridClock(time.time, "bench"), run=run, fsync=False)
    for start in range(0, len(items), 10_000):
        for key, value in items[start : start + 10_000]:
            store.put(key, value)
        run.drain()
    return store


def settle(store: Any, run: Batched, d: Any) -> None:
    """Run the store's pending work until C{d} has fired; fail loudly if the store failed."""
    run.drain()
    if store.failed is not None:
        raise RuntimeError(f"building the data dir failed: {store.failed}")
    if d is not None:
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        run.drain()
        if not outcome or isinstance(outcome[0], Failure):
            raise RuntimeError(f"building the data dir did not finish: {outcome}")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def dir_sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != "LOCK"}


# Workers: each runs in a fresh process and prints one JSON line.


def worker_build(work: str, keys: int, small_keys: int) -> dict[str, Any]:
    work_dir = Path(work)
    items = random_items(keys, seed=1)
    out: dict[str, Any] = {}
    run = Batched()
    # fsync is off while building: the files are the same, only made faster.

    small = fill(work_dir / "puts-small-template", items[:small_keys], run)
    settle(small, run, small.compact())
    settle(small, run, small.close())

    # (b)/(c): every key written by Store.put, a snapshot written by Store.compact, then a
    # journal of overwrites, deletes and new keys on top.
    restart = work_dir / "restart"
    store = fill(restart, items, run)
    del items
    settle(store, run, store.compact())
    rng = random.Random(2)
    present = sorted(k for k, _ in store.items())
    changes = max(1, keys // 20)
    moves = max(1, keys // 200)
    for key in rng.sample(present, changes):
        store.put(key, base64.b64encode(rng.randbytes(VALUE_BYTES * 3 // 4)).decode())
    settle(store, run, None)
    for key in rng.sample(present, moves):
        store.delete(key)
    settle(store, run, None)
    for key, value in random_items(moves, seed=3, prefix="n"):
        store.put(key, value)
    del present
    settle(store, run, None)
    out["records"] = {"overwrites": changes, "deletes": moves, "new keys": moves}
    out["restart_keys"] = len(store)
    out["generation"] = store.generation
    data = dict(store.items())
    settle(store, run, store.close())
    with open(work_dir / "plain.json", "w") as f:
        json.dump(data, f, ensure_ascii=False)
    out["plain_bytes"] = (work_dir / "plain.json").stat().st_size
    out["restart_files"] = dir_sizes(restart)
    out["payload_bytes_per_key"] = sum(len(k) + len(v) for k, v in data.items()) / len(data)
    # (a) starts from copies of these.
    shutil.copytree(restart, work_dir / "puts-big-template")
    return out


def worker_puts(directory: str, puts: int, batch: int, compact: bool, limit: float) -> dict[str, Any]:
    from twisted.internet import reactor as global_reactor
    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.task import LoopingCall, deferLater
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    from kvd.store import Store
    from kvd.versions import HybridClock

    reactor: Any = global_reactor
    pool = ThreadPool(minthreads=1, maxthreads=2, name="bench-store")
    pool.start()
    try:
        store = Store.open(
            directory,
            clock=HybridClock(reactor.seconds, "bench"),
            run=lambda f: deferToThreadPool(reactor, pool, f),
            fsync=True,
        )
        fresh = random_items(puts + WARMUP_PUTS, seed=int.from_bytes(os.urandom(4), "big"), prefix="fresh-")
        warm, items = fresh[:WARMUP_PUTS], fresh[WARMUP_PUTS:]
        record_bytes = sum(len(k) + len(v) + 12 for k, v in items) / len(items)
        out: dict[str, Any] = {"keys_initial": len(store)}
        deadline = time.monotonic() + limit

        def next_turn() -> Deferred[None]:
            # Issue the next batch from a fresh reactor turn, as a node gets its next requests,
            # not from inside the callback that finished the last batch: kvd.store does not
            # support puts made from within a put's own callbacks (two journal writes end up
            # in flight at once; see docs/performance.md).
            return deferLater(reactor, 0, lambda: None)

        async def drive() -> None:
            # Unmeasured warm-up puts (thread pool started, code paths warm), then the timed ones.
            for start in range(0, len(warm), batch):
                await gatherResults([store.put(k, v) for k, v in warm[start : start + batch]])
                await next_turn()
            await store.when_idle()
            out["keys_before"] = len(store)
            gc.collect()
            started = time.perf_counter()
            done = 0
            generation = store.generation
            for start in range(0, puts, batch):
                if time.monotonic() > deadline:
                    break
                await gatherResults([store.put(k, v) for k, v in items[start : start + batch]])
                done = start + len(items[start : start + batch])
                await next_turn()
            await store.when_idle()
            elapsed = time.perf_counter() - started
            out.update(puts=done, seconds=elapsed, rate=done / elapsed, compactions=store.generation - generation)
            if compact:
                stalls: list[float] = []
                last = [time.perf_counter()]

                def tick() -> None:
                    # How late each tick of a 1 ms LoopingCall comes: the time the reactor
                    # could not run, not counting the period itself.
                    now = time.perf_counter()
                    stalls.append(now - last[0] - PROBE_SECONDS)
                    last[0] = now

                ticker = LoopingCall(tick)
                ticker.start(PROBE_SECONDS)
                started = time.perf_counter()
                await store.compact()
                seconds = time.perf_counter() - started
                ticker.stop()
                snapshot = os.path.getsize(os.path.join(directory, "snapshot.json"))
                # The journal is compacted once it outgrows the snapshot: about this many puts.
                puts_per_compaction = snapshot / record_bytes
                out.update(
                    compact_seconds=seconds,
                    compact_max_stall_ms=max(stalls) * 1000 if stalls else seconds * 1000,
                    snapshot_bytes=snapshot,
                    puts_per_compaction=puts_per_compaction,
                    compact_us_per_put=seconds / puts_per_compaction * 1e6,
                )
            await store.close()

        def finished(result: object) -> None:
            out["error"] = None if result is None else str(result)
            reactor.stop()

        reactor.callWhenRunning(lambda: Deferred.fromCoroutine(drive()).addBoth(finished))
        reactor.callLater(limit + 120, reactor.stop)
        reactor.run(installSignalHandlers=False)
    finally:
        pool.stop()
    if out.get("error") or "rate" not in out:
        raise RuntimeError(f"puts did not finish: {out}")
    return out


def worker_open(directory: str) -> dict[str, Any]:
    from kvd.store import Store
    from kvd.versions import HybridClock

    gc.collect()
    started = time.perf_counter()
    store = Store.open(directory, clock=HybridClock(time.time, "bench"))
    seconds = time.perf_counter() - started
    keys = len(store)
    store.abandon()
    return {"seconds": seconds, "keys": keys}


def worker_json_load(path: str) -> dict[str, Any]:
    gc.collect()
    started = time.perf_counter()
    with open(path, "rb") as f:
        data = json.load(f)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "keys": len(data)}


def worker_memory(kind: str, path: str) -> dict[str, Any]:
    # Both sides import the same modules before the first reading.
    import kvd.store
    import kvd.versions

    gc.collect()
    before = rss_bytes()
    if kind == "store":
        store = kvd.store.Store.open(path, clock=kvd.versions.HybridClock(time.time, "bench"))
        keys = len(store)
    else:
        with open(path, "rb") as f:
            data = json.load(f)
        keys = len(data)
    gc.collect()
    after = rss_bytes()
    if kind == "store":
        store.abandon()
    return {"rss_before": before, "rss_after": after, "keys": keys, "bytes_per_key": (after - before) / keys}


WORKERS: dict[str, Callable[..., dict[str, Any]]] = {
    "build": worker_build,
    "puts": worker_puts,
    "open": worker_open,
    "json_load": worker_json_load,
    "memory": worker_memory,
}


def run_worker(kind: str, *args: Any) -> dict[str, Any]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_SECONDS, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# The three measurements


def measure_puts(work: Path, args: argparse.Namespace) -> tuple[float, float, list[float]]:
    print(
        f"(a) {args.puts} puts of fresh random keys, {VALUE_BYTES}-byte values, batches of {args.batch} "
        f"awaited together, fsync on, thread pool of 2 (as in the node)"
    )
    rates: dict[str, list[float]] = {"small": [], "big": []}
    for round_ in range(args.repeats):
        for case in ("small", "big"):
            directory = work / f"puts-{case}-{round_}"
            shutil.copytree(work / f"puts-{case}-template", directory)
            try:
                r = run_worker("puts", str(directory), args.puts, args.batch, case == "big", args.limit)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            rates[case].append(r["rate"])
            line = (
                f"    {case:5} store ({r['keys_initial']:>7} keys +{WARMUP_PUTS} warm-up puts): {r['rate']:8.0f} puts/s"
                f"  ({r['puts']} in {r['seconds']:.2f}s, {r['compactions']} compaction(s) during the puts)"
            )
            print(line)
            if "compact_seconds" in r:
                keys = r["keys_before"] + r["puts"]
                print(
                    f"          then one compaction of all {keys} keys: {r['compact_seconds']:.2f}s, "
                    f"longest reactor stall {r['compact_max_stall_ms']:.0f} ms; "
                    f"snapshot {r['snapshot_bytes'] / 1e6:.0f} MB, due every ~{r['puts_per_compaction']:.0f} puts "
                    f"= {r['compact_us_per_put']:.1f} us per put amortised"
                )
    ratios = [b / s for b, s in zip(rates["big"], rates["small"], strict=True)]
    return median(rates["big"]), median(rates["small"]), ratios


def measure_restart(work: Path, built: dict[str, Any], args: argparse.Namespace) -> tuple[float, float, list[float]]:
    files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in built["restart_files"].items())
    records = ", ".join(f"{v} {k}" for k, v in built["records"].items())
    print(f"(b) restart of a dir of {built['restart_keys']} keys made through the store: {files}")
    print(f"    (snapshot generation {built['generation']} written by Store.compact, then journal records: {records})")
    print(f"    baseline: json.load of plain.json, {built['plain_bytes'] / 1e6:.1f} MB, the same final data")
    for path in [*(work / "restart").iterdir(), work / "plain.json"]:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    times: dict[str, list[float]] = {"open": [], "json_load": []}
    for _ in range(args.repeats):
        opened = run_worker("open", str(work / "restart"))
        loaded = run_worker("json_load", str(work / "plain.json"))
        assert opened["keys"] == loaded["keys"] == built["restart_keys"], (opened, loaded, built)
        times["open"].append(opened["seconds"])
        times["json_load"].append(loaded["seconds"])
        print(f"    Store.open {opened['seconds']:6.2f}s   json.load {loaded['seconds']:6.2f}s")
    ratios = [o / j for o, j in zip(times["open"], times["json_load"], strict=True)]
    return median(times["open"]), median(times["json_load"]), ratios


def measure_memory(work: Path, built: dict[str, Any]) -> tuple[float, float]:
    print(
        "(c) RSS (resident pages from /proc/self/statm) before and after, gc.collect()ed, each in a fresh process "
        "that has imported kvd.store first:"
    )
    print("    store: across Store.open of the dir of (b); dict: across json.load of plain.json (same strings)")
    store = run_worker("memory", "store", str(work / "restart"))
    plain = run_worker("memory", "dict", str(work / "plain.json"))
    for name, r in (("store", store), ("dict", plain)):
        print(
            f"    {name:5}: RSS {r['rss_before'] / 1e6:6.1f} MB -> {r['rss_after'] / 1e6:7.1f} MB for {r['keys']} keys"
            f" = {r['bytes_per_key']:6.1f} bytes/key"
        )
    print(f"    (key + value text: {built['payload_bytes_per_key']:.1f} bytes/key)")
    return store["bytes_per_key"], plain["bytes_per_key"]


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        ensure_kvd_importable()
        result = WORKERS[sys.argv[2]](*json.loads(sys.argv[3]))
        print(json.dumps(result))
        return

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the big store (default 1000000)")
    parser.add_argument("--small-keys", type=int, default=1000, help="keys in the small store of (a) (default 1000)")
    parser.add_argument("--puts", type=int, default=50_000, help="puts timed in (a) (default 50000)")
    parser.add_argument("--batch", type=int, default=32, help="concurrent puts per batch in (a) (default 32)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each case in (a) and (b); medians reported (default 5)"
    )
    parser.add_argument("--only", default="abc", help="which measurements to run, e.g. 'a' or 'bc' (default abc)")
    parser.add_argument(
        "--limit", type=float, default=300.0, help="seconds after which a put run stops early (default 300)"
    )
    parser.add_argument("--dir", default=None, help="make the data dirs under DIR (default: the system temp dir)")
    args = parser.parse_args(argv)

    kvd_at = ensure_kvd_importable()
    print(f"machine: {machine()}")
    report_quiet()
    print(f"kvd from {kvd_at} ({code_version(kvd_at)})")
    summary = []
    spreads: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kvd-bench-store-", dir=args.dir) as tmp:
        work = Path(tmp)
        started = time.monotonic()
        built = run_worker("build", str(work), args.keys, args.small_keys)
        print(f"built the data sets of {args.keys} keys in {time.monotonic() - started:.0f}s under {work}")
        if "a" in args.only:
            big, small, ratios = measure_puts(work, args)
            ratio = median(ratios)
            spreads.append("(a) big/small in each round: " + ", ".join(f"{r:.2f}" for r in ratios))
            summary.append(
                (
                    f"(a) puts/s, {args.keys} vs {args.small_keys} keys",
                    f"{big:.0f}",
                    f"{small:.0f}",
                    ratio,
                    f">= {PUT_TARGET}",
                    met(ratio, PUT_TARGET),
                )
            )
        if "b" in args.only:
            opened, loaded, ratios = measure_restart(work, built, args)
            ratio = median(ratios)
            spreads.append("(b) open/json.load in each round: " + ", ".join(f"{r:.2f}" for r in ratios))
            summary.append(
                (
                    "(b) restart s, Store.open vs json.load",
                    f"{opened:.2f}",
                    f"{loaded:.2f}",
                    ratio,
                    f"<= {RESTART_TARGET}",
                    met(ratio, RESTART_TARGET, at_least=False),
                )
            )
        if "c" in args.only:
            store, plain = measure_memory(work, built)
            ratio = store / plain
            summary.append(
                (
                    "(c) RSS bytes/key, store vs dict",
                    f"{store:.0f}",
                    f"{plain:.0f}",
                    ratio,
                    f"<= {MEMORY_TARGET}",
                    met(ratio, MEMORY_TARGET, at_least=False),
                )
            )
    print()
    print(f"summary ({'median of ' + str(args.repeats) + ' runs' if args.repeats > 1 else '1 run'} for a and b):")
    print(f"  {'measurement':42} {'figure':>9} {'baseline':>9} {'ratio':>6}  target")
    for name, figure, baseline, ratio, target, verdict in summary:
        print(f"  {name:42} {figure:>9} {baseline:>9} {ratio:6.2f}  {target}: {verdict}")
    for line in spreads:
        print(f"  {line}; the ratio is their median")


if __name__ == "__main__":
    main()
