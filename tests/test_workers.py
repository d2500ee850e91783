"""
A --workers gateway's supervision and membership pipe (L{kvd.workers}), with a Clock and fake
process transports: no processes, no sockets.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

import attrs
import pytest
from treq.testing import StubTreq
from twisted.application.internet import TimerService
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from kvd.gateway import figures
from kvd.membership import NodeInfo
from kvd.options import GatewayConfig
from kvd.roles import AdoptedListenService, WatcherService, WorkersService, worker_services
from kvd.tap import Options, makeService
from kvd.workers import (
    FIRST_RESTART_DELAY,
    HEALTHY_SECONDS,
    MAX_RESTART_DELAY,
    MembershipReader,
    Supervisor,
    WorkerProtocol,
    config_from_json,
    config_to_json,
    membership_line,
    parse_membership_line,
)

MEMBERS = {"a": NodeInfo("a", "http://127.0.0.1:5001"), "b": NodeInfo("b", "http://127.0.0.1:5002", 2, "down")}


class FakeProcess:
    """What a spawned worker's transport records: what was written to its stdin, what signals it got."""

    def __init__(self, protocol: WorkerProtocol, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def end(self, code: int | None = 0, signal: int | None = None) -> None:
        reason = ProcessDone(0) if code == 0 else ProcessTerminated(code, signal)
        self.protocol.processEnded(Failure(reason))


class Harness:
    def __init__(self, count: int = 2) -> None:
        self.clock = Clock()
        self.spawned: list[FakeProcess] = []
        self.supervisor = Supervisor(count, self.spawn, self.clock)  # type: ignore[arg-type]

    def spawn(self, protocol: WorkerProtocol, index: int) -> FakeProcess:
        process = FakeProcess(protocol, 1000 + len(self.spawned))
        self.spawned.append(process)
        return process

    def of(self, index: int) -> list[FakeProcess]:
        return [p for p in self.spawned if p.protocol.index == index]


# --- the membership pipe ----------------------------------------------------------------------


def test_a_membership_line_reads_back_as_the_same_members() -> None:
    line = membership_line(MEMBERS)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_membership_line(line.strip()) == MEMBERS


@pytest.mark.parametrize("line", [b"", b"not json", b"[1, 2]", b'{"members": 3}', b"\xff\xfe", b'{"nodes": []}'])
def test_a_line_that_is_not_a_membership_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError):
        parse_membership_line(line)


def test_the_reader_hands_on_each_membership_and_ignores_garbage_between() -> None:
    seen: list[dict[str, NodeInfo]] = []
    eofs: list[None] = []
    reader = MembershipReader(seen.append, lambda: eofs.append(None))
    line = membership_line(MEMBERS)
    # Split anywhere: lines are reassembled; garbage lines are skipped, the next good one still counts.
    data = line[:7] + line[7:] + b"garbage\n" + b'{"members": "x"}\n' + membership_line({})
    for i in range(0, len(data), 5):
        reader.dataReceived(data[i : i + 5])
    assert seen == [MEMBERS, {}]
    assert eofs == []
    reader.connectionLost()
    assert eofs == [None]


def test_an_overlong_line_is_dropped_and_the_reader_goes_on() -> None:
    seen: list[dict[str, NodeInfo]] = []
    reader = MembershipReader(seen.append, lambda: None, max_length=200)
    reader.dataReceived(b"x" * 500 + b"\n" + membership_line(MEMBERS))
    reader.dataReceived(b"y" * 300)  # no end yet: skipped as it comes
    reader.dataReceived(b"y" * 300 + b"\n" + membership_line({}))
    assert seen == [MEMBERS, {}]


# --- supervision --------------------------------------------------------------------------------


def test_it_starts_each_worker_once() -> None:
    h = Harness(3)
    h.supervisor.start()
    assert [p.protocol.index for p in h.spawned] == [1, 2, 3]
    assert h.supervisor.running == [1, 2, 3]
    assert h.supervisor.pids() == [1000, 1001, 1002]


def test_membership_reaches_every_worker_and_a_worker_started_later_hears_the_last_one_first() -> None:
    h = Harness(2)
    h.supervisor.start()
    assert [p.written for p in h.spawned] == [[], []]  # nothing known yet: nothing sent
    h.supervisor.forward(MEMBERS)
    assert [p.written for p in h.spawned] == [[membership_line(MEMBERS)]] * 2
    h.supervisor.forward({})
    h.of(1)[0].end(1)
    h.clock.advance(FIRST_RESTART_DELAY)
    restarted = h.of(1)[-1]
    assert restarted is not h.of(1)[0]
    assert restarted.written == [membership_line({})]


