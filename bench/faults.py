"""
Faults production clusters see, measured as issue 9's table does: a registry, three nodes and
a gateway, each its own process (N=3 W=2 R=2), wrk -c16 against the gateway; for each fault,
GET and PUT healthy and then with the fault, in one run, and the ratios against the targets:

    throughput with the fault >= 0.7 x healthy, p99 <= 3 x healthy, 0 errors.

Rows (each a function below, listed in ROWS; add a fault by adding one):

    sigstop   one node hung: SIGSTOP (its socket still accepts, nothing answers), SIGCONT after
    kill9     one node killed (kill -9), within its lease: a sequential client's read latency
              (one kept-alive connection), healthy vs after the kill; no wrk
    partition one node cut off from the gateway (iptables DROP of TCP to its port) while it
              renews its lease: wrk healthy vs cut, and how long after healing the writes made
              during the cut take to reach the node (its own /kv/); needs root and iptables
    skew      a gateway under faketime +1h writes 120 keys, then a normal one overwrites 100
              and deletes 20: lost and undone counts (read through both); needs faketime
    down20    one node killed (kill -9) for 20 s (past its lease): keys whose owners changed,
              writes during the outage, how long until it holds them after its restart
    registry  two registries, one killed: requests through the gateway and a node joining after

    python bench/faults.py [--duration 5] [--rows sigstop]

Needs wrk (apt-get install -y wrk). Every process is stopped at the end, a stopped node is
continued first. Timings only print; nothing asserts on them.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from attrs import frozen
from checkout import ensure_kvd_importable
from report import machine, met, report_quiet
from servers import Kvd, Processes, bench_processes, preload, request, wait_for_members
from wrk import GET_LUA, PUT_LUA, WrkResult, run_wrk, write_lua

from kvd.testing.clocks import faketime_launcher, faketime_unavailable
from kvd.testing.firewall import Firewall, iptables_unavailable
from kvd.testing.processes import free_port, http_request, listen_on

THROUGHPUT_TARGET = 0.7
P99_TARGET = 3.0
KEYS = 1000
CONNECTIONS = 16


class FaultCluster:
    """A registry, nodes a, b and c and a gateway (N=3 W=2 R=2), each its own process."""

    def __init__(self, stack: ExitStack, workdir: Path, ttl: float, registries: int = 1) -> None:
        self.workdir = workdir
        self.processes: Processes = stack.enter_context(bench_processes(workdir))
        self.registries = [
            self.processes.registry("--ttl", f"{ttl:g}", name=f"registry{n}").start() for n in range(registries)
        ]
        self.registry = self.registries[0]
        self.listed = [arg for r in self.registries for arg in ("--registry", r.url)]
        self.nodes: dict[str, Kvd] = {
            node_id: self.processes.node(node_id, None, *self.listed).start() for node_id in ("a", "b", "c")
        }
        self.gateway = self.processes.gateway(
            *self.listed,
            *("--replicas", "3", "--write-quorum", "2", "--read-quorum", "2"),
        ).start()
        wait_for_members(self.gateway, 3, 60)
        assert self.gateway.port is not None
        self.port = self.gateway.port
        self.url = f"http://127.0.0.1:{self.port}"
        preload(self.port, [(f"key{i}", "v" * 100) for i in range(KEYS)])
        self.get_lua = write_lua(workdir, "get.lua", GET_LUA, n=KEYS, prefix="key")
        self.put_lua = write_lua(workdir, "put.lua", PUT_LUA, n=KEYS, prefix="key", size=100)

    def load(self, duration: float) -> tuple[WrkResult, WrkResult]:
        """GET, then PUT, for C{duration} seconds each."""
        return (
            run_wrk(self.url, self.get_lua, duration, connections=CONNECTIONS),
            run_wrk(self.url, self.put_lua, duration, connections=CONNECTIONS),
        )

    def reachable(self) -> dict[str, bool]:
        return {n["id"]: bool(n.get("reachable", True)) for n in request(self.port, "GET", "/cluster")[1]["nodes"]}


@frozen
class Figures:
    """One fault's run: healthy and faulty GET and PUT, and notes."""

    fault: str
    healthy: tuple[WrkResult, WrkResult]
    faulty: tuple[WrkResult, WrkResult]
    notes: tuple[str, ...] = ()


