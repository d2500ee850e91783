"""
Conditional writes: PUT with If-Match through a gateway (Paxos over the key's three owners:
prepare, accept, commit) against plain PUT (one replicated write) through the same gateway,
in the same run, at 32 connections, with CPU per request of all the cluster's processes.

Target (issue 10): conditional / plain >= 0.4 (Cassandra's LWT is about 0.25). Each
conditional PUT names ``If-Match: *`` on a preloaded key and the keys cycle, each wrk thread
on keys of its own, so the figure is
the cost of a round with no contention (contended rounds back off and retry: the gateway's
``kvd_cas_rounds_lost`` counts them, printed per measurement with the prepares and accepts
asked and the internal requests the nodes took, per request).

Both CPU-bound on a shared machine, the two figures move with whatever else runs: so the
two kinds alternate, ``--rounds`` times each in the same cluster, and the ratio reported is
the median of the rounds' ratios (with each side's median CPU per request).

    python bench/cas.py [--rounds 3] [--duration 10] [--keys 1000] [--profile DIR]

With ``--profile DIR`` the gateway and one node are sampled with py-spy during the last
If-Match measurement only (sampling slows them: that round's figures are lower).

With ``--in-process COUNT`` there are no processes: a gateway (the real proposer and node
clients) and three nodes (the real NodeAPI, store and acceptor, fsync off, journal written
at once) on the in-memory network of kvd/testing/network.py, one Clock, ``--width`` writes
at a time so the nodes' batches hold several items, as under load. It prints CPU µs per
write of each kind; under valgrind's callgrind the instructions per write, which the
machine's load does not move, are the difference of two runs over the difference of their
writes:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p python bench/cas.py \
        --in-process 200 --only If-Match   # and again with 1200; the same with --only plain
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from checkout import ensure_kvd_importable
from profiling import PySpy, add_profile_argument, summarize_profile
from report import machine, met, report_quiet
from servers import bench_processes, preload, wait_for_members
from wrk import run_wrk, write_lua

TARGET = 0.4

#: PUT /kv/<prefix><i> with a fixed body, each wrk thread on keys of its own (thread t of
#: T takes t, t + T, t + 2T, ...): with one counter per thread starting at random, as
#: bench/wrk.py's PUT_LUA, two threads drift into each other's keys now and then, and their
#: conditional writes then contend (a lost round, a pause, finishing the other's write).
OWN_KEYS_LUA = """\
local n = {n}
local step = {threads}
local i = 0
local body = string.rep("v", {size})
local threads = 0
setup = function(thread)
  thread:set("id", threads)
  threads = threads + 1
end
init = function(args)
  i = id or 0
end
request = function()
  i = (i + step) % n
  return wrk.format("PUT", "/kv/{prefix}" .. i, {headers}, body)
end
"""
THREADS = 2
PUT_LUA = OWN_KEYS_LUA.replace("{headers}", "nil")
CAS_LUA = OWN_KEYS_LUA.replace("{headers}", '{{["If-Match"] = "*"}}')


def cpu_times(pid: int) -> tuple[float, float]:
    """A process's (user, system) CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pids: list[int]) -> float:
    return sum(sum(cpu_times(pid)) for pid in pids)


