"""
Real ``twistd kvd`` processes on loopback ports, for the integration suite and the benchmarks.

This module owns starting and stopping server processes from a test or a benchmark: finding
twistd, building ``twistd -n kvd --role ...`` command lines, picking free loopback ports,
starting a process with its output captured, waiting (bounded) until it answers ``/healthz``,
stopping it (SIGTERM, then SIGKILL) or killing it as a crash would, a registry + nodes +
gateway cluster, and small blocking HTTP requests to 127.0.0.1.

A process that needs fixed ports (the dev role's 8000, 8001-8003 and 8500) can run in a
private network namespace of its own, so a port held by anything else on the machine (a
developer's own dev cluster) never stands in its way; L{Process.network} puts the calling
thread in that namespace for the requests it sends.

It blocks (subprocess, http.client) and never touches a reactor; it imports no test framework,
so pytest fixtures and benchmark scripts both wrap it.
"""

from __future__ import annotations

import ctypes
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from attrs import frozen

#: How long a process may take to answer its health check after it is started.
STARTUP_SECONDS = 20.0
#: How long a process may take to exit after SIGTERM (and after SIGKILL).
STOP_SECONDS = 20.0

_CLONE_NEWNET = 0x40000000
# `ip link set lo up` in the new namespace, then the server itself (exec keeps the pid).
_PRIVATE_NETWORK = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


_P = TypeVar("_P", bound="Process")


class ProcessError(RuntimeError):
    """A server process exited early, did not become ready in time, or cannot be run as asked."""


# --- command lines and ports ----------------------------------------------------------------


def twistd_command() -> list[str]:
    """The ``twistd`` next to this Python, else the one on PATH, else Twisted's entry point run by this Python."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    found = shutil.which("twistd")
    return [found] if found else [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def kvd_argv(log: Path, *args: str) -> list[str]:
    """twistd running kvd in the foreground, no pid file, logging to C{log}, with C{args}."""
    return [*twistd_command(), "-n", "--pidfile=", "--logfile", str(log), "kvd", *args]


def listen_on(port: int) -> str:
    """The ``--listen`` endpoint for 127.0.0.1:port."""
    return f"tcp:{port}:interface=127.0.0.1"


def node_args(node_id: str, data_dir: Path, port: int, *extra: str) -> list[str]:
    """kvd arguments for a node called C{node_id}, its data in C{data_dir}, on 127.0.0.1:port."""
    return ["--role", "node", "--node-id", node_id, "--data-dir", str(data_dir), "--listen", listen_on(port), *extra]


def free_port() -> int:
    """A loopback port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_holders(*ports: int) -> dict[int, str]:
    """The ports of C{ports} that cannot be listened on now, each with who holds it (from ``ss``, when it can tell)."""
    taken = {}
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                taken[port] = _listener(port) or str(e)
    return taken