def test_a_worker_that_exits_is_started_again_with_a_doubling_delay_up_to_the_cap() -> None:
    h = Harness(1)
    h.supervisor.start()
    delays = []
    for _ in range(10):
        h.of(1)[-1].end(None, 9)
        assert h.supervisor.running == []
        (restart,) = h.clock.getDelayedCalls()
        delays.append(round(restart.getTime() - h.clock.seconds(), 3))
        h.clock.advance(delays[-1])
        assert h.supervisor.running == [1]
    assert delays[:4] == [0.1, 0.2, 0.4, 0.8]
    assert delays[-3:] == [MAX_RESTART_DELAY] * 3
    assert h.supervisor.starts == 11


def test_a_worker_that_ran_long_enough_is_restarted_after_the_first_delay_again() -> None:
    h = Harness(1)
    h.supervisor.start()
    for _ in range(4):  # crash at once four times: the delay grows to 1.6 s
        h.of(1)[-1].end(1)
        h.clock.advance(MAX_RESTART_DELAY)
    h.clock.advance(HEALTHY_SECONDS)
    h.of(1)[-1].end(1)
    count = len(h.spawned)
    h.clock.advance(FIRST_RESTART_DELAY)
    assert len(h.spawned) == count + 1


def test_a_worker_that_cannot_be_spawned_is_tried_again_later() -> None:
    h = Harness(1)
    attempts: list[int] = []

    def failing(protocol: WorkerProtocol, index: int) -> FakeProcess:
        attempts.append(index)
        if len(attempts) < 3:
            raise OSError("Resource temporarily unavailable")
        return h.spawn(protocol, index)

    h.supervisor.spawn = failing  # type: ignore[assignment]
    h.supervisor.start()
    assert h.supervisor.running == []
    h.clock.advance(FIRST_RESTART_DELAY)
    h.clock.advance(FIRST_RESTART_DELAY * 2)
    assert attempts == [1, 1, 1]
    assert h.supervisor.running == [1]


def test_stop_terminates_every_worker_and_fires_when_all_have_ended() -> None:
    h = Harness(2)
    h.supervisor.start()
    stopped = h.supervisor.stop()
    assert [p.signals for p in h.spawned] == [["TERM"], ["TERM"]]
    h.spawned[0].end(0)
    assert not stopped.called
    h.spawned[1].end(0)
    assert stopped.called
    h.clock.advance(MAX_RESTART_DELAY * 10)
    assert len(h.spawned) == 2  # nothing is started again once stopping
    assert [p.signals for p in h.spawned] == [["TERM"], ["TERM"]]  # and nothing is killed


def test_a_worker_that_ignores_sigterm_is_killed_and_a_pending_restart_is_cancelled() -> None:
    h = Harness(2)
    h.supervisor.start()
    h.of(2)[0].end(1)  # worker 2 is waiting to be started again
    stopped = h.supervisor.stop()
    h.clock.advance(h.supervisor.stop_seconds)
    assert h.of(1)[0].signals == ["TERM", "KILL"]
    assert not stopped.called
    h.of(1)[0].end(None, 9)
    assert stopped.called
    assert len(h.of(2)) == 1


def test_stop_with_no_worker_running_fires_at_once() -> None:
    h = Harness(1)
    h.supervisor.start()
    h.spawned[0].end(1)
    assert h.supervisor.stop().called


def test_a_workers_output_lines_are_logged_whole() -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        protocol = WorkerProtocol(3, lambda p, r: None)
        protocol.childDataReceived(2, b"first li")
        protocol.childDataReceived(2, b"ne\nsecond\n")
        protocol.childDataReceived(1, b"out\n")
        protocol.childDataReceived(2, b"[kvd.gateway.health#warn] node a unreachable\n")
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [(e["index"], e["line"], e["log_level"].name) for e in events if "line" in e]  # type: ignore[attr-defined]
    assert lines == [
        (3, "first line", "info"),
        (3, "second", "info"),
        (3, "out", "info"),
        (3, "[kvd.gateway.health#warn] node a unreachable", "warn"),
    ]


# --- the option and the config a worker is given ------------------------------------------------


def gateway_options(*extra: str) -> Options:
    options = Options()
    options.parseOptions(["--role", "gateway", "--registry", "http://127.0.0.1:8500", *extra])
    return options


def test_workers_defaults_to_one_and_is_parsed() -> None:
    assert isinstance(gateway_options().config, GatewayConfig)
    assert gateway_options().config.workers == 1  # type: ignore[attr-defined]
    assert gateway_options("--workers", "4").config.workers == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_must_be_a_positive_number(value: str) -> None:
    with pytest.raises(SystemExit):
        gateway_options("--workers", value)


