"""
The gateway's transport to the nodes, measured: the hand-written kept-alive pool against
treq over a bare Agent with a persistent HTTPConnectionPool (``allow_redirects=False``, a
capped collector), and against that Agent called directly with no treq at all, in the same
run, against one real ``twistd kvd --role node`` process.

Each candidate makes gateway-style calls (``POST /internal/read`` with a batch of keys, the
GET path; ``POST /internal/apply`` with one item, the PUT path) from this process, with 1 and
with 32 calls in flight. Printed per cell: calls/s and the CPU time of this (the calling)
process per call, from ``getrusage``; then each candidate's ratio to the pool. The rounds
are interleaved so a drift in machine load hits every candidate alike; the best round of
each cell is kept. With two or more cores the node runs on one and this process on another.

    python bench/transport.py [--seconds 3] [--rounds 2] [--keys 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checkout import ensure_kvd_importable
from cores import can_pin
from report import machine, report_quiet
from servers import Server, free_port

ensure_kvd_importable()

import treq  # noqa: E402
from treq.client import HTTPClient  # noqa: E402
from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.protocol import Protocol  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402
from twisted.web.iweb import IBodyProducer  # noqa: E402
from zope.interface import implementer  # noqa: E402

from kvd.testing.processes import kvd_argv, node_args  # noqa: E402
from kvd.versions import HybridClock  # noqa: E402

reactor: Any = _reactor
CAP = 8 * 1024 * 1024
TIMEOUT = 10.0

Call = Callable[[str, bytes], "Deferred[tuple[int, bytes]]"]


def pool_candidate(port: int) -> tuple[Call, Callable[[], Any]]:
    """kvd's production transport: L{kvd.transport.Peers} over the hand-written kept-alive pool."""
    from kvd.transport import KeepAlivePool, Peers

    pool = KeepAlivePool(reactor, CAP)
    peers = Peers(pool, reactor, TIMEOUT)
    base = f"http://127.0.0.1:{port}"

    def call(path: str, body: bytes) -> Deferred[tuple[int, bytes]]:
        return peers.call("POST", base + path, body).addCallback(lambda a: (a.status, a.body))

    return call, pool.close


def treq_candidate(port: int) -> tuple[Call, Callable[[], Any]]:
    """treq over a bare Agent and a persistent pool, no redirects, a capped body collector."""
    connections = HTTPConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = 64
    http = HTTPClient(Agent(reactor, pool=connections))
    base = f"http://127.0.0.1:{port}"

    async def request(path: str, body: bytes) -> tuple[int, bytes]:
        response = await http.request(
            "POST", base + path, data=body, timeout=TIMEOUT, reactor=reactor, allow_redirects=False, unbuffered=True
        )
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > CAP:
                raise ValueError("too large")
            chunks.append(data)

        await treq.collect(response, collect)
        return response.code, b"".join(chunks)

    return lambda path, body: Deferred.fromCoroutine(request(path, body)), connections.closeCachedConnections


