"""
kvd against the store a user would pick instead (issue 12), in one run: a single etcd member
on this machine against kvd as registry + 3 nodes + gateway, each its own process (N=3 W=2
R=2, fsync on: the defaults), loaded by wrk with the same keys, the same value size and the
same connection count on both sides.

Figures, each with its ratio or its value against issue 12's target:

- PUT req/s and GET req/s, kvd / etcd (target >= 1.0 each);
- p99 through the gateway at --connections, GET and PUT (target <= 10 ms each);
- CPU per request of the gateway (utime + stime from /proc/PID/stat, every thread, over the
  wrk run, divided by the requests wrk counted): GET <= 150 us, PUT <= 180 us;
- CPU per replicated PUT of each node (the same, over the gateway's PUTs: with N=3 and three
  nodes every node takes every write): <= 50 us;
- etcd's own CPU per request, for comparison (no target).

The reactor stall while compacting 1M keys (target <= 10 ms) is bench/store.py's figure
(``python bench/store.py --only a``: "longest reactor stall" of the compaction); it is not
measured here.

etcd is Debian's ``etcd-server`` (``apt-get install etcd-server``: /usr/bin/etcd), started
here on free loopback ports with a temporary data dir; its JSON gateway takes base64 keys
and values: POST /v3/kv/put {"key", "value"} and POST /v3/kv/range {"key"}, every put
raft-committed and fsynced by the single member. Without the binary this says so and prints
kvd's figures alone.

    python bench/vs_etcd.py [--duration 10] [--keys 1000] [--value-size 100] [--connections 32]
                            [--profile DIR [--profile-seconds 10] [--gil]]

With --profile, after the measured runs, py-spy samples the gateway under PUT load, the
gateway under GET load and node a under PUT load (each --profile-seconds), and the summary
of each is printed; the raw collapsed stacks stay in DIR. With --gil, only samples holding
the GIL count (time preempted inside a socket send is not the process's own work). Every
process is stopped at the end; timings only print, nothing asserts on them.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from checkout import code_version, ensure_kvd_importable
from profiling import PySpy, summarize_profile
from report import machine, met, report_quiet
from servers import (
    STARTUP_SECONDS,
    Kvd,
    Process,
    bench_processes,
    cpu_seconds,
    free_port,
    http_request,
    preload,
    wait_for_members,
)
from wrk import GET_LUA, PUT_LUA, THREAD_START_LUA, WrkResult, run_wrk, write_lua

PUT_RATIO_TARGET = 1.0
GET_RATIO_TARGET = 1.0
P99_TARGET_MS = 10.0
GATEWAY_GET_US_TARGET = 150.0
GATEWAY_PUT_US_TARGET = 180.0
NODE_PUT_US_TARGET = 50.0
#: Where the tail of a node's group commits is counted (bucket bounds of its histograms, seconds).
TAIL_BOUNDS = ("0.0025", "0.005", "0.01", "0.025")

ETCD_INSTALL = "apt-get install etcd-server"

# etcd's JSON gateway: one POST body per key, base64 inside JSON, built here (Lua has no base64).
ETCD_LUA = (
    """\
-- POST {path} with body i of the table below, i cycling over 1..n; each wrk thread starts elsewhere.
local bodies = {{
{bodies}
}}
local n = #bodies
local i = 0
local headers = {{["Content-Type"] = "application/json"}}
"""
    + THREAD_START_LUA
    + """\
request = function()
  i = (i % n) + 1
  return wrk.format("POST", "{path}", headers, bodies[i])
end
"""
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def etcd_put_body(key: str, value: str) -> str:
    return json.dumps({"key": b64(key), "value": b64(value)})


def etcd_range_body(key: str) -> str:
    return json.dumps({"key": b64(key)})


def etcd_lua(directory: Path, name: str, path: str, bodies: list[str]) -> Path:
    lua_bodies = ",\n".join(f"  [[{body}]]" for body in bodies)
    return write_lua(directory, name, ETCD_LUA, path=path, bodies=lua_bodies)


# --- CPU time from /proc ----------------------------------------------------------------------


def context_switches(pid: int) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches of process C{pid}, summed over its threads now alive."""
    voluntary = nonvoluntary = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        nonvoluntary += int(line.split()[1])
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return voluntary, nonvoluntary


