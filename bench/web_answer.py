"""
The gateway's HTTP server side of one GET and one PUT of /kv/{key}, in process: requests fed
to a BoundedSite channel over a StringTransport, answered by the real gateway handlers with
a coordinator whose quorum has already answered (no nodes, no sockets). What it measures is
what every client request costs the gateway besides the quorum: request parsing, routing,
the handler, the JSON answer, its headers and the write. CPU microseconds per request,
the best of a few rounds (busy machine or not, said in the output). Prints figures only.

    python bench/web_answer.py [--requests 20000] [--rounds 5] [--full] [--calls]

With --full, the handlers use the real coordinator and node clients over nodes that answer
every batch at once (each PUT a batch of its own: the batching of a loaded gateway is not
there); --calls also counts the Python function calls a request makes, a figure the
machine's load does not move. So does the count of instructions (valgrind's callgrind, the
difference of two runs over the difference of their requests):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/web_answer.py \
        --full --only PUT --rounds 1 --requests 200   # and again with --requests 1200
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from checkout import code_version, ensure_kvd_importable
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport


class _Receipt:
    def to_json(self) -> dict[str, Any]:
        return {"replicas": ["a", "b"], "hinted": {}}


class _Outcome:
    version = "0000018c2f4e5a6b0001-gw1"
    live = True
    receipt = _Receipt()


class _Coordinator:
    """Answers every read and write at once, as a quorum that has already answered."""

    clock: Any = None

    def read(self, key: str) -> Deferred[Any]:
        return succeed(("v" * 100, "0000018c2f4e5a6b0001-gw1"))

    def write(self, key: str, value: Any, ttl: Any = None) -> Deferred[Any]:
        return succeed(_Outcome())


class _Peers:
    """Nodes that answer every internal batch at once, holding whatever was written (no sockets)."""

    timeout = 5.0

    def __init__(self) -> None:
        from twisted.internet.task import Clock

        self.reactor = Clock()
        self.held: dict[str, tuple[str | None, str]] = {}
        #: With C{hold}, answers wait here until L{release}: batches form as under load.
        self.hold = False
        self.waiting: list[tuple[Deferred[Any], Any]] = []

    def release(self) -> None:
        while self.waiting:
            waiting, self.waiting = self.waiting, []
            for d, answer in waiting:
                d.callback(answer)

    def call(self, method: str, url: str, body: bytes | None = None, **_: Any) -> Deferred[Any]:
        from kvd.codec import wire_json, wire_loads
        from kvd.transport import Answer

        asked = wire_loads(body or b"{}")
        if url.endswith("/internal/apply"):
            live = []
            for key, value, version in asked["items"]:
                live.append(key in self.held)
                self.held[key] = (value, version)
            answer: dict[str, Any] = {"live": live}
        else:
            answer = {"entries": {key: list(self.held[key]) for key in asked["keys"] if key in self.held}}
        if self.hold:
            d: Deferred[Any] = Deferred()
            self.waiting.append((d, Answer(200, wire_json(answer))))
            return d
        return succeed(Answer(200, wire_json(answer)))


def full_site() -> Any:
    """The gateway's whole request path: the real coordinator and node clients, over L{_Peers}."""
    from twisted.internet.task import Clock

    from kvd.gateway import Cluster
    from kvd.gateway.coordinator import Coordinator
    from kvd.gateway.nodes import NodeClients
    from kvd.membership import NodeInfo
    from kvd.resources import GatewayAPI
    from kvd.versions import HybridClock
    from kvd.web import BoundedSite

    peers: Any = _Peers()
    cluster = Cluster(vnodes=64, replicas=3)
    cluster.update({n: NodeInfo(n, f"http://{n}.test:80") for n in "abc"})
    coordinator = Coordinator(cluster, NodeClients(peers), HybridClock(Clock().seconds, "gw"))
    api = GatewayAPI(cluster, coordinator)
    site = BoundedSite(api.resource(), metrics=api.metrics)
    site.peers = peers  # type: ignore[attr-defined]
    return site


def site() -> Any:
    from kvd.auth import Auth
    from kvd.metrics import Metrics
    from kvd.resources import GatewayAPI
    from kvd.web import BoundedSite

    # The handlers read only these of the API (an attrs class with slots: set them directly).
    api = GatewayAPI.__new__(GatewayAPI)
    fields = {"coordinator": _Coordinator(), "max_value_bytes": 1 << 20, "hot": None, "watches": None}
    for name, value in {**fields, "proposer": None, "auth": Auth()}.items():
        object.__setattr__(api, name, value)
    return BoundedSite(GatewayAPI.routes.resource(api, Auth()), metrics=Metrics())


def run_batched(request: bytes, count: int, the_site: Any, width: int) -> tuple[float, bytes]:
    """C{count} requests, C{width} clients at a time, the nodes answering once all have asked."""
    peers = the_site.peers
    peers.hold = True
    clients = []
    for _ in range(width):
        channel = the_site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        clients.append((channel, transport))
    started = time.process_time()
    for _ in range(count // width):
        for channel, _ in clients:
            channel.dataReceived(request)
        peers.release()
        for _, transport in clients:
            transport.clear()
    used = time.process_time() - started
    peers.hold = False
    channel, transport = clients[0]
    channel.dataReceived(request)
    answer = transport.value()
    for channel, _ in clients:
        channel.connectionLost(None)
    return used / (count // width * width) * 1e6, answer


def run(request: bytes, count: int, the_site: Any, width: int = 0) -> tuple[float, bytes]:
    if width:
        return run_batched(request, count, the_site, width)
    channel = the_site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    started = time.process_time()
    for _ in range(count):
        channel.dataReceived(request)
        if len(transport.io.getvalue()) > 1 << 20:
            transport.clear()
    used = time.process_time() - started
    last = transport.value()
    answer = last[last.rfind(b"HTTP/1.1 ") :]
    channel.connectionLost(None)
    return used / count * 1e6, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="with the real coordinator and node clients")
    parser.add_argument(
        "--width",
        type=int,
        default=0,
        help="with --full: this many clients at once, so the nodes' batches hold that many",
    )
    parser.add_argument("--only", choices=("PUT", "GET"), default=None, help="run only these requests")
    parser.add_argument("--calls", action="store_true", help="count Python function calls a request (cProfile)")
    args = parser.parse_args()
    kvd_dir = ensure_kvd_importable()
    print(f"kvd from {kvd_dir} ({code_version(kvd_dir)}); load average {os.getloadavg()[0]:.1f}")
    the_site = full_site() if args.full else site()
    value = b"v" * 100
    requests = {
        "PUT": b"PUT /kv/key1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s" % (len(value), value),
        "GET": b"GET /kv/key1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    }
    for method, request in requests.items():
        if args.only is not None and method != args.only:
            continue
        figures = []
        answer = b""
        for _ in range(args.rounds):
            us, answer = run(request, args.requests, the_site, args.width)
            figures.append(us)
        if args.calls:
            import cProfile
            import pstats

            profile = cProfile.Profile()
            profile.enable()
            run(request, 1000, the_site, args.width)
            profile.disable()
            print(f"{method}: {pstats.Stats(profile).total_calls / 1000:.1f} Python calls a request")  # type: ignore[attr-defined]
        shown = " ".join(f"{us:.1f}" for us in figures)
        print(f"{method}: best {min(figures):.1f} us CPU a request (rounds: {shown})")
        print("   answer: " + answer.decode("latin-1").replace("\r\n", " | "))


if __name__ == "__main__":
    main()
