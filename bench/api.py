"""
The second part of the client API (issue 10): listing and batches.

a. A node's cost of one listing page of 100 keys, from a node holding --big-keys keys vs
   one holding --small-keys, each page after a random key. Target: the 1k-key page time /
   the 1M-key page time >= 0.8 (a page costs O(log n + page)). Measured twice:
   - "node": a real node process (its data dir written as a snapshot beforehand) answering
     POST /internal/list over one keep-alive connection: the node's whole cost of a page,
     the figure the target is for;
   - "cluster": GET /kv through a gateway in front of three node processes, each holding
     every key (N=3): the page as a client gets it;
   - "store": Store.listing plus the JSON of its answer, in-process: the part that depends
     on the number of keys, with nothing around it.
b. Batch of 100 GETs vs 100 single GETs over one keep-alive connection, through a gateway in
   front of three node processes (default quorums). Target: batch >= 10x faster.

Prints figures; asserts nothing about them. Every process is stopped at the end.

    python bench/api.py [--big-keys 1000000] [--small-keys 1000] [--pages 2000] [--rounds 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkout import ensure_kvd_importable
from report import machine, met, report_quiet
from servers import bench_processes, free_port, preload

ensure_kvd_importable()

from kvd.journal import pack, write_snapshot  # noqa: E402
from kvd.store import Store  # noqa: E402
from kvd.testing.processes import Processes  # noqa: E402
from kvd.versions import HybridClock, encode  # noqa: E402
from kvd.web import json_body  # noqa: E402

PAGE_TARGET = 0.8
BATCH_TARGET = 10.0
PAGE = 100


def build_store(directory: Path, keys: int) -> tuple[Store, list[str]]:
    store = Store.open(str(directory), clock=HybridClock(time.time, "bench"), fsync=False)
    names = [f"user/{i:08d}" for i in range(keys)]
    for start in range(0, keys, 20_000):
        store.apply_batch([[name, "v" * 20, encode(1000, 0, "bench")] for name in names[start : start + 20_000]])
    return store, names


def page_seconds(store: Store, names: list[str], pages: int, rng: random.Random) -> float:
    """Median seconds to answer one internal list request of PAGE keys after a random key."""
    times = []
    for _ in range(pages):
        after = names[rng.randrange(len(names) - PAGE - 1)]  # a full page follows
        started = time.perf_counter()
        listed = store.listing("user/", after, PAGE, False)
        json_body({"success": True, "entries": listed.entries, "more": listed.more})
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_data_dir(workdir: Path, node_id: str, names: list[str]) -> None:
    """A node's data dir holding C{names}, written as a snapshot (loading 1M keys over HTTP takes minutes)."""
    data = workdir / "data" / node_id
    data.mkdir(parents=True)
    version = encode(1000, 0, "bench")
    write_snapshot(str(data), 0, [(name, pack("v" * 20, version)) for name in names])


