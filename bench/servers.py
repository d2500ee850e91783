"""
The server processes a benchmark measures, started and stopped by L{kvd.testing.processes}
(the same code the integration suite uses), with a benchmark's longer start-up allowance
and optional pinning to a core; and loading data into them.

Every process is stopped by the caller's ``with`` block (SIGTERM, then SIGKILL), and every
wait is bounded in time. Nothing here asserts on a timing.
"""

from __future__ import annotations

import http.client
import os
import time
from collections.abc import Sequence
from pathlib import Path

from checkout import ensure_kvd_importable
from cores import pinned

ensure_kvd_importable()

from kvd.testing.processes import (  # noqa: E402
    Kvd,
    Process,
    Processes,
    free_port,
    http_request,
    kvd_argv,
    listen_on,
    node_args,
    request,
    twistd_command,
    wait_for_members,
)

#: A loaded machine may be slow to start a server: more than the test suite allows.
STARTUP_SECONDS = 60.0

__all__ = [
    "STARTUP_SECONDS",
    "Kvd",
    "Process",
    "Processes",
    "Server",
    "bench_processes",
    "cpu_seconds",
    "free_port",
    "http_request",
    "listen_on",
    "node_argv",
    "preload",
    "request",
    "twistd_command",
    "wait_for_members",
]


class Server(Process):
    """One server process on 127.0.0.1:port running C{argv}, on core C{cpu} when given."""

    def __init__(self, name: str, argv: Sequence[str], port: int, workdir: Path, cpu: int | None = None) -> None:
        super().__init__(name, argv, workdir, port, startup_seconds=STARTUP_SECONDS, launcher=pinned([], cpu))


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of process C{pid}, all its threads, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; it ends at the last ')'.
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def bench_processes(workdir: Path) -> Processes:
    """kvd processes in C{workdir} with a benchmark's start-up allowance; stopped when its ``with`` ends."""
    return Processes(workdir, startup_seconds=STARTUP_SECONDS)


def node_argv(port: int, data_dir: Path, log: Path, *extra: str) -> list[str]:
    """twistd running one kvd node "a" with default flags (no access log, fsync always) plus C{extra}."""
    return kvd_argv(log, *node_args("a", data_dir, port, *extra))


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
