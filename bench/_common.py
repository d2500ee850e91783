"""
Helpers shared by the benchmarks: find twistd, start a server process on a free loopback
port and wait for it, run wrk and read its numbers, pin processes to cores.

Every process started here is stopped by the caller's ``with`` block (SIGTERM, then
SIGKILL), and every wait is bounded in time. Nothing here asserts on a timing.
"""

from __future__ import annotations

import http.client
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
STARTUP_SECONDS = 60.0
STOP_SECONDS = 20.0


def ensure_kvd_importable() -> str:
    """
    Make ``import kvd`` work here and in child processes; return where kvd comes from.

    kvd installed (``pip install .``) or on PYTHONPATH is used as it is; otherwise the
    checkout this script lives in is put on the path (here and in PYTHONPATH for children).
    """
    try:
        import kvd
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        import kvd
    return str(Path(kvd.__file__).resolve().parent)


def code_version(kvd_dir: str) -> str:
    """The git commit of the checkout kvd is imported from, and whether kvd/ differs from it."""
    root = Path(kvd_dir).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "kvd", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not commit:
        return "not a git checkout (installed copy?)"
    return f"commit {commit}" + (" + uncommitted changes in kvd/" if dirty else "")


def twistd_command() -> list[str]:
    """The ``twistd`` next to this Python, or Twisted's entry point run by this Python."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """C{argv} run on core C{cpu} (all its threads) when C{cpu} is given."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()} ({sys.executable}){load}"


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Percent of all cores busy over the next C{seconds} (from /proc/stat): other load that skews results."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return idle, sum(fields)

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return None
    total = total1 - total0
    return 100.0 * (1 - (idle1 - idle0) / total) if total else None


def report_quiet() -> None:
    busy = cpu_busy()
    if busy is not None:
        note = "" if busy < 10 else "  (WARNING: other load; figures will be noisy)"
        print(f"CPU busy before start: {busy:.0f}% of all cores{note}")


def request(
    port: int, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes, dict[str, str]]:
    """One request to 127.0.0.1:port on a new connection; (status, body, headers)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read(), {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


def preload(port: int, items: Sequence[tuple[str, str]], deadline_seconds: float = 300.0) -> float:
    """PUT every (key, value) over one keep-alive connection; return the seconds it took."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for key, value in items:
            if time.monotonic() - started > deadline_seconds:
                raise RuntimeError(f"preload took more than {deadline_seconds}s")
            connection.request("PUT", f"/kv/{key}", body=value.encode())
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"preload PUT {key}: status {response.status}")
    finally:
        connection.close()
    return time.monotonic() - started


class Server:
    """
    One server process on 127.0.0.1:port, as a context manager: started and ready on entry,
    stopped (SIGTERM, then SIGKILL) on exit, whatever happened.
    """

    def __init__(self, name: str, argv: Sequence[str], port: int, workdir: Path, cpu: int | None = None) -> None:
        self.name = name
        self.argv = pinned(argv, cpu)
        self.port = port
        self.output = workdir / f"{name}.out"
        self.process: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def __enter__(self) -> Server:
        self._out = open(self.output, "ab")
        try:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT, cwd=self.output.parent
            )
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def wait_ready(self, path: str = "/healthz") -> None:
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            try:
                if request(self.port, "GET", path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not answering {path} after {STARTUP_SECONDS}s: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.output.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_SECONDS)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(STOP_SECONDS)
        finally:
            if self._out is not None:
                self._out.close()
                self._out = None


def kvd_argv(workdir: Path, name: str, *args: str) -> list[str]:
    """twistd running kvd in the foreground with C{args}, logging to WORKDIR/NAME.log."""
    return twistd_command() + ["-n", "--pidfile=", "--logfile", str(workdir / f"{name}.log"), "kvd", *args]


def named_node_argv(workdir: Path, node_id: str, port: int, *extra: str) -> list[str]:
    """A node called C{node_id} with its data in WORKDIR/NODE_ID, on 127.0.0.1:port."""
    return kvd_argv(
        workdir,
        node_id,
        "--role",
        "node",
        "--node-id",
        node_id,
        "--data-dir",
        str(workdir / node_id),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        *extra,
    )


