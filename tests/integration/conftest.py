"""
Real `twistd kvd` processes on free loopback ports, for the integration suite.

Every process a test starts is killed at the end of the test, whatever happened.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

STARTUP_SECONDS = 20.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ports_free(*ports: int) -> bool:
    """Whether every port could be listened on now (as Twisted does, with SO_REUSEADDR)."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def twistd_command() -> list[str]:
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    found = shutil.which("twistd")
    return [found] if found else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTP(S) request to 127.0.0.1:port; returns (status, parsed JSON)."""
    connection = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
        if tls is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


class Kvd:
    """One `twistd -n kvd` process."""

    def __init__(
        self, workdir: Path, name: str, args: list[str], port: int | None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.tls = tls
        self.workdir = workdir
        self.name = name
        self.args = args
        self.port = port
        self.log = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Kvd:
        argv = twistd_command() + ["-n", "--pidfile=", "--logfile", str(self.log), "kvd", *self.args]
        with open(self.workdir / f"{self.name}.out", "ab") as out:
            self.process = subprocess.Popen(argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                output = (self.workdir / f"{self.name}.out").read_text()
                raise AssertionError(f"{self.name} exited {self.process.returncode}: {output} {self.tail()}")
            try:
                if request(self.port, "GET", "/healthz", timeout=1, tls=self.tls)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {STARTUP_SECONDS}s: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def run_to_exit(self, timeout: float = 20.0) -> tuple[int, str]:
        """Start and wait for the process to exit by itself (start-up errors)."""
        argv = twistd_command() + ["-n", "--pidfile=", "--logfile", str(self.log), "kvd", *self.args]
        done = subprocess.run(argv, cwd=self.workdir, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return done.returncode, done.stderr.decode() + done.stdout.decode()


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Kvd] = []

    def kvd(self, name: str, *args: str, port: int | None = None, tls: ssl.SSLContext | None = None) -> Kvd:
        process = Kvd(self.workdir, name, list(args), port, tls)
        self.started.append(process)
        return process

    def node(self, node_id: str, port: int | None = None, *extra: str) -> Kvd:
        port = port or free_port()
        data = self.workdir / "data" / node_id
        return self.kvd(
            f"node-{node_id}-{port}",
            "--role",
            "node",
            "--node-id",
            node_id,
            "--data-dir",
            str(data),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
            port=port,
        )

    def cleanup(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    ps = Processes(tmp_path)
    try:
        yield ps
    finally:
        ps.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