def answer_of(connection: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> Any:
    """The JSON of a 200 answer to one request."""
    connection.request(method, path, body=body)
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 200, answer
    return answer


def time_pages(
    connections: dict[int, http.client.HTTPConnection],
    names: dict[int, list[str]],
    times: dict[int, list[float]],
    pages: int,
    rng: random.Random,
    ask: Callable[[http.client.HTTPConnection, str], int],
) -> None:
    """Ask each size's server in turn for C{pages} full pages after random keys (after 100 to warm up); close them."""
    try:
        for number in range(pages + 100):
            for keys, connection in connections.items():
                after = names[keys][rng.randrange(keys - PAGE - 1)]  # a full page follows
                started = time.perf_counter()
                assert ask(connection, after) == PAGE
                if number >= 100:
                    times[keys].append(time.perf_counter() - started)
    finally:
        for connection in connections.values():
            connection.close()


def compare_pages(
    args: argparse.Namespace,
    seed: int,
    pages: int,
    serve: Callable[[Processes, Path, int, list[str]], int],
    ask: Callable[[http.client.HTTPConnection, str], int],
) -> tuple[float, float]:
    """
    Median seconds a page takes from a server of --small-keys and one of --big-keys keys
    (C{serve} starts one and gives its port), both running at once and asked in turn, so
    load from elsewhere hits both alike.
    """
    rng = random.Random(seed)
    sizes = (args.small_keys, args.big_keys)
    names = {keys: [f"user/{i:08d}" for i in range(keys)] for keys in sizes}
    times: dict[int, list[float]] = {keys: [] for keys in sizes}
    with tempfile.TemporaryDirectory(prefix="kvd-bench-api-") as tmp, bench_processes(Path(tmp)) as processes:
        connections = {
            keys: http.client.HTTPConnection("127.0.0.1", serve(processes, Path(tmp), keys, names[keys]), timeout=30)
            for keys in sizes
        }
        time_pages(connections, names, times, pages, rng, ask)
    small, big = (statistics.median(times[keys]) for keys in sizes)
    return small, big


def listing(args: argparse.Namespace) -> None:
    """A node process's whole cost of a page: POST /internal/list over one keep-alive connection."""

    def serve(processes: Processes, tmp: Path, keys: int, names: list[str]) -> int:
        write_data_dir(tmp, f"n{keys}", names)
        node = processes.node(f"n{keys}").start()
        assert node.port is not None
        return node.port

    def ask(connection: http.client.HTTPConnection, after: str) -> int:
        body = json.dumps({"prefix": "user/", "after": after, "limit": PAGE, "values": False}).encode()
        return len(answer_of(connection, "POST", "/internal/list", body)["entries"])

    small, big = compare_pages(args, 11, args.pages, serve, ask)
    ratio = small / big
    print(
        f"node:  page of {PAGE} keys {big * 1e6:7.1f} us from {args.big_keys} keys, {small * 1e6:7.1f} us from"
        f" {args.small_keys}: page of 100 keys 1M vs 1k {ratio:.2f}   target >= {PAGE_TARGET}"
        f"   {met(ratio, PAGE_TARGET)}"
    )


def cluster_listing(args: argparse.Namespace) -> None:
    """
    The page as a client gets it: GET /kv through a gateway in front of three node processes
    (N=3, so each holds every key).
    """

    def serve(processes: Processes, tmp: Path, keys: int, names: list[str]) -> int:
        nodes = []
        for n in "abc":
            write_data_dir(tmp, f"{n}{keys}", names)
            nodes.append(processes.node(f"{n}{keys}").start())
        port = free_port()
        processes.kvd(
            f"gateway{keys}",
            *("--role", "gateway", "--listen", f"tcp:{port}:interface=127.0.0.1"),
            *[f"--node={n}=http://127.0.0.1:{node.port}" for n, node in zip("abc", nodes, strict=True)],
            port=port,
        ).start()
        return port

    def ask(connection: http.client.HTTPConnection, after: str) -> int:
        return len(answer_of(connection, "GET", f"/kv?prefix=user/&limit={PAGE}&after={after}")["keys"])

    small, big = compare_pages(args, 12, args.pages // 4, serve, ask)
    ratio = small / big
    print(
        f"cluster: GET /kv page of {PAGE} keys through a gateway {big * 1e6:7.1f} us from {args.big_keys} keys,"
        f" {small * 1e6:7.1f} us from {args.small_keys}: {ratio:.2f}   target >= {PAGE_TARGET}"
        f"   {met(ratio, PAGE_TARGET)}"
    )


def store_listing(args: argparse.Namespace) -> None:
    rng = random.Random(10)
    with tempfile.TemporaryDirectory(prefix="kvd-bench-api-") as tmp:
        results = {}
        for keys in (args.small_keys, args.big_keys):
            started = time.perf_counter()
            store, names = build_store(Path(tmp) / f"s{keys}", keys)
            print(f"store of {keys:>9} keys built in {time.perf_counter() - started:6.1f} s")
            page_seconds(store, names, 100, rng)  # warm up
            results[keys] = page_seconds(store, names, args.pages, rng)
            store.abandon()
            del store, names
    small, big = results[args.small_keys], results[args.big_keys]
    ratio = small / big
    print(
        f"store: page of {PAGE} keys {big * 1e6:7.1f} us from {args.big_keys} keys, {small * 1e6:7.1f} us from"
        f" {args.small_keys}: {ratio:.2f}   (the store alone, no target)"
    )


def batches(args: argparse.Namespace) -> None:
    keys = [f"key{i}" for i in range(PAGE)]
    with tempfile.TemporaryDirectory(prefix="kvd-bench-api-") as tmp, bench_processes(Path(tmp)) as processes:
        nodes = [processes.node(n).start() for n in ("a", "b", "c")]
        port = free_port()
        processes.kvd(
            "gateway",
            "--role",
            "gateway",
            *[f"--node={n}=http://127.0.0.1:{node.port}" for n, node in zip("abc", nodes, strict=True)],
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            port=port,
        ).start()
        preload(port, [(key, "v" * 100) for key in keys])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = json.dumps({"get": keys}).encode()
        singles, batched = [], []
        try:
            for _ in range(args.rounds):
                started = time.perf_counter()
                for key in keys:
                    connection.request("GET", f"/kv/{key}")
                    response = connection.getresponse()
                    response.read()
                    assert response.status == 200
                singles.append(time.perf_counter() - started)
                started = time.perf_counter()
                connection.request("POST", "/batch", body=body, headers={"content-type": "application/json"})
                response = connection.getresponse()
                answer = json.loads(response.read())
                assert response.status == 200 and len(answer["results"]) == PAGE
                batched.append(time.perf_counter() - started)
        finally:
            connection.close()
    single, batch = statistics.median(singles), statistics.median(batched)
    ratio = single / batch
    print(
        f"{PAGE} single GETs {single * 1e3:7.2f} ms, one batch of {PAGE} GETs {batch * 1e3:7.2f} ms over one"
        f" connection: batch {ratio:.1f}x faster   target >= {BATCH_TARGET}   {met(ratio, BATCH_TARGET)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-keys", type=int, default=1_000_000)
    parser.add_argument("--small-keys", type=int, default=1_000)
    parser.add_argument("--pages", type=int, default=2000, help="pages timed per store")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of 100 GETs and one batch")
    parser.add_argument("--only", choices=("listing", "batch"))
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    if args.only != "batch":
        listing(args)
        cluster_listing(args)
        store_listing(args)
    if args.only != "listing":
        batches(args)


if __name__ == "__main__":
    main()