def errors(result: WrkResult) -> int:
    """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
    return result.non2xx + sum(int(n) for n in re.findall(r"\d+", result.socket_errors))


def show(figures: Figures) -> None:
    print(f"\n{figures.fault}")
    print(f"  {'':5} {'healthy req/s':>14} {'p99 ms':>8}   {'faulty req/s':>13} {'p99 ms':>8} {'errors':>7}")
    for method, healthy, faulty in zip(("GET", "PUT"), figures.healthy, figures.faulty, strict=True):
        throughput = faulty.rps / healthy.rps if healthy.rps else 0.0
        p99 = faulty.p99_ms / healthy.p99_ms if healthy.p99_ms else float("inf")
        print(
            f"  {method:5} {healthy.rps:14.0f} {healthy.p99_ms:8.2f}   {faulty.rps:13.0f} {faulty.p99_ms:8.2f}"
            f" {errors(faulty):7d}"
        )
        print(
            f"        throughput {throughput:5.2f} x  target >= {THROUGHPUT_TARGET}"
            f"  {met(throughput, THROUGHPUT_TARGET)};"
            f"  p99 {p99:5.2f} x  target <= {P99_TARGET:g}  {met(p99, P99_TARGET, at_least=False)};"
            f"  errors {errors(faulty)}  target 0  {'MET' if errors(faulty) == 0 else 'MISSED'}"
        )
    for note in figures.notes:
        print(f"  {note}")


@contextmanager
def stopped(process: Kvd) -> Iterator[None]:
    """C{process} hung (SIGSTOP) inside the block, continued (SIGCONT) after it, whatever happens."""
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


# The rows: each takes the cluster and the seconds per wrk run, applies its fault and undoes it.


def sigstop(cluster: FaultCluster, duration: float) -> Figures:
    """One node hung (SIGSTOP) while wrk runs; continued after."""
    healthy = cluster.load(duration)
    with stopped(cluster.nodes["b"]):
        faulty = cluster.load(duration)
        judged = cluster.reachable()
    started = time.monotonic()
    while not all(cluster.reachable().values()) and time.monotonic() - started < 30:
        time.sleep(0.05)
    back = time.monotonic() - started
    return Figures(
        "one node hung (SIGSTOP: TCP accepts, nothing answers)",
        healthy,
        faulty,
        (
            f"gateway's view while hung: {judged}",
            f"reachable again {back:.2f} s after SIGCONT"
            if all(cluster.reachable().values())
            else "NOT reachable again",
        ),
    )


def kill9(cluster: FaultCluster, duration: float) -> Figures | None:
    """One node killed (kill -9): a sequential client's reads, before the registry drops its lease."""
    healthy = sequential_reads(cluster.port, duration)
    cluster.nodes["b"].kill()
    killed = sequential_reads(cluster.port, duration)
    print("\none node killed (kill -9), a sequential client's GETs while the lease runs")
    for name, (latencies, failed) in (("healthy", healthy), ("b killed", killed)):
        ordered = sorted(latencies)
        print(
            f"  {name:9} {len(ordered):6d} reads  median {1000 * ordered[len(ordered) // 2]:7.2f} ms"
            f"  p99 {1000 * ordered[int(len(ordered) * 0.99)]:7.2f} ms  max {1000 * ordered[-1]:7.2f} ms"
            f"  failed {failed}"
        )
    print(f"  gateway's view: {cluster.reachable()}")
    return None


