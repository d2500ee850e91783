"""
Where a server spends its time: py-spy samples of a running process (when py-spy is
installed: pip install py-spy), summed up by thread and frame.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def add_profile_argument(parser: Any) -> None:
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="sample each measured server with py-spy (pip install py-spy) into DIR and print where its main "
        "thread spends time; sampling slows the server, so profiled runs give lower req/s",
    )


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpy:
    """
    Sample a process with py-spy (idle frames included) for C{seconds} as a
    context manager, into C{out} as collapsed stacks; see L{summarize_profile}.
    """

    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 200, gil: bool = False) -> None:
        self.pid, self.out, self.seconds, self.rate, self.gil = pid, out, seconds, rate, gil
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PySpy:
        spy = py_spy()
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        argv = [spy, "record", "-p", str(self.pid), "-d", str(max(1, round(self.seconds))), "-r", str(self.rate)]
        # Blocking sampling (py-spy pauses the process for each sample): non-blocking samples
        # of a busy reactor came out torn.
        # With C{gil}, only samples holding the GIL: time preempted inside a socket send (a
        # woken client or node took the core) is not the process's own work.
        argv += ["--gil"] if self.gil else ["--idle"]
        argv += ["--threads", "--format", "raw", "-o", str(self.out)]
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
