"""
The reactor stall a membership change costs a gateway: the longest gap between 1 ms ticks of
a real reactor while a L{kvd.gateway.Cluster} takes a membership whose ring must be built,
with the ring built on the reactor (as before) and on the reactor's threads (as a gateway
does now), in the same run.

    python bench/ring_stall.py [--nodes 100] [--vnodes 4000]

Prints figures only.
"""

from __future__ import annotations

import argparse
import time

from checkout import ensure_kvd_importable
from report import machine
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool

from kvd.gateway import Cluster
from kvd.membership import NodeInfo
from kvd.store import synchronous


async def stall(cluster: Cluster, members: dict[str, NodeInfo]) -> tuple[float, float]:
    """(seconds until the new view is in use, longest gap between reactor ticks) for one update."""
    gaps = [0.0]
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps[0] = max(gaps[0], now - last[0])
        last[0] = now

    ticker = task.LoopingCall(tick)
    ticker.start(0.001)
    await task.deferLater(reactor, 0.05, lambda: None)
    gaps[0], last[0] = 0.0, time.perf_counter()
    started = time.perf_counter()
    cluster.update(members)
    while set(cluster.view().members) != set(members):
        await task.deferLater(reactor, 0.001, lambda: None)
    taken = time.perf_counter() - started
    await task.deferLater(reactor, 0.01, lambda: None)
    ticker.stop()
    return taken, gaps[0]


async def main(nodes: int, vnodes: int) -> None:
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    members = {f"node-{i:04}": NodeInfo(f"node-{i:04}", f"http://10.0.0.{i % 250}:8001") for i in range(nodes)}
    joined = dict(members, joiner=NodeInfo("joiner", "http://10.0.1.1:8001"))
    pool = reactor.getThreadPool()  # type: ignore[attr-defined]
    for name, run in (("on the reactor", synchronous), ("on a thread", lambda f: deferToThreadPool(reactor, pool, f))):
        cluster = Cluster(vnodes=vnodes, replicas=3, run=run)
        await stall(cluster, members)
        taken, gap = await stall(cluster, joined)
        print(
            f"ring built {name:15}  one join at {nodes} nodes: new view after {taken:6.2f} s, "
            f"longest reactor stall {gap * 1000:7.1f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--vnodes", type=int, default=4000)
    args = parser.parse_args()
    done: Deferred[None] = ensureDeferred(main(args.nodes, args.vnodes))
    done.addErrback(lambda f: print(f.getTraceback())).addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
