"""
The HTTP server's share of a request, twisted.web's channel against kvd's lean one
(kvd/lean_http.py), in process: the same requests fed to a BoundedSite and to a LeanSite
over a StringTransport, answered by the real handlers, no sockets.

    python bench/lean_http.py [--requests 5000] [--rounds 3]      # CPU us a request, both sites
    python bench/lean_http.py --callgrind                         # instructions a request (valgrind)
    python bench/lean_http.py --callgrind --only node:apply --items 14   # and an item, of a real batch

Roles and requests: the gateway's GET and PUT of /kv/{key} over its real coordinator and
node clients, with 16 clients at once over in-memory nodes that answer each batch once all
have asked (as bench/web_answer.py --full --width 16); a node's GET and PUT of /kv/{key}
and the gateway's POST /internal/apply and /internal/read, over a store without fsync.
With C{--items N} each node apply carries N items (keys item1..itemN, none written before) at
versions newer than the previous request's, so every item is written, as in a replicated batch
(a node's carry about 14); without it, the one item is written once and then held.
CPU microseconds are the best of the rounds (the machine's load moves them: said in the
output); instructions (callgrind, the difference of two runs over the difference of their
requests) the load does not move. Prints figures only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from checkout import code_version, ensure_kvd_importable
from twisted.internet.testing import StringTransport

WIDTH = 16
VALUE = b"v" * 100


def _gateway(lean: bool) -> tuple[Any, Any]:
    from twisted.internet.task import Clock
    from web_answer import _Peers

    from kvd.gateway import Cluster
    from kvd.gateway.coordinator import Coordinator
    from kvd.gateway.nodes import NodeClients
    from kvd.lean_http import LeanSite
    from kvd.membership import NodeInfo
    from kvd.resources import GatewayAPI
    from kvd.versions import HybridClock
    from kvd.web import BoundedSite

    peers: Any = _Peers()
    cluster = Cluster(vnodes=64, replicas=3)
    cluster.update({n: NodeInfo(n, f"http://{n}.test:80") for n in "abc"})
    coordinator = Coordinator(cluster, NodeClients(peers), HybridClock(Clock().seconds, "gw"))
    api = GatewayAPI(cluster, coordinator)
    site = (LeanSite if lean else BoundedSite)(api.resource(), metrics=api.metrics)
    return site, peers


def _node(lean: bool, directory: str) -> Any:
    from kvd.lean_http import LeanSite
    from kvd.resources import NodeAPI
    from kvd.store import Store
    from kvd.versions import HybridClock
    from kvd.web import BoundedSite

    store = Store.open(directory, clock=HybridClock(time.time, "a"), fsync=False)
    api = NodeAPI("a", store)
    return (LeanSite if lean else BoundedSite)(api.resource(), metrics=api.metrics)


#: The version of the apply requests' items; with --items, the i-th request's are i later.
VERSION = "01a232b718df000000.gw"


def _requests(items: int = 0) -> dict[str, bytes]:
    from kvd.codec import wire_json

    batch = [[f"item{k}", "v" * 100, VERSION] for k in range(1, items + 1)] if items else [["key1", "v" * 100, VERSION]]
    apply = wire_json({"items": batch})
    read = wire_json({"keys": ["key1"], "max_chars": 1 << 20})
    host = b"Host: 127.0.0.1\r\n"
    return {
        "PUT": b"PUT /kv/key1 HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (host, len(VALUE), VALUE),
        "GET": b"GET /kv/key1 HTTP/1.1\r\n%s\r\n" % host,
        "apply": b"POST /internal/apply HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (host, len(apply), apply),
        "read": b"POST /internal/read HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n%s" % (host, len(read), read),
    }


def _connect(site: Any) -> tuple[Any, StringTransport]:
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def _newer(request: bytes, serial: int) -> bytes:
    """C{request} with its items' version C{serial} counts later (the same length)."""
    return request.replace(VERSION[:18].encode(), b"%s%06x" % (VERSION[:12].encode(), serial))


