"""
A/B of two kvd installs on this machine: bench/vs_etcd.py --no-etcd run by each in turn.

    python bench/ab.py --rounds 3 --duration 4 \\
        A=/tmp/venv-base/bin/python:/tmp/base-clone B=/tmp/venv-new/bin/python:.

Each side is NAME=PYTHON:CHECKOUT (the checkout whose bench/vs_etcd.py that Python runs; the
kvd it measures is the one installed for that Python). Rounds alternate A B, B A, A B, ... so a
drift of the shared machine's speed falls on both; the figures compared are the medians of
each side's rounds, gateway CPU per request (utime+stime per request, the steadiest figure)
first. Prints figures; never fails on them.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
from pathlib import Path

LINE = re.compile(
    r"^kvd\s+(?P<method>PUT|GET)\s+(?P<rps>[\d.]+) req/s.*?p99\s+(?P<p99>[\d.]+) ms.*?gateway\s+(?P<gw>[\d.]+) us"
    r"(?P<rest>.*)$"
)
NODE = re.compile(r"node \w\s+([\d.]+) us")


def one_run(python: str, checkout: str, duration: float) -> tuple[dict[str, dict[str, float]], str]:
    out = subprocess.run(
        [python, str(Path(checkout) / "bench" / "vs_etcd.py"), "--no-etcd", "--duration", str(duration)],
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    figures: dict[str, dict[str, float]] = {}
    busy = next((line.strip() for line in out.splitlines() if "busy" in line.lower()), "")
    for line in out.splitlines():
        match = LINE.match(line.strip())
        if match:
            nodes = [float(n) for n in NODE.findall(match["rest"])]
            figures[match["method"]] = {
                "req/s": float(match["rps"]),
                "p99 ms": float(match["p99"]),
                "gateway us": float(match["gw"]),
                "node us": statistics.mean(nodes) if nodes else float("nan"),
            }
    return figures, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("sides", nargs=2, metavar="NAME=PYTHON:CHECKOUT")
    args = parser.parse_args()
    sides = [(name, *where.split(":", 1)) for name, where in (side.split("=", 1) for side in args.sides)]
    results: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name, _, _ in sides}
    for round_ in range(args.rounds):
        # A B, then B A: whichever side runs second in a round is not always the same one.
        for name, python, checkout in sides if round_ % 2 == 0 else sides[::-1]:
            figures, busy = one_run(python, checkout, args.duration)
            for f in figures.values():
                # The nodes run the same code on both sides: their CPU per request moves with
                # the machine's speed (and with batch sizes), a rough control for the gateway's.
                f["gw/node"] = f["gateway us"] / f["node us"] if f["node us"] else float("nan")
            results[name].append(figures)
            shown = "  ".join(
                f"{method} {f['req/s']:.0f}/s p99 {f['p99 ms']:.1f} gw {f['gateway us']:.0f} node {f['node us']:.0f}"
                for method, f in figures.items()
            )
            print(f"round {round_} {name}: {shown}   [{busy}]", flush=True)
    print()
    for method in ("PUT", "GET"):
        for figure in ("gateway us", "node us", "gw/node", "req/s", "p99 ms"):
            medians = []
            for name, _, _ in sides:
                values = [run[method][figure] for run in results[name] if method in run]
                medians.append(statistics.median(values) if values else float("nan"))
            ratio = medians[1] / medians[0] if medians[0] else float("nan")
            cells = "  ".join(f"{name} {m:8.1f}" for (name, _, _), m in zip(sides, medians, strict=True))
            print(f"{method} {figure:11} median  {cells}   B/A {ratio:.3f}")


if __name__ == "__main__":
    main()
