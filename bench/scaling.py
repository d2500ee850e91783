"""
The measurements behind docs/scaling.md: what kvd's parts cost at 10, 100 and 1,000 nodes.

1. ring: ``Ring`` with 4000 vnodes a node at each --ring-nodes size: construction time (a
   gateway builds it on the reactor whenever ids or weights change), memory (tracemalloc:
   after construction, and once every segment's 3-node preference list has been filled in,
   which is where a ring serving many keys ends up), and preference_list(key, 3) lookups/s on
   segments already seen (warm) and on keys never asked before (cold).
2. membership: the JSON a registry's GET /registry/nodes answers (what every gateway's long
   poll gets back on each change, and every LONG_POLL_SECONDS when nothing changes) at each
   --ring-nodes size, the body a node's heartbeat sends, and the registry's CPU per heartbeat
   and per listing (kvd.registry + the JSON encoding, no HTTP).
3. repair: the deterministic simulation (kvd.testing.network: the production transport, the
   real NodeAPI resources, Stores on disk with fsync off, the gateway's Repairer, one Clock):
   --sim-nodes nodes holding --sim-keys keys (N=3), then one node joins; every sweep until the
   cluster is settled is timed (CPU of this one process: gateway and nodes together) and its
   bytes counted on the in-memory wire, with and without a throttle (--throttle ranges per
   sweep). Also the sweep with nothing changed (digests only).

    python bench/scaling.py [--ring-nodes 10,100,1000] [--sim-nodes 10] [--sim-keys 100000]
                            [--throttle 32] [--only rmx]

Prints figures only; nothing asserts on a timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import secrets
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from checkout import code_version, ensure_kvd_importable
from report import machine, report_quiet

ensure_kvd_importable()

from twisted.internet.defer import Deferred  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.test.iosim import FakeTransport  # noqa: E402

from kvd.gateway.cluster import Cluster  # noqa: E402
from kvd.gateway.nodes import NodeClients  # noqa: E402
from kvd.gateway.repair import Repairer  # noqa: E402
from kvd.membership import LONG_POLL_SECONDS, NodeInfo  # noqa: E402
from kvd.registry import Registry  # noqa: E402
from kvd.resources import NodeAPI  # noqa: E402
from kvd.ring import DEFAULT_VNODES, Ring  # noqa: E402
from kvd.store import Store  # noqa: E402
from kvd.testing.network import Network  # noqa: E402
from kvd.transport import DEFAULT_MAX_ANSWER  # noqa: E402
from kvd.versions import HybridClock  # noqa: E402
from kvd.web import json_body  # noqa: E402

REPLICAS = 3


def node_ids(count: int) -> list[str]:
    return [f"node-{i:04d}" for i in range(count)]


def node_url(i: int) -> str:
    """A realistic member URL: a private address and the node port."""
    return f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8001"


# --- 1. the ring --------------------------------------------------------------------------------


def ring_figures(count: int, lookups: int) -> None:
    weights = dict.fromkeys(node_ids(count), 1)
    gc.collect()
    started = time.perf_counter()
    ring = Ring(weights, vnodes=DEFAULT_VNODES)
    build = time.perf_counter() - started
    del ring
    gc.collect()
    tracemalloc.start()
    ring = Ring(weights, vnodes=DEFAULT_VNODES)
    built, _ = tracemalloc.get_traced_memory()
    points = count * DEFAULT_VNODES
    for segment in range(points):
        ring._preference(segment, REPLICAS)
    filled, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del ring
    gc.collect()
    ring = Ring(weights, vnodes=DEFAULT_VNODES)
    keys = [f"user:{random.getrandbits(64):016x}" for _ in range(lookups)]
    preference = ring.preference_list
    started = time.perf_counter()
    for key in keys:
        preference(key, REPLICAS)
    cold = lookups / (time.perf_counter() - started)
    started = time.perf_counter()
    for key in keys:
        preference(key, REPLICAS)
    warm = lookups / (time.perf_counter() - started)
    print(
        f"ring {count:5} nodes, {points:9,} points: build {build:6.2f} s   memory {built / 2**20:7.1f} MiB built, "
        f"{filled / 2**20:7.1f} MiB with every 3-node list filled   preference_list(k, 3): "
        f"{cold:9,.0f}/s cold, {warm:9,.0f}/s warm"
    )


# --- 2. membership ------------------------------------------------------------------------------


def membership_figures(count: int) -> None:
    registry = Registry(ttl=10.0)
    bodies = []
    for i, node_id in enumerate(node_ids(count)):
        body = {"url": node_url(i), "weight": 1, "incarnation": 1_700_000_000_000 + i}
        bodies.append(body)
        registry.register(node_id, body, 0.0)
    listing = json_body({"success": True, **registry.snapshot(), "ttl": registry.ttl, "epoch": secrets.token_hex(8)})
    heartbeat = json_body(bodies[0])
    rounds = max(1, 20_000 // count)
    started = time.process_time()
    for r in range(rounds):
        for i, node_id in enumerate(node_ids(count)):
            registry.register(node_id, bodies[i], 1.0 + r * 0.001)
    renew_us = (time.process_time() - started) / (rounds * count) * 1e6
    assert registry.index == 1 + count, "a plain renewal moved the index"
    started = time.process_time()
    for _ in range(rounds):
        json_body({"success": True, **registry.snapshot(), "ttl": registry.ttl, "epoch": "0" * 16})
    listing_us = (time.process_time() - started) / rounds * 1e6
    print(
        f"membership {count:5} nodes: listing {len(listing):9,} B ({len(listing) / count:.0f} B a member), "
        f"heartbeat body {len(heartbeat)} B; registry CPU: {renew_us:5.1f} us a renewal, "
        f"{listing_us:8.0f} us a listing; renewals moved the index: no (index {registry.index} after "
        f"{rounds} renewals of each); an idle long poll answers every {LONG_POLL_SECONDS:g} s"
    )


# --- 3. repair in the simulation ----------------------------------------------------------------


class Wire:
    """Bytes written on every in-memory connection, counted by wrapping FakeTransport.write."""

    def __init__(self) -> None:
        self.bytes = 0
        original = FakeTransport.write

        def write(transport: Any, data: bytes) -> None:
            self.bytes += len(data)
            original(transport, data)

        FakeTransport.write = write  # type: ignore[method-assign]


class Simulation:
    keys = 0

    def __init__(
        self, workdir: Path, count: int, wire: Wire, throttle: int | None, max_answer: int = DEFAULT_MAX_ANSWER
    ) -> None:
        self.workdir = workdir
        self.wire = wire
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.network = Network(self.clock)
        peers = self.network.peers(timeout=600.0, max_answer=max_answer)
        self.cluster = Cluster(vnodes=DEFAULT_VNODES, replicas=REPLICAS)
        self.stores: dict[str, Store] = {}
        self.members: dict[str, NodeInfo] = {}
        for node_id in node_ids(count):
            self.add_store(node_id)
        self.cluster.update(self.members, quiet=True)
        options: dict[str, Any] = {} if throttle is None else {"ranges_per_sweep": throttle}
        self.repairer = Repairer(self.cluster, NodeClients(peers), self.clock.seconds, **options)

    def add_store(self, node_id: str) -> None:
        store = Store.open(str(self.workdir / node_id), clock=HybridClock(self.clock.seconds, node_id), fsync=False)
        self.stores[node_id] = store
        host = f"{node_id}.test"
        self.network.serve(host, NodeAPI(node_id, store).resource())
        self.members[node_id] = NodeInfo(node_id, f"http://{host}")

    def load(self, keys: int) -> None:
        self.keys = keys
        versions = HybridClock(self.clock.seconds, "gw")
        value = "v" * 100
        for i in range(keys):
            key = f"key{i}"
            version = versions.next()
            for owner in self.cluster.owners(key):
                self.stores[owner].apply(key, value, version)

    def overwrite(self, count: int) -> None:
        """C{count} writes of existing keys at their owners, as a client load between two sweeps would make."""
        versions = HybridClock(self.clock.seconds, "gw2")
        for i in random.sample(range(self.keys), count):
            key = f"key{i}"
            version = versions.next()
            for owner in self.cluster.owners(key):
                self.stores[owner].apply(key, "w" * 100, version)

    def join(self, node_id: str) -> None:
        self.add_store(node_id)
        self.cluster.update(self.members, quiet=True)

    def sweep(self) -> tuple[float, int]:
        """One sweep run to its end: (CPU seconds, bytes on the wire)."""
        before_bytes = self.wire.bytes
        started = time.process_time()
        done: list[object] = []
        Deferred.fromCoroutine(self.repairer.sweep()).addBoth(done.append)
        for _ in range(10_000):
            self.network.flush(100_000)
            if done:
                break
            self.clock.advance(0)
        assert done, "a sweep did not finish"
        self.clock.advance(2.0)  # the default repair interval
        return time.process_time() - started, self.wire.bytes - before_bytes

    def settle(self, label: str, limit: int = 1000) -> None:
        """Sweep until a sweep finds nothing to do; print each sweep and the totals."""
        progress = self.repairer.progress
        total_cpu, total_bytes, sweeps = 0.0, 0, 0
        while sweeps < limit:
            checked, sent, dropped = progress.ranges_checked, progress.sent, progress.dropped
            cpu, wire = self.sweep()
            sweeps += 1
            total_cpu += cpu
            total_bytes += wire
            if progress.last_error:
                print(f"    sweep {sweeps}: ERROR {progress.last_error}")
                break
            changed = progress.ranges_checked - checked
            if sweeps <= 3 or changed == 0:
                print(
                    f"    sweep {sweeps:3}: {changed:3} ranges, sent {progress.sent - sent:7,}, dropped "
                    f"{progress.dropped - dropped:7,}, CPU {cpu:7.3f} s, wire {wire / 2**20:8.2f} MiB"
                )
            if changed == 0:
                break
        print(
            f"  {label}: {sweeps} sweeps, CPU {total_cpu:.2f} s, wire {total_bytes / 2**20:.1f} MiB, "
            f"sent {progress.sent:,}, dropped {progress.dropped:,}"
        )

    def close(self) -> None:
        for store in self.stores.values():
            store.abandon()


def answer_cap(count: int, keys: int, max_answer: int, wire: Wire) -> None:
    """The first full sweep with the gateway's answer cap at C{max_answer} bytes: does it finish?"""
    print(
        f"repair: {count} nodes, {keys:,} keys, answers capped at {max_answer:,} B (production: {DEFAULT_MAX_ANSWER:,})"
    )
    with tempfile.TemporaryDirectory(prefix="kvd-bench-scaling-") as tmp:
        sim = Simulation(Path(tmp), count, wire, None, max_answer)
        try:
            sim.load(keys)
            sim.settle("first pass", limit=3)
        finally:
            sim.close()


