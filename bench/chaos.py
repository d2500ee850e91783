"""
Crash and check: concurrent writers and readers through a gateway (N=3, W=2, R=2) while,
every 20 seconds for 5 minutes, one of three nodes is killed (kill -9) and restarted, hung
(SIGSTOP, then SIGCONT) or cut off from the gateway (iptables DROP on its port, then healed),
in turn (--faults picks which; cuts need root and iptables).

Prints the writes acknowledged, the acknowledged writes lost (must be 0: every one is read
back at the end, after the cluster has settled), and the reads that failed while at most
one node was down (must be 0): a read fails when it errors, or answers anything but the
value last acknowledged for the key.

    python bench/chaos.py [--minutes 5] [--period 20] [--writers 8] [--faults kill,stop,cut]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from checkout import ensure_kvd_importable
from replication import Cluster
from report import machine

from kvd.testing.firewall import Firewall, iptables_unavailable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--period", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--down", type=float, default=5.0, help="seconds a killed node stays down")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--faults", default="kill,stop,cut", help="kill (-9), stop (SIGSTOP), cut (iptables)")
    parser.add_argument("--keep", metavar="DIR", help="run in DIR, keeping its logs and data")
    args = parser.parse_args()
    faults = [f.strip() for f in args.faults.split(",")]
    if "cut" in faults and (why := iptables_unavailable()) is not None:
        print(f"no partitions: {why}")
        faults.remove("cut")
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())

    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()
    counts = {"writes": 0, "write_failures": 0, "reads": 0, "read_failures": 0}
    examples: list[str] = []
    now = ["healthy", time.monotonic()]  # the fault in place, and since when

    with ExitStack() as stack:
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            tmp = args.keep
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kvd-bench-chaos-"))
        cluster = Cluster(stack, Path(tmp))
        port = cluster.gateway_port

        def connection() -> http.client.HTTPConnection:
            return http.client.HTTPConnection("127.0.0.1", port, timeout=15)

        def call(
            conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None
        ) -> tuple[int, dict]:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, json.loads(response.read())

        def writer(number: int) -> None:
            conn, i = connection(), 0
            while not stop.is_set():
                key = f"w{number}-{i % 500}"
                value = f"{number}:{i}"
                try:
                    status, _ = call(conn, "PUT", f"/kv/{key}", value.encode())
                except OSError as e:
                    status, conn = 0, connection()
                    examples.append(f"write {key}: {e}")
                with lock:
                    counts["writes"] += 1
                    if status == 200:
                        acknowledged[key] = value
                    else:
                        counts["write_failures"] += 1
                        acknowledged.pop(key, None)  # unknown now: an unacknowledged write may have landed
                i += 1

        def reader(number: int) -> None:
            conn, rng = connection(), random.Random(number)
            while not stop.is_set():
                with lock:
                    if not acknowledged:
                        continue
                    key, expected = rng.choice(list(acknowledged.items()))
                try:
                    status, body = call(conn, "GET", f"/kv/{key}")
                except OSError as e:
                    status, body, conn = 0, {"error": str(e)}, connection()
                with lock:
                    if acknowledged.get(key) != expected:
                        continue  # overwritten meanwhile: nothing to compare against
                    counts["reads"] += 1
                    # The value read may be newer than the one sampled, never older or missing.
                    got = body.get("value", "")
                    if status != 200 or (got != expected and not _newer(got, expected)):
                        counts["read_failures"] += 1
                        if len(examples) < 10:
                            examples.append(
                                f"read {key}: {status} {got!r}, expected {expected!r}"
                                f" ({now[0]}, {time.monotonic() - now[1]:.1f} s in): {body.get('error', '')}"
                            )

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(args.writers)]
        threads += [threading.Thread(target=reader, args=(n,)) for n in range(args.readers)]
        for t in threads:
            t.start()
        started = time.monotonic()
        done = dict.fromkeys(faults, 0)
        wall = stack.enter_context(Firewall()) if "cut" in faults else None
        try:
            while time.monotonic() - started < args.minutes * 60:
                time.sleep(max(0.0, args.period - args.down))
                victim = random.choice(sorted(cluster.nodes))
                fault = faults[sum(done.values()) % len(faults)]
                node = cluster.nodes[victim]
                if fault == "kill":
                    cluster.kill(victim)
                elif fault == "stop":
                    os.kill(node.pid, signal.SIGSTOP)
                else:
                    assert wall is not None and node.port is not None
                    wall.cut(node.port)
                done[fault] += 1
                now[:] = [f"{fault} {victim}", time.monotonic()]
                print(f"  {time.monotonic() - started:6.1f}s  {fault} {victim}; writes so far {counts['writes']}")
                try:
                    time.sleep(args.down)
                finally:
                    if fault == "kill":
                        cluster.start_node(victim)
                    elif fault == "stop":
                        os.kill(node.pid, signal.SIGCONT)
                    else:
                        assert wall is not None
                        wall.heal()
                    now[:] = [f"after {fault} {victim}", time.monotonic()]
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        # Settle: let repair bring every replica up to date, then read every acknowledged write back.
        time.sleep(5)
        lost = []
        conn = connection()
        for key, value in acknowledged.items():
            status, body = call(conn, "GET", f"/kv/{key}")
            if status != 200 or body.get("value") != value:
                lost.append(key)
        print(f"faults                    {', '.join(f'{n} {f}' for f, n in done.items())}")
        print(f"writes attempted          {counts['writes']}")
        print(f"writes acknowledged       {counts['writes'] - counts['write_failures']}")
        print(f"writes refused (503 etc.) {counts['write_failures']}")
        print(f"keys checked at the end   {len(acknowledged)}")
        print(f"writes lost               {len(lost)}   (must be 0)")
        print(f"reads                     {counts['reads']}")
        print(f"reads that failed         {counts['read_failures']}   (must be 0 while 2 of 3 replicas are up)")
        for line in examples[:10]:
            print(f"  e.g. {line}")


def _newer(got: str, expected: str) -> bool:
    """Values are 'writer:sequence'; a later sequence from the same writer is newer."""
    try:
        g, e = got.split(":"), expected.split(":")
        return g[0] == e[0] and int(g[1]) > int(e[1])
    except (ValueError, IndexError):
        return False


if __name__ == "__main__":
    main()