@contextmanager
def cpu_of(pids: dict[str, int], switches: dict[str, tuple[int, int]] | None = None) -> Iterator[dict[str, float]]:
    """
    CPU seconds each of C{pids} used during the ``with`` block, filled in when it ends; and,
    given C{switches}, the (voluntary, nonvoluntary) context switches each made meanwhile.
    """
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    switched = {name: context_switches(pid) for name, pid in pids.items()}
    used: dict[str, float] = {}
    yield used
    for name, pid in pids.items():
        used[name] = cpu_seconds(pid) - before[name]
        if switches is not None:
            now = context_switches(pid)
            switches[name] = (now[0] - switched[name][0], now[1] - switched[name][1])


def scrape(port: int) -> dict[str, float]:
    """A node's /metrics as {sample name with labels: value}."""
    samples = {}
    for line in http_request(port, "GET", "/metrics", timeout=30).body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def batching(before: dict[str, float], after: dict[str, float], writes: int) -> str:
    """How the node took C{writes} replicated PUTs: internal requests and group commits, from /metrics deltas."""

    def delta(match: str) -> float:
        return sum(v - before.get(k, 0.0) for k, v in after.items() if match in k)

    requests = sum(
        v - before.get(k, 0.0)
        for k, v in after.items()
        if k.startswith("kvd_http_requests_total") and "/internal/" in k
    )
    commits = delta("kvd_group_commit_writes_count")
    committed = delta("kvd_group_commit_writes_sum")
    fsync = delta("kvd_fsync_seconds_sum")
    counted = (
        f"{requests:,.0f} internal requests ({writes / requests:.1f} writes each)"
        if requests
        else "internal requests not counted in its /metrics"
    )
    return (
        f"{counted}, "
        f"{commits:,.0f} group commits ({committed / commits if commits else float('nan'):.1f} writes each, "
        f"{fsync / commits * 1000 if commits else float('nan'):.2f} ms each)"
    )


def over(
    before: dict[str, float], after: dict[str, float], histogram: str, bounds: tuple[str, ...], label: str = ""
) -> str:
    """
    From /metrics deltas: the share of a histogram's observations above each bound (seconds,
    as the bucket labels spell them), e.g. 'over 5 ms 0.8 %'; only its samples holding
    C{label} (such as C{route="/kv/{key}"}) are counted.
    """

    def count(le: str) -> float:
        total = 0.0
        for name, value in after.items():
            if name.startswith(histogram + "_bucket{") and f'le="{le}"' in name and label in name:
                total += value - before.get(name, 0.0)
        return total

    everything = count("+Inf")
    if not everything:
        return "none observed"
    shares = ((le, (everything - count(le)) / everything * 100) for le in bounds)
    return ", ".join(f"over {float(le) * 1000:g} ms {share:.2f} %" for le, share in shares)


def per_request_us(seconds: float, result: WrkResult) -> float:
    return seconds / result.requests * 1e6 if result.requests else float("nan")


# --- etcd -------------------------------------------------------------------------------------


def etcd_binary() -> str | None:
    return shutil.which("etcd") or (str(Path("/usr/bin/etcd")) if Path("/usr/bin/etcd").exists() else None)


def etcd_process(binary: str, workdir: Path) -> Process:
    """A single etcd member on free loopback ports, its data in WORKDIR/etcd-data (not started yet)."""
    client, peer = free_port(), free_port()
    argv = [
        binary,
        "--name",
        "bench",
        "--data-dir",
        str(workdir / "etcd-data"),
        "--listen-client-urls",
        f"http://127.0.0.1:{client}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{client}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"bench=http://127.0.0.1:{peer}",
        "--initial-cluster-state",
        "new",
        "--log-level",
        "warn",
    ]
    return Process("etcd", argv, workdir, client, ready_path="/health", startup_seconds=STARTUP_SECONDS)