def repair_figures(count: int, keys: int, throttle: int | None, wire: Wire) -> None:
    label = "no throttle (256 ranges a sweep)" if throttle is None else f"throttle {throttle} ranges a sweep"
    print(f"repair: {count} nodes, {keys:,} keys x {REPLICAS} replicas, one node joins; {label}")
    with tempfile.TemporaryDirectory(prefix="kvd-bench-scaling-") as tmp:
        sim = Simulation(Path(tmp), count, wire, throttle)
        try:
            started = time.process_time()
            sim.load(keys)
            print(f"  loaded in {time.process_time() - started:.1f} s CPU")
            sim.settle("first pass (every range, nothing to move)")
            cpu, wire_bytes = sim.sweep()
            print(f"  a sweep with nothing changed: CPU {cpu * 1000:.1f} ms, wire {wire_bytes / 1024:.1f} KiB")
            for writes in (100, 1000):
                sim.overwrite(writes)
                checked = sim.repairer.progress.ranges_checked
                cpu, wire_bytes = sim.sweep()
                print(
                    f"  a sweep after {writes} client writes: {sim.repairer.progress.ranges_checked - checked} "
                    f"ranges re-listed, CPU {cpu * 1000:.0f} ms, wire {wire_bytes / 2**20:.2f} MiB"
                )
                sim.settle("  and until settled")
            joiner = f"node-{count:04d}"
            sim.join(joiner)
            sim.settle(f"after {joiner} joins")
            held = len(sim.stores[joiner])
            print(
                f"  {joiner} holds {held:,} keys = {held / keys:.3f} of all keys "
                f"(x {REPLICAS} replicas / {count + 1} nodes = {REPLICAS / (count + 1):.3f})"
            )
            per_owner = sum(len(store) for store in sim.stores.values())
            print(f"  replicas held in all: {per_owner:,} (expected {keys * REPLICAS:,})")
        finally:
            sim.close()