def sequential_reads(port: int, duration: float) -> tuple[list[float], int]:
    """GETs one after another over one kept-alive connection for C{duration} seconds: latencies, failures."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    latencies, failed, i = [], 0, 0
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            started = time.monotonic()
            connection.request("GET", f"/kv/key{i % KEYS}")
            response = connection.getresponse()
            response.read()
            latencies.append(time.monotonic() - started)
            failed += response.status != 200
            i += 1
    finally:
        connection.close()
    return latencies, failed


def node_holds(node: Kvd, expected: dict[str, str]) -> bool:
    """Whether C{node}'s own /kv/ answers every key of C{expected} with its value."""
    assert node.port is not None
    for key, value in expected.items():
        status, body = request(node.port, "GET", f"/kv/{key}")
        if status != 200 or body.get("value") != value:
            return False
    return True


def seconds_until(check: Callable[[], bool], limit: float = 60.0) -> float | None:
    """Seconds until C{check} holds (polled), or None if it does not within C{limit}."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    return None


def timed(seconds: float | None, target: float) -> str:
    if seconds is None:
        return "never (MISSED)"
    return f"{seconds:.2f} s  target <= {target:g} s  {'MET' if seconds <= target else 'MISSED'}"


def partition(cluster: FaultCluster, duration: float) -> Figures | None:
    """One node cut off from the gateway (iptables) while wrk runs; healed after."""
    why = iptables_unavailable()
    if why is not None:
        print(f"\npartition: skipped, {why}")
        return None
    cut = cluster.nodes["b"]
    assert cut.port is not None
    healthy = cluster.load(duration)
    written: dict[str, str] = {}
    with Firewall() as wall:
        wall.cut(cut.port)
        faulty = cluster.load(duration)
        judged = cluster.reachable()
        for i in range(200):
            if request(cluster.port, "PUT", f"/kv/cut{i}", b"during the cut")[0] == 200:
                written[f"cut{i}"] = "during the cut"
        wall.heal()
        caught_up = seconds_until(lambda: node_holds(cut, written), 60)
    return Figures(
        "one node cut off from the gateway (iptables DROP on its port), its lease still renewed",
        healthy,
        faulty,
        (
            f"gateway's view while cut: {judged}; registry: {statuses(cluster.registry.port)}",
            f"{len(written)} of 200 writes acknowledged during the cut; on b after healing: {timed(caught_up, 30)}",
        ),
    )


def statuses(port: int | None) -> dict[str, str]:
    assert port is not None
    return {n["id"]: n["status"] for n in request(port, "GET", "/registry/nodes")[1]["nodes"]}


def skew(cluster: FaultCluster, duration: float) -> None:
    """A gateway an hour ahead (faketime) writes; a normal one overwrites and deletes: lost, undone."""
    why = faketime_unavailable()
    if why is not None:
        print(f"\nskew: skipped, {why}")
        return
    port = free_port()
    ahead = cluster.processes.kvd(
        "gateway-ahead",
        *("--role", "gateway", *cluster.listed, "--listen", listen_on(port)),
        port=port,
        launcher=faketime_launcher("+1h"),
    ).start()
    wait_for_members(ahead, 3, 60)
    for i in range(120):
        request(port, "PUT", f"/kv/skew{i}", b"ahead")
    acknowledged = sum(request(cluster.port, "PUT", f"/kv/skew{i}", b"later")[0] == 200 for i in range(100))
    deleted = sum(request(cluster.port, "DELETE", f"/kv/skew{i}")[0] in (200, 204) for i in range(100, 120))
    lost = undone = 0
    for gateway_port in (cluster.port, port):
        lost += sum(request(gateway_port, "GET", f"/kv/skew{i}")[1].get("value") != "later" for i in range(100))
        undone += sum(request(gateway_port, "GET", f"/kv/skew{i}")[0] != 404 for i in range(100, 120))
    metric = re.search(r"^kvd_clock_skew_seconds\S* (\S+)$", http_request(port, "GET", "/metrics").body.decode(), re.M)
    print("\na gateway 1 h ahead (faketime +1h) writes 120 keys; a normal gateway then overwrites 100, deletes 20")
    print(f"  overwrites acknowledged {acknowledged}, deletes acknowledged {deleted}")
    print(f"  lost {lost} (read through both gateways)  target 0  {'MET' if lost == 0 else 'MISSED'}")
    print(f"  undone {undone} (read through both gateways)  target 0  {'MET' if undone == 0 else 'MISSED'}")
    print(f"  the skewed gateway's kvd_clock_skew_seconds {metric.group(1) if metric else 'absent'}")


def down20(cluster: FaultCluster, duration: float) -> None:
    """One node killed for 20 s, past its lease: owners unchanged, writes during, catch-up after."""
    keys = [f"key{i}" for i in range(0, KEYS, 10)]

    def owners() -> dict[str, list[str]]:
        return {key: request(cluster.port, "GET", f"/cluster/owners/{key}")[1]["nodes"] for key in keys}

    before = owners()
    down = cluster.nodes["b"]
    down.kill()
    killed = time.monotonic()
    moved: set[str] = set()
    written: dict[str, str] = {}
    attempted = failures = 0
    while time.monotonic() - killed < 20:
        for key in keys:
            attempted += 1
            if request(cluster.port, "PUT", f"/kv/{key}", b"while b was down")[0] == 200:
                written[key] = "while b was down"
            else:
                failures += 1
        now = owners()
        moved |= {key for key in keys if now[key] != before[key]}
    registry_saw = statuses(cluster.registry.port)["b"]
    down.start()
    caught_up = seconds_until(lambda: node_holds(down, written), 60)
    moved |= {key for key, o in owners().items() if o != before[key]}
    print("\none node down 20 s (kill -9, past its lease), then restarted")
    print(f"  registry's view of b while down: {registry_saw}")
    print(
        f"  sampled keys whose owners changed {len(moved)} of {len(keys)}  target 0  {'MET' if not moved else 'MISSED'}"
    )
    print(f"  writes during the outage {attempted}, failed {failures}  target 0  {'MET' if not failures else 'MISSED'}")
    print(f"  {len(written)} keys written while down on b after its restart: {timed(caught_up, 30)}")


def registry(cluster: FaultCluster, duration: float) -> None:
    """Two registries, one killed: requests still succeed and a node started after it joins."""
    cluster.registries[0].kill()
    failed = sum(request(cluster.port, "PUT", f"/kv/reg{i}", b"v")[0] != 200 for i in range(200))
    failed += sum(request(cluster.port, "GET", f"/kv/reg{i}")[0] != 200 for i in range(200))
    started = time.monotonic()
    cluster.processes.node("d", None, *cluster.listed).start()
    wait_for_members(cluster.gateway, 4, 60)
    joined = time.monotonic() - started
    time.sleep(3)
    seen = {n["id"]: n["status"] for n in request(cluster.port, "GET", "/cluster")[1]["nodes"]}
    print("\ntwo registries listed, one killed (kill -9)")
    print(f"  requests after the kill: 400, failed {failed}  target 0  {'MET' if not failed else 'MISSED'}")
    print(f"  a node started after the kill joins: in the gateway's ring {joined:.2f} s after its start; view {seen}")


#: Each row takes the cluster and the seconds per measurement, and gives its figures (or prints its own).
ROWS: dict[str, Callable[[FaultCluster, float], Figures | None]] = {
    "sigstop": sigstop,
    "kill9": kill9,
    "partition": partition,
    "skew": skew,
    "down20": down20,
    "registry": registry,
}
#: Rows that need more than one registry.
REGISTRIES = {"registry": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per measurement")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"which rows, of {', '.join(ROWS)}")
    parser.add_argument("--ttl", type=float, default=10.0, help="the registry's lease, seconds")
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    print(f"3 nodes + gateway, N=3 W=2 R=2, wrk -c{CONNECTIONS}, {args.duration:g} s per run, --ttl {args.ttl:g}")
    for name in args.rows.split(","):
        row = ROWS[name.strip()]
        with tempfile.TemporaryDirectory(prefix="kvd-bench-faults-") as tmp, ExitStack() as stack:
            cluster = FaultCluster(stack, Path(tmp), args.ttl, REGISTRIES.get(name.strip(), 1))
            figures = row(cluster, args.duration)
            if figures is not None:
                show(figures)


if __name__ == "__main__":
    main()