def etcd_preload(port: int, items: list[tuple[str, str]]) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for key, value in items:
            connection.request(
                "POST", "/v3/kv/put", body=etcd_put_body(key, value), headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"etcd preload {key}: status {response.status}")
    finally:
        connection.close()


def etcd_check(port: int, key: str, value: str) -> None:
    """Fail loudly if a range of C{key} does not give back C{value}: wrk alone would not notice."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v3/kv/range", body=etcd_range_body(key))
        body = json.loads(connection.getresponse().read())
    finally:
        connection.close()
    got = base64.b64decode(body["kvs"][0]["value"]).decode()
    if got != value:
        raise RuntimeError(f"etcd range {key} gave {got!r}")


# --- the runs ---------------------------------------------------------------------------------


class Figures:
    def __init__(self) -> None:
        self.put: WrkResult | None = None
        self.get: WrkResult | None = None
        self.cpu_us: dict[str, float] = {}


def measure(
    label: str,
    url: str,
    put_lua: Path,
    get_lua: Path,
    pids: dict[str, int],
    args: argparse.Namespace,
    put_done: Callable[[], None] = lambda: None,
) -> Figures:
    """
    A PUT run then a GET run of wrk against C{url}, with the CPU each of C{pids} used in each;
    C{put_done} is called between the two.
    """
    figures = Figures()
    for method, lua in (("PUT", put_lua), ("GET", get_lua)):
        switches: dict[str, tuple[int, int]] = {}
        with cpu_of(pids, switches) as used:
            result = run_wrk(url, lua, args.duration, threads=args.threads, connections=args.connections)
        if method == "PUT":
            figures.put = result
            put_done()
        else:
            figures.get = result
        cpu = "  ".join(f"{name} {per_request_us(seconds, result):6.0f} us" for name, seconds in used.items())
        print(
            f"{label:5} {method}  {result.rps:8.0f} req/s   mean {result.avg_ms:6.2f} ms"
            f"   p50 {result.latency.get('50', float('nan')):6.2f} ms"
            f"   p99 {result.p99_ms:7.2f} ms   CPU per request: {cpu}"
        )
        per = max(result.requests, 1)
        print(
            "      context switches per request (voluntary + nonvoluntary): "
            + "  ".join(f"{name} {v / per:.2f}+{n / per:.2f}" for name, (v, n) in switches.items())
        )
        for name, seconds in used.items():
            figures.cpu_us[f"{method} {name}"] = per_request_us(seconds, result)
    return figures


def profile_kvd(gateway: Kvd, node: Kvd, url: str, put_lua: Path, get_lua: Path, args: argparse.Namespace) -> list[str]:
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for what, process, lua in (
        ("gateway-put", gateway, put_lua),
        ("gateway-get", gateway, get_lua),
        ("node-put", node, put_lua),
    ):
        path = out / f"{what}.txt"
        # py-spy starts sampling a moment after it is started: load for a little longer.
        with PySpy(process.pid, path, args.profile_seconds, gil=args.gil):
            result = run_wrk(url, lua, args.profile_seconds + 2, threads=args.threads, connections=args.connections)
        lines.append(f"{what}: {result.rps:.0f} req/s while sampled")
        lines.extend(summarize_profile(path, top=15))
    return lines


def run_kvd(workdir: Path, items: list[tuple[str, str]], args: argparse.Namespace) -> tuple[Figures, list[str]]:
    put_lua = write_lua(workdir, "kvd-put.lua", PUT_LUA, n=args.keys, prefix="key", size=args.value_size)
    get_lua = write_lua(workdir, "kvd-get.lua", GET_LUA, n=args.keys, prefix="key")
    with bench_processes(workdir) as processes:
        registry = processes.registry().start()
        nodes = [
            processes.node(n, None, "--registry", registry.url, "--fsync", args.fsync).start() for n in ("a", "b", "c")
        ]
        gateway = processes.gateway("--registry", registry.url).start()
        wait_for_members(gateway, 3, STARTUP_SECONDS)
        assert gateway.port is not None
        preload(gateway.port, items)
        pids = {"gateway": gateway.pid, **{f"node {node.args[3]}": node.pid for node in nodes}}
        assert nodes[0].port is not None
        before, gateway_before = scrape(nodes[0].port), scrape(gateway.port)
        scraped: list[dict[str, float]] = []
        figures = measure(
            "kvd",
            gateway.url,
            put_lua,
            get_lua,
            pids,
            args,
            put_done=lambda: scraped.extend([scrape(nodes[0].port), scrape(gateway.port)]),  # type: ignore[arg-type]
        )
        assert figures.put is not None
        after, gateway_after = scraped
        print(f"      node a during the PUT run: {batching(before, after, figures.put.requests)}")
        print(f"      node a's group commits (write + fsync): {over(before, after, 'kvd_fsync_seconds', TAIL_BOUNDS)}")
        print(
            "      node a's internal requests, arrival to answer: "
            + over(before, after, "kvd_http_request_seconds", TAIL_BOUNDS, 'route="/internal/*"')
        )
        print(
            "      the gateway's PUTs, arrival to answer: "
            + over(gateway_before, gateway_after, "kvd_http_request_seconds", TAIL_BOUNDS, 'route="/kv/{key}"')
        )
        profile = profile_kvd(gateway, nodes[0], gateway.url, put_lua, get_lua, args) if args.profile else []
    return figures, profile


def run_etcd(binary: str, workdir: Path, items: list[tuple[str, str]], args: argparse.Namespace) -> Figures:
    put_lua = etcd_lua(workdir, "etcd-put.lua", "/v3/kv/put", [etcd_put_body(k, v) for k, v in items])
    get_lua = etcd_lua(workdir, "etcd-get.lua", "/v3/kv/range", [etcd_range_body(k) for k, _ in items])
    with etcd_process(binary, workdir) as etcd:
        assert etcd.port is not None
        etcd_preload(etcd.port, items)
        etcd_check(etcd.port, items[-1][0], items[-1][1])
        url = f"http://127.0.0.1:{etcd.port}"
        return measure("etcd", url, put_lua, get_lua, {"etcd": etcd.pid}, args)


def row(figure: str, kvd: str, etcd: str, ratio: str, target: str, verdict: str) -> str:
    return f"| {figure} | {kvd} | {etcd} | {ratio} | {target} | {verdict} |"


def summary(kvd: Figures, etcd: Figures | None, connections: int) -> list[str]:
    assert kvd.put is not None and kvd.get is not None
    lines = [row("figure", "kvd", "etcd", "ratio", "target", "met?"), "|---|---|---|---|---|---|"]
    for method, mine, target in (("PUT", kvd.put, PUT_RATIO_TARGET), ("GET", kvd.get, GET_RATIO_TARGET)):
        theirs = None if etcd is None else (etcd.put if method == "PUT" else etcd.get)
        if theirs is None:
            lines.append(row(f"{method} req/s", f"{mine.rps:,.0f}", "not run", "", f">= {target}", ""))
        else:
            ratio = mine.rps / theirs.rps
            lines.append(
                row(
                    f"{method} req/s",
                    f"{mine.rps:,.0f}",
                    f"{theirs.rps:,.0f}",
                    f"**{ratio:.2f}**",
                    f">= {target}",
                    met(ratio, target),
                )
            )
    for method, mine in (("GET", kvd.get), ("PUT", kvd.put)):
        theirs = None if etcd is None else (etcd.put if method == "PUT" else etcd.get)
        etcd_p99 = "not run" if theirs is None else f"{theirs.p99_ms:.1f} ms"
        lines.append(
            row(
                f"{method} p99, {connections} conns",
                f"{mine.p99_ms:.1f} ms",
                etcd_p99,
                "",
                f"<= {P99_TARGET_MS:g} ms",
                met(mine.p99_ms, P99_TARGET_MS, at_least=False),
            )
        )
    for method, target in (("GET", GATEWAY_GET_US_TARGET), ("PUT", GATEWAY_PUT_US_TARGET)):
        us = kvd.cpu_us[f"{method} gateway"]
        theirs = "not run" if etcd is None else f"{etcd.cpu_us[f'{method} etcd']:.0f} us (whole etcd)"
        lines.append(
            row(
                f"CPU per {method}, gateway",
                f"{us:.0f} us",
                theirs,
                "",
                f"<= {target:g} us",
                met(us, target, at_least=False),
            )
        )
    for name, us in kvd.cpu_us.items():
        if name.startswith("PUT node"):
            lines.append(
                row(
                    f"CPU per replicated PUT, {name[4:]}",
                    f"{us:.0f} us",
                    "",
                    "",
                    f"<= {NODE_PUT_US_TARGET:g} us",
                    met(us, NODE_PUT_US_TARGET, at_least=False),
                )
            )
    total_put = sum(us for name, us in kvd.cpu_us.items() if name.startswith("PUT "))
    total_get = sum(us for name, us in kvd.cpu_us.items() if name.startswith("GET "))
    if etcd is not None:
        lines.append(
            row(
                "CPU per PUT, all kvd processes vs etcd",
                f"{total_put:.0f} us",
                f"{etcd.cpu_us['PUT etcd']:.0f} us",
                f"{total_put / etcd.cpu_us['PUT etcd']:.2f}",
                "",
                "",
            )
        )
        lines.append(
            row(
                "CPU per GET, all kvd processes vs etcd",
                f"{total_get:.0f} us",
                f"{etcd.cpu_us['GET etcd']:.0f} us",
                f"{total_get / etcd.cpu_us['GET etcd']:.2f}",
                "",
                "",
            )
        )
    lines.append(row("reactor stall compacting 1M keys", "see bench/store.py --only a", "", "", "<= 10 ms", ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of wrk per PUT or GET run")
    parser.add_argument("--keys", type=int, default=1000, help="distinct keys written and read")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--no-etcd", action="store_true", help="measure kvd alone")
    parser.add_argument(
        "--fsync",
        choices=("always", "never"),
        default="always",
        help="the nodes' --fsync: 'never' (UNSAFE, a diagnostic) shows what the disk's fsyncs add to the tail",
    )
    parser.add_argument("--profile", metavar="DIR", default=None, help="py-spy the gateway and a node into DIR")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--gil", action="store_true", help="with --profile: sample only while the GIL is held")
    args = parser.parse_args()
    kvd_dir = ensure_kvd_importable()
    print(f"kvd from {kvd_dir} ({code_version(kvd_dir)})")
    print(machine())
    report_quiet()
    print(
        f"wrk -t{args.threads} -c{args.connections}, {args.duration:g} s a run, {args.keys} keys of "
        f"{args.value_size}-byte values; kvd: registry + 3 nodes + gateway, N=3 W=2 R=2, fsync {args.fsync}"
    )
    items = [(f"key{i}", "v" * args.value_size) for i in range(args.keys)]
    binary = None if args.no_etcd else etcd_binary()
    if binary is None and not args.no_etcd:
        print(f"etcd not found: {ETCD_INSTALL} (Debian's etcd-server provides /usr/bin/etcd); kvd's figures only")

    with tempfile.TemporaryDirectory(prefix="kvd-bench-etcd-") as tmp:
        workdir = Path(tmp)
        kvd, profile = run_kvd(workdir, items, args)
        etcd = None
        if binary is not None:
            etcd = run_etcd(binary, workdir, items, args)
    print()
    print(f"etcd: {binary}" if binary else "etcd: not run")
    for line in summary(kvd, etcd, args.connections):
        print(line)
    for line in profile:
        print(line)


if __name__ == "__main__":
    main()
