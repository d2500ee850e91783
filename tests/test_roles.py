"""Each role's service tree: what it listens on, what it registers, and its one-line start-up errors."""

from __future__ import annotations

import queue
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from kvd.roles import HeartbeatService, HTTPClientService, JournalThread, advertised_url
from kvd.tap import Options, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize(
    ("address", "tls", "url"),
    [
        (IPv4Address("TCP", "127.0.0.1", 5001), False, "http://127.0.0.1:5001"),
        (IPv4Address("TCP", "10.0.0.6", 5443), True, "https://10.0.0.6:5443"),
        (IPv6Address("TCP", "::1", 5001), False, "http://[::1]:5001"),
    ],
)
def test_the_advertised_url_follows_the_listening_address(address: Any, tls: bool, url: str) -> None:
    assert advertised_url(address, tls) == url


def test_listening_on_every_address_advertises_the_host_name() -> None:
    assert advertised_url(IPv4Address("TCP", "0.0.0.0", 5001), False) == f"http://{socket.gethostname()}:5001"
    assert advertised_url(IPv6Address("TCP", "::", 5001), False) == f"http://{socket.gethostname()}:5001"


def test_a_socket_file_has_no_url() -> None:
    assert advertised_url(UNIXAddress("/run/kvd.sock"), False) is None


class PickingReactor(MemoryReactorClock):
    """Gives port 0 a real number, as the kernel does."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        listening = super().listenTCP(port, factory, backlog, interface)
        listening._hostAddress = IPv4Address("TCP", interface or "0.0.0.0", port or 43210)
        return listening


def heartbeats(top: Any) -> list[Any]:
    return [s.heartbeat for s in top if isinstance(s, HeartbeatService)]


def test_a_node_on_port_0_registers_the_port_it_got_with_every_registry(tmp_path: Path) -> None:
    reactor = PickingReactor()
    options = parse(
        "--role=node",
        "--node-id=a",
        f"--data-dir={tmp_path}",
        "--listen=tcp:0:interface=127.0.0.1",
        "--registry=http://127.0.0.1:8500",
        "--registry=http://127.0.0.1:8501",
    )
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    try:
        assert [(h.url, h.registry.base_url) for h in heartbeats(top)] == [
            ("http://127.0.0.1:43210", "http://127.0.0.1:8500"),
            ("http://127.0.0.1:43210", "http://127.0.0.1:8501"),
        ]
    finally:
        top.stopService()


def test_an_advertised_url_wins_over_the_port(tmp_path: Path) -> None:
    options = parse(
        "--role=node",
        "--node-id=a",
        f"--data-dir={tmp_path}",
        "--listen=tcp:0",
        "--registry=http://127.0.0.1:8500",
        "--advertise=https://kvd-a.example:443/",
    )
    top = makeService(options, reactor=PickingReactor())
    top.privilegedStartService()
    try:
        assert [h.url for h in heartbeats(top)] == ["https://kvd-a.example:443"]
    finally:
        top.stopService()


def test_a_node_without_a_registry_makes_no_outgoing_client(tmp_path: Path) -> None:
    top = makeService(parse("--role=node", "--node-id=a", f"--data-dir={tmp_path}"), reactor=MemoryReactorClock())
    assert not [s for s in top if isinstance(s, (HTTPClientService, HeartbeatService))]


def test_a_registered_node_has_one_outgoing_client_for_every_registry(tmp_path: Path) -> None:
    """One transport: a node's heartbeats to each registry share its one kept-alive pool."""
    options = parse(
        "--role=node",
        "--node-id=a",
        f"--data-dir={tmp_path}",
        "--registry=http://127.0.0.1:8500",
        "--registry=http://127.0.0.1:8501",
    )
    top = list(makeService(options, reactor=MemoryReactorClock()))
    [client] = [s for s in top if isinstance(s, HTTPClientService)]
    assert len([s for s in top if isinstance(s, HeartbeatService)]) == 2
    assert client.peers.pool is client.keep_alive