# --- 4. a sweep's parts, each timed alone -------------------------------------------------------


def sweep_parts(count: int, keys: int, node_keys: int) -> None:
    """
    A full sweep's work without the simulator: a node listing its versions (every range, and 32
    of 256), the JSON both ways, and the gateway's reconciliation of C{keys} keys placed on
    C{count} nodes when every replica already agrees (nothing to push or drop).
    """
    with tempfile.TemporaryDirectory(prefix="kvd-bench-parts-") as tmp:
        clock = Clock()
        clock.advance(1_700_000_000)
        store = Store.open(str(Path(tmp) / "n"), clock=HybridClock(clock.seconds, "n"), fsync=False)
        try:
            versions = HybridClock(clock.seconds, "gw")
            for i in range(node_keys):
                store.apply(f"key{i}", "v" * 100, versions.next())
            started = time.process_time()
            listing, dead = store.versions_in(range(256))
            list_all = time.process_time() - started
            started = time.process_time()
            store.versions_in(range(32))
            list_32 = time.process_time() - started
            started = time.process_time()
            body = json_body({"success": True, "versions": listing, "tombstones": dead})
            encode = time.process_time() - started
            started = time.process_time()
            json.loads(body)
            decode = time.process_time() - started
            gc.collect()
            tracemalloc.start()
            parsed = json.loads(body)
            held, _ = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del parsed
        finally:
            store.abandon()
    per = 1e6 / node_keys
    print(
        f"node side, {node_keys:,} keys held: versions_in(all 256 ranges) {list_all * per:.2f} us a key, "
        f"versions_in(32 ranges) {list_32 * per:.2f} us a key held; answer {len(body) / node_keys:.1f} B a key, "
        f"JSON encode {encode * per:.2f} us, decode {decode * per:.2f} us a key; the decoded listing holds "
        f"{held / node_keys:.0f} B a key in the gateway"
    )
    ids = node_ids(count)
    cluster = Cluster(vnodes=DEFAULT_VNODES, replicas=REPLICAS)
    cluster.update({i: NodeInfo(i, f"http://{i}.test") for i in ids}, quiet=True)
    view = cluster.view()
    listings: dict[str, dict[str, str]] = {i: {} for i in ids}
    versions = HybridClock(clock.seconds, "gw")
    for k in range(keys):
        key, version = f"key{k}", versions.next()
        for owner in view.owners(key):
            listings[owner][key] = version
    repairer = Repairer(cluster, NodeClients(Network(clock).peers()), clock.seconds)
    done: list[object] = []
    started = time.process_time()
    Deferred.fromCoroutine(repairer._reconcile(view, {}, listings, set(), {})).addBoth(done.append)
    reconcile = time.process_time() - started
    assert done == [None], done
    print(
        f"gateway side, {count:5} nodes, {keys:,} keys: reconcile {reconcile / keys * 1e6:6.2f} us a key "
        f"({reconcile / keys / count * 1e9:.0f} ns a key and member)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ring-nodes", default="10,100,1000", help="ring and membership sizes, comma-separated")
    parser.add_argument("--lookups", type=int, default=200_000)
    parser.add_argument("--sim-nodes", type=int, default=10)
    parser.add_argument("--sim-keys", type=int, default=100_000)
    parser.add_argument("--throttle", type=int, default=32, help="ranges a sweep in the throttled run (0: skip it)")
    parser.add_argument(
        "--max-answer",
        type=int,
        default=0,
        help="also run the first sweep with the gateway's answer cap at this many bytes (0: skip), to see "
        "where a node's versions listing outgrows it",
    )
    parser.add_argument("--parts-keys", type=int, default=100_000, help="keys held by the node timed in p")
    parser.add_argument(
        "--only", default="rmpx", help="r: ring, m: membership, p: a sweep's parts, x: repair simulation"
    )
    args = parser.parse_args()
    kvd_dir = ensure_kvd_importable()
    print(f"kvd from {kvd_dir} ({code_version(kvd_dir)})")
    print(machine())
    report_quiet()
    sizes = [int(n) for n in args.ring_nodes.split(",")]
    if "m" in args.only:
        for count in sizes:
            membership_figures(count)
    if "r" in args.only:
        for count in sizes:
            ring_figures(count, args.lookups)
    if "p" in args.only:
        for count in sizes:
            sweep_parts(count, min(100_000, 10_000_000 // count), args.parts_keys)
    if "x" in args.only:
        wire = Wire()
        repair_figures(args.sim_nodes, args.sim_keys, None, wire)
        if args.throttle:
            repair_figures(args.sim_nodes, args.sim_keys, args.throttle, wire)
        if args.max_answer:
            answer_cap(args.sim_nodes, args.sim_keys, args.max_answer, wire)


if __name__ == "__main__":
    main()
