"""
What operations features cost a node, each as a ratio in one run (wrk, 32 connections):

1. TLS: GET req/s over https (an ssl: endpoint, certificate from a throwaway trustme CA)
   against plain http, on the same node build.
2. Metrics: GET req/s with per-request counting (the default) against --no-metrics.
   Target (issue 5): counting costs under 10% of node throughput, i.e. ratio >= 0.9.

    python bench/ops.py [--duration 10] [--rounds 3]

Rounds alternate the two sides of each pair and the median is reported. Every process is
stopped at the end; nothing asserts on a timing.
"""

from __future__ import annotations

import argparse
import ssl
import tempfile
from pathlib import Path

import trustme
from checkout import ensure_kvd_importable
from report import machine, median, met, report_quiet
from servers import STARTUP_SECONDS, Kvd, free_port, listen_on, preload
from wrk import GET_LUA, run_wrk, write_lua

METRICS_TARGET = 0.9
KEYS = 1000


def node(
    workdir: Path, name: str, listen: str, port: int, *extra: str, tls: ssl.SSLContext | None = None, label: str = ""
) -> Kvd:
    """Node "a" with its data in WORKDIR/NAME, listening on C{listen}; its output and log named C{label} or C{name}."""
    args = ["--role", "node", "--node-id", "a", "--data-dir", str(workdir / name), "--listen", listen, *extra]
    return Kvd(workdir, label or name, args, port, tls, startup_seconds=STARTUP_SECONDS)


def measure(workdir: Path, name: str, listen_for: str, scheme: str, lua: Path, duration: float, *extra: str) -> float:
    port = free_port()
    plain_port = free_port()
    # Data goes in over plain http (a second, plain listener is not possible per node: so
    # preload through a plain node on the same data dir first, then restart on the tested endpoint).
    with node(workdir, name, listen_on(plain_port), plain_port, label=f"{name}-load"):
        preload(plain_port, [(f"key{i}", "v" * 100) for i in range(KEYS)])
    # The benchmark checks it reaches the server, not who the server is.
    tls = ssl._create_unverified_context() if scheme == "https" else None
    with node(workdir, name, listen_for.format(port=port), port, *extra, tls=tls):
        return run_wrk(f"{scheme}://127.0.0.1:{port}", lua, duration).rps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"kvd from {ensure_kvd_importable()}")
    print(machine())
    report_quiet()
    with tempfile.TemporaryDirectory(prefix="kvd-bench-ops-") as tmp:
        workdir = Path(tmp)
        pem = workdir / "server.pem"
        trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        lua = write_lua(workdir, "get.lua", GET_LUA, n=KEYS, prefix="key")
        plain, tls, counted, uncounted = [], [], [], []
        for r in range(args.rounds):
            plain.append(measure(workdir, f"plain{r}", "tcp:{port}:interface=127.0.0.1", "http", lua, args.duration))
            tls.append(
                measure(
                    workdir,
                    f"tls{r}",
                    "ssl:{port}:interface=127.0.0.1:privateKey=" + str(pem),
                    "https",
                    lua,
                    args.duration,
                )
            )
            counted.append(plain[-1])
            uncounted.append(
                measure(
                    workdir,
                    f"nometrics{r}",
                    "tcp:{port}:interface=127.0.0.1",
                    "http",
                    lua,
                    args.duration,
                    "--no-metrics",
                )
            )
            print(f"  round {r + 1}: http {plain[-1]:.0f}, https {tls[-1]:.0f}, --no-metrics {uncounted[-1]:.0f} GET/s")
        p, t, c, u = median(plain), median(tls), median(counted), median(uncounted)
        print(f"GET over http                 {p:9.0f} req/s")
        print(f"GET over https (TLS)          {t:9.0f} req/s   https / http = {t / p:.2f}")
        print(f"GET, metrics counted          {c:9.0f} req/s")
        print(f"GET, --no-metrics             {u:9.0f} req/s")
        ratio = c / u
        print(
            f"counted / not counted         {ratio:9.2f}   (cost {100 * (1 - ratio):.1f}%)   target >= {METRICS_TARGET}"
            f"   {met(ratio, METRICS_TARGET)}"
        )


if __name__ == "__main__":
    main()
