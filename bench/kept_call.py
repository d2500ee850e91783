"""
One internal call over a kept connection, in process: C{Peers.call} (its deadline, the pool's
reuse of an idle connection, the request written, the answer parsed and delivered) over a
StringTransport answered at once, no sockets. What every quorum batch of a gateway costs its
caller beside the batch's own JSON.

    python bench/kept_call.py [--calls 20000] [--rounds 3]        # CPU us a call, best round
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python bench/kept_call.py --calls N

Instructions a call (callgrind): the difference of two counts (say 2,000 and 12,000 calls) over
the difference of their calls; PYTHONHASHSEED=0 keeps each count the same from run to run.
Prints figures only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from checkout import ensure_kvd_importable

BODY = b'{"items":[["key1","' + b"v" * 100 + b'","01a232b718df000000.gw"]]}'
LIVE = b'{"live":[true]}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(LIVE), LIVE)


def run(calls: int) -> float:
    """CPU us a call over C{calls} calls."""
    from twisted.internet.defer import succeed
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from kvd.transport import KeepAlivePool, Peers

    connections: list[tuple[Any, StringTransport]] = []

    def wire(origin: Any, protocol: Any) -> Any:
        transport = StringTransport()
        protocol.makeConnection(transport)
        connections.append((protocol, transport))
        return succeed(protocol)

    clock = Clock()
    peers = Peers(KeepAlivePool(clock, connect=wire), clock, 2.0)
    answers: list[Any] = []
    started = time.process_time()
    for _ in range(calls):
        peers.call("POST", "http://a.test:80/internal/apply", BODY, timeout=1.0).addBoth(answers.append)
        protocol, transport = connections[-1]
        transport.clear()
        protocol.dataReceived(ANSWER)
    used = time.process_time() - started
    if len(connections) != 1 or len(answers) != calls or any(getattr(a, "status", None) != 200 for a in answers):
        raise SystemExit(f"unexpected: {len(connections)} connections, {answers[:1]!r}")
    return used / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    kvd_dir = ensure_kvd_importable()
    best = min(run(args.calls) for _ in range(args.rounds))
    print(f"kvd from {kvd_dir}: {best:.1f} us CPU a call over a kept connection (best of {args.rounds})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
