"""
What a node's internal write request costs, fixed and per item: a node process taking
POST /internal/apply batches of 1, 14 and 28 replicated writes (distinct keys, rising
versions, 100-byte values), one request at a time over one kept-alive connection, as a
gateway sends them (one batch in flight a node). Node CPU (utime + stime of every thread,
from /proc) per request and per item for each size, and a straight-line fit: the fixed cost
of one request (its read, parse, hand-over to the journal thread and back, answer) and the
cost of one more item in it.

The baseline, in the same run: a bare Twisted echo server's CPU per round trip of 100 bytes
(one reactor wake-up, one recv, one send: the floor of any request on this machine). A
request's fixed cost over it says how many such wake-ups' worth a request takes.

    python bench/node_batches.py [--duration 5] [--sizes 1,14,28] [--fsync always|never]

Prints figures only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from checkout import code_version, ensure_kvd_importable
from report import machine, report_quiet
from servers import Server, cpu_seconds, free_port, node_argv

VALUE_BYTES = 100

_ECHO = """
from twisted.internet import protocol, reactor
class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)
factory = protocol.Factory.forProtocol(Echo)
port = reactor.listenTCP(0, factory, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def echo_round_trip_us(seconds: float) -> float:
    """A bare Twisted echo server's CPU microseconds per 100-byte round trip."""
    server = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            before, count, started = cpu_seconds(server.pid), 0, time.monotonic()
            while time.monotonic() - started < seconds:
                conn.sendall(b"x" * 100)
                got = 0
                while got < 100:
                    got += len(conn.recv(4096))
                count += 1
            used = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait()
    return used / count * 1e6


def drive(port: int, pid: int, size: int, seconds: float, keys: int) -> tuple[int, float]:
    """Apply batches of C{size} for C{seconds}; the requests made and the node CPU seconds they took."""
    from kvd.versions import encode

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    value = "v" * VALUE_BYTES
    millis = int(time.time() * 1000)
    requests = 0

    def one() -> None:
        nonlocal millis, requests
        millis += 1
        version = encode(millis, 0, "bench")
        first = requests * size
        items = [[f"k{(first + i) % keys}", value, version] for i in range(size)]
        conn.request("POST", "/internal/apply", json.dumps({"items": items}).encode())
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"/internal/apply answered {answer.status}: {body[:200]!r}")
        requests += 1

    try:
        for _ in range(50):  # warm up
            one()
        counted = requests
        before, started = cpu_seconds(pid), time.monotonic()
        while time.monotonic() - started < seconds:
            one()
        used = cpu_seconds(pid) - before
    finally:
        conn.close()
    return requests - counted, used


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of us per request on items per request: (fixed, per item)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y - slope * mean_x, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per batch size (default 5)")
    parser.add_argument("--sizes", default="1,14,28", help="items per request, comma-separated (default 1,14,28)")
    parser.add_argument("--keys", type=int, default=1000, help="keys written over (default 1000)")
    parser.add_argument("--fsync", choices=("always", "never"), default="always")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    kvd_at = ensure_kvd_importable()
    print(f"machine: {machine()}")
    report_quiet()
    print(f"kvd from {kvd_at} ({code_version(kvd_at)}); node --fsync {args.fsync}, one request at a time")
    echo = echo_round_trip_us(args.duration)
    print(f"baseline: bare Twisted echo, {echo:.0f} us CPU a round trip")
    points = []
    with tempfile.TemporaryDirectory(prefix="kvd-bench-batches-") as tmp:
        work = Path(tmp)
        port = free_port()
        argv = node_argv(port, work / "data", work / "node.log", "--fsync", args.fsync)
        with Server("node", argv, port, work) as server:
            for size in sizes:
                requests, used = drive(port, server.pid, size, args.duration, args.keys)
                per_request = used / requests * 1e6
                points.append((size, per_request))
                print(
                    f"  {size:3} items a request: {requests / args.duration:6.0f} requests/s, node CPU "
                    f"{per_request:5.0f} us a request, {per_request / size:6.1f} us an item"
                )
    if len(points) > 1:
        fixed, per_item = fit(points)
        print(
            f"fit: {fixed:.0f} us a request fixed ({fixed / echo:.1f} x the echo round trip) "
            f"+ {per_item:.1f} us an item"
        )
        for size in (14, 28):
            share = fixed / size
            print(f"  at {size} items a request: {share + per_item:.1f} us an item, {share:.1f} of it fixed")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