def test_dev_listens_on_its_fixed_ports(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    top = makeService(parse("--role=dev", "--nodes=2", f"--data-dir={tmp_path}"), reactor=reactor)
    top.privilegedStartService()
    top.startService()
    try:
        assert sorted(port for port, *_ in reactor.tcpServers) == [8000, 8001, 8002, 8500]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["node1", "node2"]
    finally:
        top.stopService()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--cluster-secret-file", "cannot read the cluster secret file"),
        ("--client-token-file", "cannot read the client token file"),
        ("--ca-cert", "cannot read --ca-cert"),
    ],
)
def test_a_missing_secret_or_ca_file_is_one_line_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, message: str
) -> None:
    options = parse("--role=gateway", "--node=a=http://127.0.0.1:1", flag, str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as e:
        makeService(options, reactor=MemoryReactorClock())
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_ca_file_without_a_certificate_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    options = parse("--role=registry", "--ca-cert", str(tmp_path / "ca.pem"))
    with pytest.raises(SystemExit):
        makeService(options, reactor=MemoryReactorClock())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no PEM certificate" in err, err


def test_a_port_in_use_is_one_line_at_privileged_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from twisted.internet.error import CannotListenError

    class Busy(MemoryReactor):
        def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    top = makeService(parse("--role=registry"), reactor=Busy())
    with pytest.raises(SystemExit) as e:
        top.privilegedStartService()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on tcp:8500:interface=127.0.0.1" in err, err


class _ThreadCalls:
    """A reactor's callFromThread only: calls made from other threads are queued for the test to run."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Any, tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.put((f, args))

    def run_next(self) -> None:
        f, args = self.calls.get(timeout=10)
        f(*args)


def test_the_journal_thread_runs_jobs_in_order_and_hands_results_and_errors_back_through_the_reactor() -> None:
    reactor = _ThreadCalls()
    journal = JournalThread(reactor, "test-journal")
    journal.start()
    try:
        ran: list[int] = []
        results: list[object] = []
        journal(lambda: ran.append(1) or "one").addBoth(results.append)
        journal(lambda: 1 // 0).addBoth(results.append)
        assert results == [], "results come back only through the reactor"
        reactor.run_next()
        assert ran == [1] and results == ["one"]
        reactor.run_next()
        assert isinstance(results[1], Failure) and results[1].check(ZeroDivisionError)
    finally:
        journal.stop()
    assert journal._thread is None
    late: list[object] = []
    journal(lambda: "never").addBoth(late.append)
    # A job after stop fails at once rather than waiting forever for a thread that is gone.
    assert isinstance(late[0], Failure) and "stopped" in late[0].getErrorMessage()


def test_a_job_handed_to_the_journal_thread_while_it_runs_another_needs_no_wake_up() -> None:
    reactor = _ThreadCalls()
    journal = JournalThread(reactor, "test-journal")
    journal.start()
    try:
        running, release = threading.Event(), threading.Event()
        results: list[object] = []

        def fsync_under_way() -> str:
            running.set()
            assert release.wait(10)
            return "first"

        journal(fsync_under_way).addBoth(results.append)
        assert running.wait(10)
        pokes = journal.pokes
        journal(lambda: "second").addBoth(results.append)
        assert journal.pokes == pokes, "the thread is awake: no byte down the pipe"
        release.set()
        reactor.run_next()
        reactor.run_next()
        assert results == ["first", "second"]
    finally:
        journal.stop()


def test_the_journal_thread_loses_no_wake_up_when_jobs_come_as_it_goes_to_sleep() -> None:
    """Each job waits for the one before, so most find the thread on its way to sleep, or asleep."""
    reactor = _ThreadCalls()
    journal = JournalThread(reactor, "test-journal")
    journal.start()
    try:
        results: list[object] = []
        for i in range(2000):
            journal(lambda i=i: i).addBoth(results.append)  # type: ignore[misc]
            reactor.run_next()  # fails after 10 s if a job waits for a wake-up that never came
        assert results == list(range(2000))
        assert 0 < journal.pokes <= 2000
    finally:
        journal.stop()


@implementer(IReactorThreads)
class NoThreadsRun(MemoryReactorClock):
    """A reactor whose thread pool takes jobs and never runs them: a build left there never ends."""

    def getThreadPool(self) -> Any:
        class Pool:
            def callInThreadWithCallback(self, *args: Any, **kwargs: Any) -> None:
                pass

        return Pool()


def test_a_gateway_with_static_nodes_has_its_ring_before_it_serves() -> None:
    from treq.testing import StubTreq
    from twisted.application.internet import StreamServerEndpointService

    from kvd.roles import gateway

    options = Options()
    options.parseOptions(
        ["--role", "gateway", "--node", "a=http://127.0.0.1:5001", "--node", "b=http://127.0.0.1:5002"]
    )
    services = gateway(NoThreadsRun(), options.config)
    (listener,) = [s for s in services if isinstance(s, StreamServerEndpointService)]
    answer = StubTreq(listener.factory.resource).get("http://gw/cluster/owners/k")
    results: list[Any] = []
    answer.addCallback(lambda response: response.json()).addCallback(results.append)
    assert results and sorted(results[0]["nodes"]) == ["a", "b"], "no thread needed for the first ring"
