"""What a benchmark prints about the machine it ran on, and how it sums up its figures."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence


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


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def met(ratio: float, target: float, at_least: bool = True) -> str:
    ok = ratio >= target if at_least else ratio <= target
    return "MET" if ok else "MISSED"