def _listener(port: int) -> str:
    try:
        done = subprocess.run(
            ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    users = re.findall(r'\("([^"]+)",pid=(\d+)', done.stdout)
    return ", ".join(f"{name} (pid {pid})" for name, pid in dict.fromkeys(users)) or done.stdout.strip()


# --- private network namespaces -------------------------------------------------------------


@functools.cache
def private_network_unavailable() -> str | None:
    """Why a process cannot get a private network namespace here, or None when it can."""
    for tool in ("unshare", "ip", "sh"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    try:
        done = subprocess.run(
            [*_PRIVATE_NETWORK, "true"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"unshare --net failed: {e}"
    if done.returncode != 0:
        return f"unshare --net failed: {done.stderr.strip() or done.returncode}"
    try:
        os.close(os.open("/proc/thread-self/ns/net", os.O_RDONLY))
    except OSError as e:
        return f"cannot open this thread's network namespace: {e}"
    return None


def private_network_for(*ports: int) -> bool:
    """
    Whether a process needing the fixed C{ports} must run in a private network namespace.

    True whenever one is available (then nothing else on the machine can hold its ports);
    False when none is but the ports are free here. Raises L{ProcessError} naming who
    holds them otherwise: a test must not quietly skip because a port is taken.
    """
    why = private_network_unavailable()
    if why is None:
        return True
    taken = port_holders(*ports)
    if taken:
        held = "; ".join(f"{port} held by {holder}" for port, holder in taken.items())
        raise ProcessError(f"fixed ports in use ({held}) and no private network namespace to run in ({why})")
    return False


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


@contextmanager
def network_of(pid: int) -> Iterator[None]:
    """
    The calling thread inside the network namespace of process C{pid} for the ``with``
    block, and back in its own after it. Sockets made inside stay in that namespace.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        theirs = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(theirs)
        finally:
            os.close(theirs)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def _network_inode(path: str) -> int:
    return os.stat(path).st_ino


# --- blocking HTTP --------------------------------------------------------------------------


@frozen
class Answer:
    """An HTTP answer: status, body, and headers with lower-case names."""

    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> Answer:
    """One HTTP (or, given C{tls}, HTTPS) request to 127.0.0.1:port on a new connection."""
    connection = (
        http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
        if tls is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, response.read(), {k.lower(): v for k, v in response.getheaders()})
    finally:
        connection.close()


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout: float = 10.0,
    tls: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request to 127.0.0.1:port whose answer is JSON: (status, the parsed body)."""
    answer = http_request(port, method, path, body, timeout, tls, headers)
    return answer.status, answer.json()


# --- processes ------------------------------------------------------------------------------


class Process:
    """
    One server process answering HTTP on 127.0.0.1:port, its output in WORKDIR/NAME.out.

    Started with L{start} (ready once C{ready_path} answers 200, within C{startup_seconds}),
    or as a context manager that stops it on exit whatever happened. It can be started
    again after it stopped. C{launcher} goes in front of C{argv} (``taskset -c 0``, say);
    with C{private_network} it runs in a network namespace of its own.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        port: int | None,
        *,
        tls: ssl.SSLContext | None = None,
        ready_path: str = "/healthz",
        startup_seconds: float = STARTUP_SECONDS,
        launcher: Sequence[str] = (),
        private_network: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.workdir = workdir
        self.port = port
        self.tls = tls
        self.ready_path = ready_path
        self.startup_seconds = startup_seconds
        self.launcher = list(launcher)
        self.private_network = private_network
        self.output = workdir / f"{name}.out"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def command(self) -> list[str]:
        """The full command line the process runs."""
        return [*(_PRIVATE_NETWORK if self.private_network else ()), *self.launcher, *self.argv]

    def start(self: _P, wait: bool = True) -> _P:
        """Start the process; with C{wait}, return once it is ready (or raise L{ProcessError} after stopping it)."""
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                self.command(), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def network(self) -> AbstractContextManager[None]:
        """The calling thread where this process's ports are, for a ``with`` block (a no-op unless private)."""
        if not self.private_network:
            return nullcontext()
        return network_of(self.pid)

    def wait_ready(self) -> None:
        """Wait until C{ready_path} answers 200; L{ProcessError} if the process exits or C{startup_seconds} pass."""
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + self.startup_seconds
        own_network = _network_inode("/proc/thread-self/ns/net")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ProcessError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            try:
                # Until unshare has made the namespace, the pid is still in ours.
                if not self.private_network or _network_inode(f"/proc/{self.pid}/ns/net") != own_network:
                    with self.network():
                        answer = http_request(self.port, "GET", self.ready_path, timeout=2, tls=self.tls)
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ProcessError(f"{self.name} not answering {self.ready_path} after {self.startup_seconds}s: {self.tail()}")

    def tail(self) -> str:
        """The end of what the process wrote."""
        return _tail(self.output, 2000)

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(STOP_SECONDS)

    def terminate(self, timeout: float = STOP_SECONDS) -> int:
        """SIGTERM and wait for the exit status (subprocess.TimeoutExpired if it hangs)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within L{STOP_SECONDS}; nothing if not running."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.terminate()
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self: _P) -> _P:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _tail(path: Path, size: int) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return ""


class Kvd(Process):
    """One ``twistd -n kvd`` process with C{args}, logging to WORKDIR/NAME.log."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        args: Sequence[str],
        port: int | None,
        tls: ssl.SSLContext | None = None,
        **options: Any,
    ) -> None:
        self.args = list(args)
        self.log = workdir / f"{name}.log"
        super().__init__(name, kvd_argv(self.log, *self.args), workdir, port, tls=tls, **options)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return f"{super().tail()} {_tail(self.log, 3000)}"

    def run_to_exit(self, timeout: float = STOP_SECONDS) -> tuple[int, str]:
        """Run and wait for the process to exit by itself (start-up errors): (status, stderr + stdout)."""
        done = subprocess.run(
            self.command(), cwd=self.workdir, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        return done.returncode, done.stderr.decode() + done.stdout.decode()


@frozen
class Cluster:
    """A registry, nodes registered with it, and a gateway, each its own process."""

    registry: Kvd
    nodes: list[Kvd]
    gateway: Kvd


class Processes:
    """
    Every kvd process a test or a benchmark starts in C{workdir}, to end them all at once:
    L{cleanup} kills them (as a crash would, and fast); as a context manager, they are
    stopped cleanly on exit.
    """

    def __init__(self, workdir: Path, startup_seconds: float = STARTUP_SECONDS, launcher: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.startup_seconds = startup_seconds
        self.launcher = list(launcher)
        self.started: list[Kvd] = []

    def kvd(
        self, name: str, *args: str, port: int | None = None, tls: ssl.SSLContext | None = None, **options: Any
    ) -> Kvd:
        """A kvd process (not started yet) with C{args}; C{port} is where it answers its health check."""
        options.setdefault("startup_seconds", self.startup_seconds)
        options.setdefault("launcher", self.launcher)
        process = Kvd(self.workdir, name, list(args), port, tls, **options)
        self.started.append(process)
        return process

    def node(self, node_id: str, port: int | None = None, *extra: str, name: str | None = None, **options: Any) -> Kvd:
        """
        A node called C{node_id} on 127.0.0.1:port (a free one if not given), its data in
        WORKDIR/data/NODE_ID; C{options} as for L{Process}.
        """
        port = port or free_port()
        data = self.workdir / "data" / node_id
        args = node_args(node_id, data, port, *extra)
        return self.kvd(name or f"node-{node_id}-{port}", *args, port=port, **options)

    def registry(self, *extra: str, name: str = "registry", port: int | None = None) -> Kvd:
        """A registry on 127.0.0.1:port (a free one if not given)."""
        port = port or free_port()
        return self.kvd(name, "--role", "registry", *extra, "--listen", listen_on(port), port=port)

    def gateway(self, *extra: str, name: str = "gateway", port: int | None = None) -> Kvd:
        """A gateway on 127.0.0.1:port (a free one if not given); C{extra} says where its nodes are."""
        port = port or free_port()
        return self.kvd(name, "--role", "gateway", *extra, "--listen", listen_on(port), port=port)

    def cluster(
        self,
        node_ids: Sequence[str] = ("a", "b", "c"),
        registry_options: Sequence[str] = (),
        node_options: Sequence[str] = (),
        gateway_options: Sequence[str] = (),
    ) -> Cluster:
        """A registry, the nodes C{node_ids} and a gateway, all started; returned once the gateway sees every node."""
        registry = self.registry(*registry_options).start()
        nodes = [self.node(n, None, "--registry", registry.url, *node_options).start() for n in node_ids]
        gateway = self.gateway("--registry", registry.url, *gateway_options).start()
        cluster = Cluster(registry, nodes, gateway)
        wait_for_members(cluster.gateway, len(node_ids), self.startup_seconds)
        return cluster

    def cleanup(self) -> None:
        """Kill every process started here that still runs."""
        for process in self.started:
            process.kill()

    def stop_all(self) -> None:
        """Stop every process started here that still runs (SIGTERM, then SIGKILL)."""
        for process in reversed(self.started):
            process.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop_all()


def wait_for_members(gateway: Process, count: int, seconds: float = STARTUP_SECONDS) -> None:
    """Wait until C{gateway}'s /cluster lists C{count} nodes; L{ProcessError} after C{seconds}."""
    assert gateway.port is not None
    deadline = time.monotonic() + seconds
    seen = None
    while time.monotonic() < deadline:
        try:
            with gateway.network():
                status, body = request(gateway.port, "GET", "/cluster", timeout=2, tls=gateway.tls)
            seen = len(body["nodes"]) if status == 200 else None
            if seen == count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise ProcessError(f"{gateway.name} saw {seen} nodes, not {count}, after {seconds}s")


__all__ = [
    "STARTUP_SECONDS",
    "STOP_SECONDS",
    "Answer",
    "Cluster",
    "Kvd",
    "Process",
    "ProcessError",
    "Processes",
    "free_port",
    "http_request",
    "kvd_argv",
    "listen_on",
    "network_of",
    "node_args",
    "port_holders",
    "private_network_for",
    "private_network_unavailable",
    "request",
    "twistd_command",
    "wait_for_members",
]
