"""
A gateway run as several processes behind one listening socket (C{--workers N}).

The main process opens the port as a single gateway would, follows the registries, runs the
repair sweeps, and keeps N-1 worker processes running: each is C{python -m kvd.workers}, given
the gateway's config and the listening socket as its fd 3, which it adopts, so the kernel hands
each new connection to whichever process accepts it first. A worker has its own failure
detector, node connections, hot-key counts and watches, but follows no registry and sweeps
nothing: the main process writes every membership change to the worker's stdin as one JSON
line (L{membership_line}), and a worker exits when its stdin closes, so a main process killed
with -9 takes its workers with it.

L{Supervisor} is the main process's side: it starts the workers, restarts one that exits
(with backoff), forwards membership, and stops them (SIGTERM, then SIGKILL) at shutdown.
L{MembershipReader} is the worker's side of the pipe. Neither touches the global reactor;
L{main} is the worker process's entry point and the one place here that does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

from attrs import asdict, define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from kvd.membership import NodeInfo, parse_members
from kvd.options import GatewayConfig

__all__ = [
    "LISTEN_FD",
    "MembershipReader",
    "Supervisor",
    "WorkerProtocol",
    "config_from_json",
    "config_to_json",
    "main",
    "membership_line",
    "parse_membership_line",
    "worker_argv",
]

_log = Logger()

#: The fd a worker finds the shared listening socket on.
LISTEN_FD = 3
#: The first restart of a worker that exited waits this long; each further one twice as long...
FIRST_RESTART_DELAY = 0.1
#: ...up to this.
MAX_RESTART_DELAY = 10.0
#: A worker that ran this long before it exited is restarted after the first delay again.
HEALTHY_SECONDS = 30.0
#: How long a worker has to exit after SIGTERM before it is killed.
STOP_SECONDS = 10.0
#: A membership line longer than this is garbage (1,000 members take about 100 kB).
MAX_LINE = 16 * 1024 * 1024


# --- the membership pipe ----------------------------------------------------------------------


def membership_line(members: Mapping[str, NodeInfo]) -> bytes:
    """One membership as the line a worker reads: C{{"members": [NodeInfo.to_json(), ...]}}."""
    return json.dumps({"members": [info.to_json() for info in members.values()]}).encode() + b"\n"


def parse_membership_line(line: bytes) -> dict[str, NodeInfo]:
    """The membership a line holds; L{ValueError} when it is not one."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("members"), list):
        raise ValueError('not an object with a "members" list')
    return parse_members(message["members"])


class MembershipReader(Protocol):
    """
    A worker's stdin: each line a membership, handed to C{on_change}; a line that is not one
    (or is longer than C{max_length}) is logged and ignored. C{on_eof} is called when the main
    process closes the pipe (or dies).
    """

    def __init__(
        self, on_change: Callable[[dict[str, NodeInfo]], None], on_eof: Callable[[], None], max_length: int = MAX_LINE
    ) -> None:
        self.on_change = on_change
        self.on_eof = on_eof
        self.max_length = max_length
        self._parts: list[bytes] = []
        self._size = 0
        #: Dropping the rest of an overlong line, up to its end.
        self._skipping = False

    def dataReceived(self, data: bytes) -> None:
        *lines, last = data.split(b"\n")
        if lines:
            lines[0] = b"".join([*self._parts, lines[0]])
            self._parts, self._size = [], 0
        for line in lines:
            if self._skipping:
                self._skipping = False
            elif len(line) > self.max_length:
                self._too_long()
            else:
                self._line(line)
        if last:
            self._parts.append(last)
            self._size += len(last)
            if self._size > self.max_length:
                self._parts, self._size = [], 0
                if not self._skipping:
                    self._too_long()
                self._skipping = True

    def _too_long(self) -> None:
        _log.warn("ignoring a membership line of more than {limit} bytes", limit=self.max_length)

    def _line(self, line: bytes) -> None:
        try:
            members = parse_membership_line(line)
        except ValueError as e:
            _log.warn("ignoring a membership line from the main process: {why}", why=str(e))
            return
        self.on_change(members)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.on_eof()