def test_workers_needs_a_listen_socket_that_can_be_shared(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gateway_options("--workers", "2", "--listen", "unix:/tmp/kvd.sock")
    assert "--workers 2 needs a tcp: or ssl: --listen, not 'unix:/tmp/kvd.sock'" in capsys.readouterr().err
    assert gateway_options("--workers", "1", "--listen", "unix:/tmp/kvd.sock").config.workers == 1  # type: ignore[attr-defined]
    assert gateway_options("--workers", "2", "--listen", "tcp:0").config.workers == 2  # type: ignore[attr-defined]


def test_a_worker_gets_exactly_the_main_process_config() -> None:
    options = gateway_options("--workers", "3", "--registry", "http://127.0.0.1:8501", "--no-hot-keys")
    config = options.config
    assert isinstance(config, GatewayConfig)
    text = config_to_json(config)
    assert json.loads(text)["workers"] == 3
    assert config_from_json(text) == config


# --- the service trees of the main process and of a worker ---------------------------------------


class ProcessReactor(MemoryReactorClock):
    """A memory reactor whose listening ports have an fd and which records the processes it spawns."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[list[str], dict[int, object], FakeProcess]] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = super().listenTCP(port, factory, backlog, interface)
        listening.fileno = lambda: 99
        return listening

    def spawnProcess(self, protocol: Any, executable: str, args: Any, env: Any = None, **kw: Any) -> FakeProcess:
        process = FakeProcess(protocol, 2000 + len(self.spawned))
        protocol.makeConnection(process)
        self.spawned.append((list(args), kw["childFDs"], process))
        return process


def cluster_of(site: Any, reactor: MemoryReactorClock) -> dict[str, Any]:
    stub = StubTreq(site.resource)
    asked = stub.get("http://gw/cluster")
    reactor.advance(figures.TIMEOUT)  # /cluster asks each node's GET /node, which nothing answers here
    stub.flush()
    answer = successResultOf_(asked)
    return successResultOf_(answer.json())  # type: ignore[no-any-return]


def successResultOf_(d: Any) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_the_main_process_starts_workers_on_its_socket_and_forwards_what_the_registry_says() -> None:
    reactor = ProcessReactor()
    top = makeService(
        gateway_options("--workers", "3", "--listen", "tcp:8000:interface=127.0.0.1"),
        reactor,  # type: ignore[arg-type]
    )
    top.privilegedStartService()
    top.startService()
    try:
        assert len(reactor.spawned) == 2
        for number, (argv, fds, _) in enumerate(reactor.spawned, 1):
            assert argv[1:4] == ["-m", "kvd.workers", str(number)]
            assert fds == {0: "w", 1: "r", 2: "r", 3: 99}  # the listening socket is the worker's fd 3
            assert config_from_json(argv[5]).workers == 3
        (watcher,) = [s.watcher for s in top if isinstance(s, WatcherService)]
        assert [s for s in top if isinstance(s, TimerService)]  # the repair sweeps
        watcher.on_change(MEMBERS)
        assert [p.written for _, _, p in reactor.spawned] == [[membership_line(MEMBERS)]] * 2
    finally:
        top.stopService()
    assert [p.signals for _, _, p in reactor.spawned] == [["TERM"], ["TERM"]]


def test_a_worker_follows_no_registry_runs_no_repair_and_takes_membership_from_its_pipe() -> None:
    reactor = MemoryReactorClock()
    config = gateway_options("--workers", "3").config
    assert isinstance(config, GatewayConfig)
    services, follow = worker_services(reactor, config, 2, 7, socket.AF_INET)
    assert not [s for s in services if isinstance(s, (WatcherService, TimerService, WorkersService))]
    read, write = os.pipe()
    os.close(write)
    try:
        (listener,) = [s for s in services if isinstance(s, AdoptedListenService)]
        listener.adopted = attrs.evolve(listener.adopted, fd=read)
        listener.privilegedStartService()
        listener.startService()
        # No connections taken before the worker knows the membership: they would all be 503s.
        assert reactor.adoptedPorts == []
        follow(MEMBERS)
        assert [(fd, family) for fd, family, _ in reactor.adoptedPorts] == [(read, socket.AF_INET)]
        with pytest.raises(OSError):
            os.fstat(read)  # closed: the adopted port has its own copy
    finally:
        try:
            os.close(read)
        except OSError:
            pass
    site = reactor.adoptedPorts[0][2]
    assert sorted(n["id"] for n in cluster_of(site, reactor)["nodes"]) == ["a", "b"]
    assert cluster_of(site, reactor)["repair"] is None