def run(role: str, lean: bool, what: str, count: int, directory: str, items: int = 0) -> tuple[float, bytes]:
    """CPU us a request over C{count} requests, and the last answer."""
    request = _requests(items)[what]
    # Each request written anew (--items): made before the clock starts; under callgrind
    # their making is a bytes.replace a request, next to a node's thousands of instructions.
    requests = [_newer(request, serial) for serial in range(1, count + 1)] if items and what == "apply" else None
    if role == "gateway":
        site, peers = _gateway(lean)
        peers.call("POST", "http://a.test/internal/apply", _requests()["apply"].split(b"\r\n\r\n", 1)[1])
        peers.hold = True
        clients = [_connect(site) for _ in range(WIDTH)]
        rounds = max(1, count // WIDTH)
        started = time.process_time()
        for _ in range(rounds):
            for protocol, _ in clients:
                protocol.dataReceived(request)
            peers.release()
            for _, transport in clients:
                transport.clear()
        used = time.process_time() - started
        peers.hold = False
        protocol, transport = clients[0]
        protocol.dataReceived(request)
        return used / (rounds * WIDTH) * 1e6, transport.value()
    site = _node(lean, directory)
    protocol, transport = _connect(site)
    protocol.dataReceived(_requests()["PUT"])
    started = time.process_time()
    for serial in range(count):
        protocol.dataReceived(request if requests is None else requests[serial])
        if transport.io.tell() > 1 << 20:  # not len(getvalue()): a copy of all of it each request
            transport.clear()
    used = time.process_time() - started
    last = transport.value()
    return used / count * 1e6, last[last.rfind(b"HTTP/1.1 ") :]


CASES = [("gateway", "GET"), ("gateway", "PUT"), ("node", "GET"), ("node", "PUT"), ("node", "apply"), ("node", "read")]


def _callgrind(role: str, site: str, what: str, count: int, items: int) -> int:
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--one",
            f"{role}:{site}:{what}:{count}:{items}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise SystemExit(f"callgrind gave no count: {out.stderr[-500:]}")
    return int(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default=None, help="ROLE:WHAT, e.g. gateway:PUT")
    parser.add_argument("--callgrind", action="store_true", help="instructions a request, under valgrind")
    parser.add_argument("--small", type=int, default=320, help="with --callgrind: requests of the first run")
    parser.add_argument("--large", type=int, default=1920, help="with --callgrind: requests of the second run")
    parser.add_argument(
        "--items", type=int, default=0, help="node apply: N items a request, each written (figures also an item)"
    )
    parser.add_argument("--sites", default="twisted,lean", help="which HTTP servers to measure, of twisted,lean")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    kvd_dir = ensure_kvd_importable()
    if args.one is not None:
        role, site, what, count, items = args.one.split(":")
        with tempfile.TemporaryDirectory() as directory:
            run(role, site == "lean", what, int(count), directory, int(items))
        return
    print(f"kvd from {kvd_dir} ({code_version(kvd_dir)}); load average {os.getloadavg()[0]:.1f}")
    cases = [case for case in CASES if args.only is None or ":".join(case) == args.only]
    sites = args.sites.split(",")
    for role, what in cases:
        figures: dict[str, float] = {}
        answers: dict[str, bytes] = {}
        for site in sites:
            if args.callgrind:
                small = _callgrind(role, site, what, args.small, args.items)
                large = _callgrind(role, site, what, args.large, args.items)
                figures[site] = (large - small) / (args.large - args.small)
            else:
                best = []
                for _ in range(args.rounds):
                    with tempfile.TemporaryDirectory() as directory:
                        us, answers[site] = run(role, site == "lean", what, args.requests, directory, args.items)
                    best.append(us)
                figures[site] = min(best)
        unit = "instructions" if args.callgrind else "us CPU"
        shown = "  ".join(f"{'twisted.web' if site == 'twisted' else site} {figures[site]:,.1f}" for site in sites)
        change = f" ({figures['lean'] / figures['twisted'] - 1:+.1%})" if len(figures) == 2 else ""
        items = args.items if what == "apply" else 0
        each = f"; lean {figures['lean'] / items:,.1f} an item of {items}" if items and "lean" in figures else ""
        print(f"{role:7} {what:5}: {shown} {unit} a request{change}{each}", flush=True)
        if len(answers) == 2 and answers["twisted"].split(b"\r\n", 1)[0] != answers["lean"].split(b"\r\n", 1)[0]:
            print("   the answers differ: " + repr(answers))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
