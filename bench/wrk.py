"""
wrk as the load generator: Lua request scripts, running it (bounded in time), and reading
the numbers it prints.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path
from typing import Any

from cores import pinned

#: Each wrk thread starts at a random i of 0..n-1 (the script's own n), so threads do not walk in
#: step. No braces: it joins the str.format templates below and in vs_etcd.py as it is.
THREAD_START_LUA = """\
setup = function(thread)
  thread:set("start", math.random(0, n - 1))
end
init = function(args)
  i = start or 0
end
"""

GET_LUA = (
    """\
-- GET /kv/<prefix><i> for i cycling over 0..n-1; each wrk thread starts elsewhere.
local n = {n}
local i = 0
"""
    + THREAD_START_LUA
    + """\
request = function()
  i = (i + 1) % n
  return wrk.format("GET", "/kv/{prefix}" .. i)
end
"""
)

PUT_LUA = (
    """\
-- PUT /kv/<prefix><i> with a fixed {size}-byte body, i cycling over 0..n-1.
local n = {n}
local i = 0
local body = string.rep("v", {size})
"""
    + THREAD_START_LUA
    + """\
request = function()
  i = (i + 1) % n
  return wrk.format("PUT", "/kv/{prefix}" .. i, nil, body)
end
"""
)


def add_wrk_arguments(parser: argparse.ArgumentParser, rounds_of: str) -> None:
    """A wrk benchmark's common options; C{rounds_of} names what one round runs ("bare-then-node")."""
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of unmeasured wrk before each run (default 2; 0: none)"
    )
    parser.add_argument("--keys", type=int, default=1000, help="keys preloaded and cycled over (default 1000)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument(
        "--rounds", type=int, default=1, help=f"repeat {rounds_of} R times; medians are reported (default 1)"
    )


def write_lua(directory: Path, name: str, template: str, **params: Any) -> Path:
    path = directory / name
    path.write_text(template.format(**params))
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"cannot read a wrk latency from {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


class WrkResult:
    def __init__(self, output: str) -> None:
        self.output = output
        rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
        if not rps:
            raise RuntimeError(f"wrk printed no Requests/sec:\n{output}")
        self.rps = float(rps.group(1))
        self.latency: dict[str, float] = {}
        for pct, value in re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", output, re.M):
            self.latency[pct] = _ms(value)
        avg = re.search(r"Latency\s+(\S+)", output)
        self.avg_ms = _ms(avg.group(1)) if avg else float("nan")
        requests = re.search(r"(\d+) requests in", output)
        self.requests = int(requests.group(1)) if requests else 0
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
        self.non2xx = int(non2xx.group(1)) if non2xx else 0
        errors = re.search(r"Socket errors: (.*)", output)
        self.socket_errors = errors.group(1).strip() if errors else ""

    @property
    def p99_ms(self) -> float:
        return self.latency.get("99", float("nan"))

    def problems(self) -> str:
        found = []
        if self.non2xx:
            found.append(f"{self.non2xx} non-2xx answers")
        if self.socket_errors:
            found.append(f"socket errors: {self.socket_errors}")
        return "; ".join(found)


def run_wrk(
    url: str,
    script: Path,
    duration: float,
    threads: int = 2,
    connections: int = 32,
    cpu: int | None = None,
) -> WrkResult:
    argv = pinned(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        cpu,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
    result = WrkResult(done.stdout)
    if result.problems():
        print(f"    warning: {url}: {result.problems()}")
    return result
