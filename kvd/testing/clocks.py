"""
Processes whose clock is off, with libfaketime (Debian package faketime), for the
integration suite and bench/faults.py.

The launcher is ``env LD_PRELOAD=libfaketime FAKETIME=...`` rather than the ``faketime``
command: ``env`` execs, so the process's pid is the server's own and stopping or killing it
leaves no child behind (``faketime`` forks and waits, and a signal to it orphans the server).
"""

from __future__ import annotations

import glob
import subprocess
import sys

_LIBRARIES = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1")


def libfaketime() -> str | None:
    """Where libfaketime is, or None."""
    for pattern in _LIBRARIES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def faketime_launcher(offset: str) -> list[str]:
    """A launcher for L{kvd.testing.processes.Process}: its command with the clock moved by C{offset} ('+1h')."""
    library = libfaketime()
    assert library is not None, "libfaketime is not installed"
    return ["env", f"LD_PRELOAD={library}", f"FAKETIME={offset}", "FAKETIME_DONT_RESET=1"]


def faketime_unavailable(offset: str = "+1h", seconds: float = 3600.0) -> str | None:
    """Why a process's clock cannot be moved here, or None when C{offset} moves this Python's by C{seconds}."""
    if libfaketime() is None:
        return "libfaketime is not installed (apt-get install faketime)"
    clock = [sys.executable, "-c", "import time; print(time.time())"]
    try:
        real = float(subprocess.run(clock, capture_output=True, text=True, timeout=20).stdout)
        fake = float(
            subprocess.run([*faketime_launcher(offset), *clock], capture_output=True, text=True, timeout=20).stdout
        )
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return f"libfaketime does not run this Python: {e}"
    if abs(fake - real - seconds) > 60:
        return f"FAKETIME={offset} moved this Python's clock by {fake - real:.0f} s, not {seconds:.0f}"
    return None


__all__ = ["faketime_launcher", "faketime_unavailable", "libfaketime"]