def node_argv(port: int, data_dir: Path, log: Path, *extra: str) -> list[str]:
    """twistd running one kvd node with default flags (no access log, fsync always) plus C{extra}."""
    return twistd_command() + [
        "-n",
        "--pidfile=",
        "--logfile",
        str(log),
        "kvd",
        "--role",
        "node",
        "--node-id",
        "a",
        "--data-dir",
        str(data_dir),
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        *extra,
    ]


# wrk

GET_LUA = """\
-- GET /kv/<prefix><i> for i cycling over 0..n-1; each wrk thread starts elsewhere.
local n = {n}
local i = 0
setup = function(thread)
  thread:set("start", math.random(0, n - 1))
end
init = function(args)
  i = start or 0
end
request = function()
  i = (i + 1) % n
  return wrk.format("GET", "/kv/{prefix}" .. i)
end
"""

PUT_LUA = """\
-- PUT /kv/<prefix><i> with a fixed {size}-byte body, i cycling over 0..n-1.
local n = {n}
local i = 0
local body = string.rep("v", {size})
setup = function(thread)
  thread:set("start", math.random(0, n - 1))
end
init = function(args)
  i = start or 0
end
request = function()
  i = (i + 1) % n
  return wrk.format("PUT", "/kv/{prefix}" .. i, nil, body)
end
"""


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


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def met(ratio: float, target: float, at_least: bool = True) -> str:
    ok = ratio >= target if at_least else ratio <= target
    return "MET" if ok else "MISSED"


def add_profile_argument(parser: Any) -> None:
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="sample each measured server with py-spy (pip install py-spy) into DIR and print where its main "
        "thread spends time; sampling slows the server, so profiled runs give lower req/s",
    )


def add_pin_arguments(parser: Any) -> None:
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the server to core 0 and wrk to core 1 with taskset (pinned by default when possible)",
    )


def pin_cores(args: Any) -> tuple[int | None, int | None]:
    """(server core, wrk core), or (None, None) when not pinning."""
    if args.no_pin or not can_pin():
        return None, None
    return 0, 1


# Profiles (py-spy, when installed: pip install py-spy)


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpy:
    """
    Sample a process with py-spy (idle frames included) for C{seconds} as a
    context manager, into C{out} as collapsed stacks; see L{summarize_profile}.
    """

    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 200) -> None:
        self.pid, self.out, self.seconds, self.rate = pid, out, seconds, rate
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        spy = py_spy()
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        argv = [spy, "record", "-p", str(self.pid), "-d", str(max(1, round(self.seconds))), "-r", str(self.rate)]
        # Blocking sampling (py-spy pauses the process for each sample): non-blocking samples
        # of a busy reactor came out torn.
        argv += ["--idle", "--threads", "--format", "raw", "-o", str(self.out)]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(self.seconds + 30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)


def _idle(leaf: str) -> bool:
    return ("doPoll" in leaf and "epollreactor" in leaf) or leaf.startswith(("Condition.wait", "Queue.get", "_worker"))


def summarize_profile(path: Path, top: int = 10) -> list[str]:
    """Main-thread busy share, and where its busy samples are (self, and inclusive in kvd/)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return [f"no profile at {path}"]
    threads: dict[str, list[int]] = {}
    own: dict[str, int] = {}
    within: dict[str, int] = {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        if len(frames) < 2:
            continue
        thread = frames[0].split(": ", 1)[-1]
        busy = not _idle(frames[-1])
        totals = threads.setdefault(thread, [0, 0])
        totals[0] += n
        totals[1] += n if busy else 0
        if thread == "MainThread" and busy:
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                if "kvd/" in frame:
                    within[frame] = within.get(frame, 0) + n
    out = [f"profile {path}:"]
    for thread, (total, busy_samples) in sorted(threads.items()):
        out.append(f"  {thread}: busy in {100 * busy_samples / total:.0f}% of {total} samples")
    main_busy = threads.get("MainThread", [0, 0])[1] or 1
    out.append("  main thread, busy samples, by own frame:")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"    {100 * n / main_busy:5.1f}%  {frame}")
    out.append("  main thread, busy samples, inside kvd/ frames (inclusive):")
    for frame, n in sorted(within.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"    {100 * n / main_busy:5.1f}%  {frame}")
    return out