def scrape(url: str) -> dict[str, float]:
    """The gateway's conditional-write counters, or a node's internal requests, from its /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found: dict[str, float] = {}
    for name in ("kvd_cas_rounds_lost", "kvd_cas_recovered", "kvd_cas_asked"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        if match:
            found[name] = float(match.group(1))
    found["internal"] = sum(
        float(m.group(1))
        for m in re.finditer(r'^kvd_http_requests_total\{[^}]*route="/internal/\*"[^}]*\} (\S+)$', text, re.M)
    )
    return found


class FakeNodes:
    """
    Stands for three nodes behind a gateway's transport (L{kvd.transport.Peers}' C{call}):
    applies, and prepares, accepts and commits with the acceptor's rules, over dicts; every
    answer waits for L{release}.
    """

    timeout = 5.0

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.held: dict[tuple[str, str], tuple[str | None, str]] = {}
        self.promised: dict[tuple[str, str], str] = {}
        self.accepted: dict[tuple[str, str], tuple[str | None, str]] = {}
        self.waiting: list[tuple[Any, Any]] = []

    def release(self) -> None:
        while self.waiting:
            waiting, self.waiting = self.waiting, []
            for d, answer in waiting:
                d.callback(answer)

    def _paxos(self, node: str, item: list[Any]) -> Any:
        at = (node, item[1])
        if item[0] == "p":
            promised = self.promised.get(at, "")
            if item[2] > promised:
                self.promised[at] = promised = item[2]
            held = self.held.get(at)
            return [promised == item[2], promised, None, None if held is None else [held[0] is not None, held[1]]]
        if item[0] == "a":
            if item[2] < self.promised.get(at, ""):
                return [False, self.promised[at]]
            self.promised[at], self.accepted[at] = item[2], (item[3], item[4])
            return [True, item[2]]
        value, version = self.accepted[at] if item[0] == "k" else (item[2], item[3])
        was = self.held.get(at)
        if was is None or was[1] < version:
            self.held[at] = (value, version)
        return [was is not None and was[0] is not None, self.held[at][1]]

    def call(self, method: str, url: str, body: bytes | None = None, **_: Any) -> Any:
        from twisted.internet.defer import Deferred

        from kvd.codec import wire_json, wire_loads
        from kvd.transport import Answer

        node = url.split("//", 1)[1].split(".", 1)[0]
        items = wire_loads(body or b"{}")["items"]
        if url.endswith("/internal/apply"):
            live = [(node, key) in self.held for key, _, _ in items]
            for key, value, version in items:
                self.held[node, key] = (value, version)
            answer: dict[str, Any] = {"live": live, "versions": [version for _, _, version in items]}
        else:
            answer = {"answers": [self._paxos(node, item) for item in items], "accepted_commits": True}
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, Answer(200, wire_json(answer))))
        return d


def gateway_only(count: int, width: int, only: str | None) -> None:
    """C{count} writes of each kind, C{width} at a time, through a real gateway over L{FakeNodes}."""
    import time

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from kvd.gateway import Cluster
    from kvd.gateway.cas import Proposer
    from kvd.gateway.coordinator import Coordinator
    from kvd.gateway.nodes import NodeClients
    from kvd.membership import NodeInfo
    from kvd.resources import GatewayAPI
    from kvd.versions import HybridClock
    from kvd.web import BoundedSite

    reactor = Clock()
    nodes_there = FakeNodes(reactor)
    cluster = Cluster(vnodes=64, replicas=3)
    cluster.update({n: NodeInfo(n, f"http://{n}.test:80") for n in "abc"})
    nodes = NodeClients(nodes_there)  # type: ignore[arg-type]
    hlc = HybridClock(Clock().seconds, "gw")
    proposer = Proposer(cluster, nodes, hlc, reactor)
    api = GatewayAPI(cluster, Coordinator(cluster, nodes, hlc), proposer=proposer)
    site = BoundedSite(api.resource(), metrics=api.metrics)
    clients = []
    for _ in range(width):
        channel = site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        clients.append((channel, transport))
    body = b"v" * 100

    def wave(first: int, headers: bytes) -> None:
        for i, (channel, _) in enumerate(clients):
            request = b"PUT /kv/key%d HTTP/1.1\r\nHost: gw\r\n%sContent-Length: %d\r\n\r\n%s"
            channel.dataReceived(request % ((first + i) % 1000, headers, len(body), body))
        nodes_there.release()
        for _, transport in clients:
            answer = transport.value()
            transport.clear()
            assert answer.startswith(b"HTTP/1.1 200"), answer[:300]

    for i in range(0, 1000, width):
        wave(i, b"")  # preload: every key live, so "If-Match: *" holds
    for name, headers in {"plain": b"", "If-Match": b"If-Match: *\r\n"}.items():
        if only is not None and name != only:
            continue
        wave(0, headers)
        sent = sum(nodes.sent.values())
        started = time.process_time()
        for i in range(0, count, width):
            wave(i, headers)
        per, internal = (time.process_time() - started) / count * 1e6, (sum(nodes.sent.values()) - sent) / count
        print(
            f"{name:9} {per:7.1f} us gateway CPU per write (in process, fake nodes, {width} at a time), "
            f"{internal:.2f} internal requests per write"
        )


def in_process(count: int, width: int, only: str | None) -> None:
    """C{count} writes of each kind (or C{only} one), C{width} at a time, in process; prints CPU per write."""
    import json
    import operator
    import time

    from twisted.internet.defer import Deferred, gatherResults
    from twisted.internet.task import Clock

    from kvd.gateway import Cluster
    from kvd.gateway.cas import Proposer
    from kvd.gateway.coordinator import Coordinator
    from kvd.gateway.nodes import NodeClients
    from kvd.membership import NodeInfo
    from kvd.paxos import Acceptor
    from kvd.resources import GatewayAPI, NodeAPI
    from kvd.store import Store
    from kvd.testing.network import Network
    from kvd.versions import HybridClock

    class FastClock(Clock):
        """Clock sorts its calls by a Python lambda at every advance (iosim advances at every pump): by a C key here."""

        def _sortCalls(self) -> None:
            self.calls.sort(key=by_time)

    by_time = operator.attrgetter("time")
    clock = FastClock()
    clock.advance(1_700_000_000)
    network = Network(clock)
    members = {n: NodeInfo(n, f"http://{n}.test") for n in ("a", "b", "c")}
    with tempfile.TemporaryDirectory(prefix="kvd-bench-cas-") as tmp:
        closing = []
        for node_id in members:
            store = Store.open(f"{tmp}/{node_id}", clock=HybridClock(clock.seconds, node_id), fsync=False)
            acceptor = Acceptor.in_store(store)  # as a node's: its records in the store's journal
            closing.append(store)
            network.serve(f"{node_id}.test", NodeAPI(node_id, store, acceptor=acceptor).resource())
        cluster = Cluster(vnodes=64, replicas=3)
        cluster.update(members)
        nodes = NodeClients(network.peers("gw", timeout=600.0))
        hlc = HybridClock(clock.seconds, "gw")
        proposer = Proposer(cluster, nodes, hlc, clock)
        network.serve("gw.test", GatewayAPI(cluster, Coordinator(cluster, nodes, hlc), proposer=proposer).resource())
        client = network.peers(timeout=600.0)
        body = b"v" * 100
        kinds = {"plain": b"", "If-Match": b"If-Match: *\r\n"}

        def wave(headers: bytes, first: int) -> None:
            done: list[Any] = []
            asked = [
                client.call("PUT", f"http://gw.test/kv/key{(first + i) % 1000}", body, headers=headers)
                for i in range(width)
            ]
            together: Deferred[Any] = gatherResults(asked)
            together.addBoth(done.append)
            while not done:
                network.flush()
                if not done:
                    clock.advance(0.001)
            answers = done[0]
            assert isinstance(answers, list), answers
            for answer in answers:
                assert answer.status == 200, (answer.status, json.loads(answer.body))

        for i in range(0, 1000, width):
            wave(b"", i)  # preload: every key live, so "If-Match: *" holds
        for name, headers in kinds.items():
            if only is not None and name != only:
                continue
            wave(headers, 0)  # connections open, caches warm
            sent = sum(nodes.sent.values())
            started = time.process_time()
            for i in range(0, count, width):
                wave(headers, i)
            used = time.process_time() - started
            per, internal = used / count * 1e6, (sum(nodes.sent.values()) - sent) / count
            print(
                f"{name:9} {per:7.1f} us CPU per write (in process, {count} writes, {width} at a time), "
                f"{internal:.2f} internal requests per write"
            )
        for store in closing:
            store.abandon()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each kind, alternating")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys written")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--in-process", type=int, default=0, metavar="COUNT", help="see above: no processes")
    parser.add_argument("--width", type=int, default=16, help="with --in-process: writes at a time")
    parser.add_argument("--only", choices=("plain", "If-Match"), default=None, help="with --in-process")
    parser.add_argument("--fake-nodes", action="store_true", help="with --in-process: the gateway alone")
    add_profile_argument(parser)
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    if args.in_process:
        (gateway_only if args.fake_nodes else in_process)(args.in_process, args.width, args.only)
        return
    print(machine())
    report_quiet()
    items = [(f"key{i}", "v" * 100) for i in range(args.keys)]
    ratios: list[float] = []
    cpu: dict[str, list[float]] = {"plain PUT": [], "If-Match PUT": []}
    with tempfile.TemporaryDirectory(prefix="kvd-bench-cas-") as tmp:
        workdir = Path(tmp)
        # A multiple of the threads, so that no two threads share a key.
        keys = {"n": args.keys - args.keys % THREADS, "prefix": "key", "size": 100, "threads": THREADS}
        plain_lua = write_lua(workdir, "put.lua", PUT_LUA, **keys)
        cas_lua = write_lua(workdir, "cas.lua", CAS_LUA, **keys)
        with bench_processes(workdir) as processes:
            registry = processes.registry().start()
            started = [registry]
            for number in range(1, 4):
                started.append(processes.node(f"node{number}", None, "--registry", registry.url).start())
            gateway = processes.gateway("--registry", registry.url).start()
            started.append(gateway)
            wait_for_members(gateway, 3, 30)
            assert gateway.port is not None
            preload(gateway.port, items)
            pids = [p.pid for p in started]
            roles = {"gateway": [gateway.pid], "nodes": [p.pid for p in started[1:4]]}
            for number in range(1, args.rounds + 1):
                results = {}
                for name, lua in (("plain PUT", plain_lua), ("If-Match PUT", cas_lua)):
                    before = cpu_seconds(pids)
                    split = {role: [cpu_times(pid) for pid in members] for role, members in roles.items()}
                    counted = [scrape(p.url) for p in started[1:5]]
                    profiled = args.profile is not None and number == args.rounds and lua == cas_lua
                    with contextlib.ExitStack() as spies:
                        if profiled:
                            Path(args.profile).mkdir(parents=True, exist_ok=True)
                            for label, pid in (("gateway", gateway.pid), ("node1", started[1].pid)):
                                spies.enter_context(PySpy(pid, Path(args.profile) / f"{label}.txt", args.duration))
                        result = run_wrk(gateway.url, lua, args.duration, threads=THREADS, connections=args.connections)
                    used = cpu_seconds(pids) - before
                    results[name] = result
                    per = 1e6 / max(1, result.requests)
                    cpu[name].append(per * used)
                    print(
                        f"round {number} {name:13} {result.rps:9.0f} req/s   p99 {result.p99_ms:7.2f} ms   "
                        f"CPU {per * used:7.0f} us/request (all processes)"
                    )
                    for role, members in roles.items():
                        now = [cpu_times(pid) for pid in members]
                        user = sum(after[0] - was[0] for after, was in zip(now, split[role], strict=True))
                        system = sum(after[1] - was[1] for after, was in zip(now, split[role], strict=True))
                        print(
                            f"{'':21}   {role:8} user {per * user:6.0f} us  system {per * system:6.0f} us  per request"
                        )
                    after = [scrape(p.url) for p in started[1:5]]
                    internal = sum(a["internal"] - b["internal"] for a, b in zip(after[:3], counted[:3], strict=True))
                    gw_after, gw_before = after[3], counted[3]
                    lost = gw_after.get("kvd_cas_rounds_lost", 0) - gw_before.get("kvd_cas_rounds_lost", 0)
                    recovered = gw_after.get("kvd_cas_recovered", 0) - gw_before.get("kvd_cas_recovered", 0)
                    asked = gw_after.get("kvd_cas_asked", 0) - gw_before.get("kvd_cas_asked", 0)
                    requests = max(1, result.requests)
                    print(
                        f"{'':21}   internal requests {internal / requests:5.2f}/request (3 nodes)   "
                        f"rounds lost {lost:.0f}  recovered {recovered:.0f}  "
                        f"prepares+accepts {asked / requests:4.2f}/request"
                    )
                if args.profile is not None and number == args.rounds:
                    for label in ("gateway", "node1"):
                        print(
                            "\n".join("    " + line for line in summarize_profile(Path(args.profile) / f"{label}.txt"))
                        )
                ratio = results["If-Match PUT"].rps / results["plain PUT"].rps
                ratios.append(ratio)
                print(f"round {number} conditional / plain {ratio:.2f}")
    ratio = statistics.median(ratios)
    print(
        f"median CPU us/request: plain {statistics.median(cpu['plain PUT']):.0f}, "
        f"If-Match {statistics.median(cpu['If-Match PUT']):.0f}"
    )
    print(
        f"conditional / plain, median of {len(ratios)}: {ratio:.2f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})   target >= {TARGET}   {met(ratio, TARGET)}"
    )


if __name__ == "__main__":
    main()