@implementer(IBodyProducer)
class _Bytes:
    """A request body written at once (what FileBodyProducer does through a cooperator)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collect(Protocol):
    def __init__(self, done: Deferred[bytes]) -> None:
        self.done, self.chunks, self.size = done, [], 0  # type: ignore[var-annotated]

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > CAP:
            self.transport.stopProducing()  # type: ignore[union-attr]
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(b"".join(self.chunks))


def agent_candidate(port: int) -> tuple[Call, Callable[[], Any]]:
    """A bare Agent and a persistent pool called directly: no treq, no wrapper agents."""
    connections = HTTPConnectionPool(reactor, persistent=True)
    connections.maxPersistentPerHost = 64
    agent = Agent(reactor, pool=connections)
    base = f"http://127.0.0.1:{port}".encode()

    async def request(path: str, body: bytes) -> tuple[int, bytes]:
        response = await agent.request(b"POST", base + path.encode(), Headers(), _Bytes(body))
        done: Deferred[bytes] = Deferred()
        response.deliverBody(_Collect(done))
        return response.code, await done

    return lambda path, body: Deferred.fromCoroutine(request(path, body)), connections.closeCachedConnections


async def drive(
    call: Call, path: str, make_body: Callable[[], bytes], in_flight: int, seconds: float
) -> tuple[float, float]:
    """Keep C{in_flight} calls going for C{seconds}; (calls/s, CPU µs of this process per call)."""
    done = 0
    failures: list[str] = []
    stop_at = time.monotonic() + seconds
    finished: Deferred[None] = Deferred()
    running = in_flight

    def next_call(_: object = None) -> None:
        nonlocal done, running
        if time.monotonic() >= stop_at or failures:
            running -= 1
            if running == 0:
                finished.callback(None)
            return
        d = call(path, make_body())
        d.addCallback(check)
        d.addErrback(lambda f: failures.append(f.getErrorMessage()))
        d.addBoth(next_call)

    def check(answer: tuple[int, bytes]) -> None:
        nonlocal done
        if answer[0] != 200:
            failures.append(f"status {answer[0]}: {answer[1][:200]!r}")
        done += 1

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    for _ in range(in_flight):
        next_call()
    await finished
    elapsed = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if failures:
        raise RuntimeError(f"{path}: {failures[0]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done / elapsed, cpu / max(done, 1) * 1e6


async def measure(args: argparse.Namespace, port: int) -> None:
    clock = HybridClock(time.time, "bench")
    keys = [f"key{i}" for i in range(args.keys)]
    read_body = json.dumps({"keys": keys}).encode()
    counter = [0]

    def apply_body() -> bytes:
        counter[0] += 1
        key = keys[counter[0] % len(keys)]
        return json.dumps({"items": [[key, "v" * 100, clock.next()]]}).encode()

    candidates: dict[str, tuple[Call, Callable[[], Any]]] = {}
    for name, make in (("pool", pool_candidate), ("treq", treq_candidate), ("agent", agent_candidate)):
        candidates[name] = make(port)
    # Preload: every key the reads ask for exists.
    first = next(iter(candidates.values()))[0]
    for key in keys:
        await first("/internal/apply", json.dumps({"items": [[key, "v" * 100, clock.next()]]}).encode())

    cells = [(op, c) for op in ("read", "apply") for c in (1, args.concurrency)]
    best: dict[tuple[str, str, int], tuple[float, float]] = {}
    for round_ in range(args.rounds):
        for op, in_flight in cells:
            for name, (call, _) in candidates.items():
                path, make_body = (
                    ("/internal/read", lambda: read_body) if op == "read" else ("/internal/apply", apply_body)
                )
                await drive(call, path, make_body, in_flight, 0.3)  # warm the connections
                rps, cpu = await drive(call, path, make_body, in_flight, args.seconds)
                print(f"round {round_ + 1} {op:5} x{in_flight:<3} {name:5} {rps:9.0f} calls/s {cpu:8.1f} µs CPU/call")
                key = (op, name, in_flight)
                if key not in best or cpu < best[key][1]:
                    best[key] = (rps, cpu)
    print()
    print("best round per cell; ratio = candidate / pool (calls/s higher is better, CPU lower is better)")
    for op, in_flight in cells:
        base = best.get((op, "pool", in_flight))
        for name in candidates:
            rps, cpu = best[(op, name, in_flight)]
            ratio = f"  calls/s x{rps / base[0]:.2f}  CPU x{cpu / base[1]:.2f}" if base and name != "pool" else ""
            print(f"{op:5} x{in_flight:<3} {name:5} {rps:9.0f} calls/s {cpu:8.1f} µs CPU/call{ratio}")
    for _, close in candidates.values():
        closing = close()
        if isinstance(closing, Deferred):
            await closing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keys", type=int, default=8, help="keys in each read batch")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(machine())
    report_quiet()
    node_cpu = None
    if can_pin():
        node_cpu = 1
        os.sched_setaffinity(0, {0})
    with tempfile.TemporaryDirectory(prefix="kvd-bench-transport-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        argv = kvd_argv(workdir / "n1.log", *node_args("n1", workdir / "n1", port, "--fsync", "never"))
        with Server("n1", argv, port, workdir, cpu=node_cpu):
            errors: list[Any] = []
            d = Deferred.fromCoroutine(measure(args, port))
            d.addErrback(errors.append)
            d.addBoth(lambda _: reactor.stop())
            reactor.run()
            if errors:
                errors[0].raiseException()


if __name__ == "__main__":
    main()