# --- the worker's config and command line -------------------------------------------------------


def config_to_json(config: GatewayConfig) -> str:
    return json.dumps(asdict(config))


def config_from_json(text: str) -> GatewayConfig:
    values = json.loads(text)
    values["registry"] = tuple(values["registry"])
    return GatewayConfig(**values)


def worker_argv(config: GatewayConfig, index: int, family: int) -> list[str]:
    """The command line of worker C{index}: this Python running this module."""
    return [sys.executable, "-m", "kvd.workers", str(index), str(int(family)), config_to_json(config)]


# --- the main process's side ---------------------------------------------------------------------

_LEVELS = {level.name: level for level in LogLevel.iterconstants()}


class WorkerProtocol(ProcessProtocol):
    """One worker as the main process sees it: its output goes to the main's log, its end to the supervisor."""

    def __init__(self, index: int, ended: Callable[[WorkerProtocol, Failure], None]) -> None:
        self.index = index
        self._ended = ended
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.pop(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()[-64 * 1024 :]
        for line in lines:
            if line.strip():
                text = line.decode("utf-8", "replace")
                # The worker's own level ("[namespace#warn] ..."), so warnings stay warnings.
                level = _LEVELS.get(text.partition("]")[0].rpartition("#")[2], LogLevel.info)
                _log.emit(level, "worker {index}: {line}", index=self.index, line=text)

    def processEnded(self, reason: Failure) -> None:
        self._ended(self, reason)


@define
class _Slot:
    index: int
    transport: IProcessTransport | None = None
    started_at: float = 0.0
    delay: float = FIRST_RESTART_DELAY
    restart: IDelayedCall | None = None
    ended: Deferred[None] | None = None


@define
class Supervisor:
    """
    Keeps C{count} workers running: C{spawn(protocol, index)} starts worker C{index} (1 to count)
    and returns its transport. A worker that exits is started again after a delay that doubles
    from L{FIRST_RESTART_DELAY} to L{MAX_RESTART_DELAY} while it keeps exiting, and starts again
    from the first once a worker has run for L{HEALTHY_SECONDS}. Each membership given to
    L{forward} goes to every worker, and the last one to each worker as it starts.
    """

    count: int
    spawn: Callable[[WorkerProtocol, int], IProcessTransport]
    clock: IReactorTime
    stop_seconds: float = STOP_SECONDS
    members: dict[str, NodeInfo] | None = None
    #: Workers started, restarts included.
    starts: int = 0
    _slots: list[_Slot] = field(factory=list)
    _stopping: bool = False

    def start(self) -> None:
        self._stopping = False
        self._slots = [_Slot(index) for index in range(1, self.count + 1)]
        for slot in self._slots:
            self._start(slot)

    @property
    def running(self) -> list[int]:
        """The indexes of the workers running now."""
        return [slot.index for slot in self._slots if slot.transport is not None]

    def pids(self) -> list[int]:
        return [slot.transport.pid for slot in self._slots if slot.transport is not None and slot.transport.pid]

    def _start(self, slot: _Slot) -> None:
        slot.restart = None
        if self._stopping:
            return
        try:
            transport = self.spawn(WorkerProtocol(slot.index, self._ended), slot.index)
        except Exception as e:  # e.g. out of processes: try again later
            _log.error("cannot start worker {index}: {error}", index=slot.index, error=e)
            self._schedule(slot)
            return
        slot.transport, slot.started_at = transport, self.clock.seconds()
        self.starts += 1
        if self.members is not None:
            self._send(slot, membership_line(self.members))

    def _schedule(self, slot: _Slot) -> None:
        slot.restart = self.clock.callLater(slot.delay, self._start, slot)
        slot.delay = min(slot.delay * 2, MAX_RESTART_DELAY)

    def _ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        slot = self._slots[protocol.index - 1]
        slot.transport = None
        if slot.ended is not None:
            done, slot.ended = slot.ended, None
            done.callback(None)
        if self._stopping:
            return
        how = "exited" if reason.check(ProcessDone) else reason.getErrorMessage()
        if self.clock.seconds() - slot.started_at >= HEALTHY_SECONDS:
            slot.delay = FIRST_RESTART_DELAY
        _log.warn(
            "worker {index} {how}; starting it again in {delay:.1f} s", index=slot.index, how=how, delay=slot.delay
        )
        self._schedule(slot)

    def forward(self, members: Mapping[str, NodeInfo]) -> None:
        """Send C{members} to every worker (and remember them for the workers that start later)."""
        self.members = dict(members)
        line = membership_line(self.members)
        for slot in self._slots:
            self._send(slot, line)

    def _send(self, slot: _Slot, line: bytes) -> None:
        if slot.transport is not None:
            try:
                slot.transport.write(line)
            except Exception as e:  # the pipe of a worker that is exiting
                _log.warn("cannot write to worker {index}: {error}", index=slot.index, error=e)

    def stop(self) -> Deferred[None]:
        """SIGTERM to every worker, SIGKILL to those still running after C{stop_seconds}; fires once all ended."""
        self._stopping = True
        waits: list[Deferred[None]] = []
        for slot in self._slots:
            if slot.restart is not None and slot.restart.active():
                slot.restart.cancel()
            slot.restart = None
            if slot.transport is None:
                continue
            slot.ended = Deferred()
            waits.append(slot.ended)
            self._signal(slot, "TERM")
        if not waits:
            return Deferred.fromCoroutine(_nothing())
        kill = self.clock.callLater(self.stop_seconds, self._kill_remaining)
        done = DeferredList(waits)

        def cancel_kill(result: object) -> None:
            if kill.active():
                kill.cancel()

        return done.addCallback(cancel_kill)

    def _kill_remaining(self) -> None:
        for slot in self._slots:
            if slot.transport is not None:
                _log.warn("worker {index} did not stop; killing it", index=slot.index)
                self._signal(slot, "KILL")

    @staticmethod
    def _signal(slot: _Slot, name: str) -> None:
        assert slot.transport is not None
        try:
            slot.transport.signalProcess(name)
        except Exception:  # already gone: its processEnded is on the way
            pass


async def _nothing() -> None:
    return None


# --- the worker process --------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    """A worker: C{python -m kvd.workers INDEX FAMILY CONFIG_JSON}, the listening socket on fd 3."""
    from twisted.internet import reactor as global_reactor
    from twisted.internet import stdio
    from twisted.logger import FileLogObserver, eventAsText, globalLogBeginner

    from kvd.roles import worker_services
    from kvd.tap import lean_poll_if_epoll

    reactor: Any = global_reactor
    lean_poll_if_epoll(reactor)
    index, family, config = int(argv[0]), socket.AddressFamily(int(argv[1])), config_from_json(argv[2])
    globalLogBeginner.beginLoggingTo(
        [FileLogObserver(sys.stderr, lambda event: (eventAsText(event, includeTimestamp=False) or "") + "\n")],
        redirectStandardIO=False,
    )
    # Ctrl-C reaches the whole process group; the main process stops its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    services, follow = worker_services(reactor, config, index, LISTEN_FD, family)

    def eof() -> None:
        if reactor.running:
            _log.info("the main process closed the membership pipe; stopping")
            reactor.stop()

    stdio.StandardIO(MembershipReader(follow, eof), reactor=reactor)
    for child in services:
        child.privilegedStartService()
    for child in services:
        child.startService()

    def stop_all() -> Deferred[Any]:
        return DeferredList([d for d in (s.stopService() for s in reversed(services)) if d is not None])

    reactor.addSystemEventTrigger("before", "shutdown", stop_all)
    _log.info("worker {index} (pid {pid}) serving", index=index, pid=os.getpid())
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
