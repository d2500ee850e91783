"""
A hot handler's answer in plain callbacks (L{kvd.resources.Answering}): what the Deferred
chain of a GET, PUT and DELETE did, told once, its errors through the error table, nothing
written once its connection is lost; and the coordinator's C{write_to} / C{read_to} give
their outcome to such a reply.
"""

from __future__ import annotations

import gc
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kvd.gateway import Cluster
from kvd.gateway.coordinator import Coordinator, WriteOutcome
from kvd.gateway.nodes import Written
from kvd.gateway.quorum import QuorumFailed
from kvd.keys import NotFound
from kvd.membership import NodeInfo
from kvd.resources import Answering
from kvd.versions import HybridClock


class _Request:
    method = b"GET"
    path = b"/kv/k"
    args: dict[bytes, list[bytes]] = {}
    content = BytesIO()

    def __init__(self) -> None:
        self.code = 200
        self.headers: dict[bytes, bytes] = {}
        self.written: list[bytes] = []
        self.finished = False
        self._disconnected = False

    def getHeader(self, key: bytes) -> bytes | None:
        return None

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True


def test_an_answer_is_rendered_written_and_finished_once() -> None:
    request = _Request()
    answering: Answering[str] = Answering(request, "k", lambda outcome: outcome.encode())
    answering.write()
    answering.callback("first")
    answering.callback("second")
    answering.errback(Failure(NotFound("no such key")))
    assert request.written == [b"first"]
    assert request.finished and answering.called


def test_what_render_raises_and_failures_go_through_the_error_table() -> None:
    def render(outcome: str) -> bytes:
        raise NotFound("no such key")

    request = _Request()
    answering: Answering[str] = Answering(request, "k", render)
    answering.write()
    answering.callback("x")
    assert request.code == 404
    assert b'"no such key"' in request.written[0] and b'"key":"k"' in request.written[0].replace(b" ", b"")

    request = _Request()
    answering = Answering(request, "k", render)
    answering.write()
    answering.errback(QuorumFailed("write", 1, 2, ["b: down"]))
    assert request.code == 503
    assert b"write quorum not reached" in request.written[0]


def test_an_answer_known_before_the_handler_returns_waits_to_be_written_or_given_to_klein() -> None:
    request = _Request()
    answering: Answering[str] = Answering(request, "k", lambda outcome: outcome.encode())
    answering.callback("at once")
    assert request.written == [], "not written before the front door takes it"
    answering.write()
    assert request.written == [b"at once"] and request.finished

    request = _Request()
    answering = Answering(request, "k", lambda outcome: outcome.encode())
    answering.callback("at once")
    assert answering.deferred() == b"at once" and request.written == []


def test_klein_gets_a_deferred_of_the_answer_its_errors_rendered() -> None:
    request = _Request()
    answering: Answering[str] = Answering(request, "k", lambda outcome: outcome.encode())
    d = answering.deferred()
    assert isinstance(d, Deferred) and not d.called
    answering.callback("later")
    assert d.result == b"later" and request.written == []

    request = _Request()
    answering = Answering(request, "k", lambda outcome: outcome.encode())
    d = answering.deferred()
    answering.errback(NotFound("no such key"))
    assert isinstance(d, Deferred) and b"no such key" in d.result and request.code == 404


def test_nothing_is_written_after_the_connection_is_lost() -> None:
    request = _Request()
    answering: Answering[str] = Answering(request, "k", lambda outcome: outcome.encode())
    answering.write()
    answering.cancel()
    answering.callback("late")
    answering.errback(Failure(NotFound("no such key")))
    assert request.written == [] and not request.finished


class _Node:
    def apply_key_to(self, reply: Any, key: str, value: str | None, version: str) -> None:
        reply.callback(Written(True, version))

    def read_key_to(self, reply: Any, key: str) -> None:
        reply.callback(("v", "01a232b718df000000.gw"))

    def apply_key(self, key: str, value: str | None, version: str) -> Deferred[Written]:
        return succeed(Written(True, version))


class _Health:
    clock = Clock()
    judged_unreachable: frozenset[str] = frozenset()

    def reachable(self, node_id: str) -> bool:
        return True

    def hedge_delay(self, nodes: list[str]) -> float:
        return 0.05


class _Nodes:
    health = _Health()
    node = _Node()

    def __call__(self, info: NodeInfo) -> _Node:
        return self.node


def _coordinator() -> Coordinator:
    cluster = Cluster(vnodes=8, replicas=3)
    cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abc"})
    nodes: Any = _Nodes()
    return Coordinator(cluster, nodes, HybridClock(Clock().seconds, "gw"))


def test_write_to_and_read_to_tell_their_reply_and_leave_no_reference_cycles() -> None:
    coordinator = _coordinator()
    outcomes: list[Any] = []

    class Reply:
        def callback(self, outcome: Any) -> None:
            outcomes.append(outcome)

        def errback(self, failure: Any) -> None:
            outcomes.append(failure)

    gc.collect()
    gc.disable()
    try:
        for i in range(20):
            coordinator.write_to(Reply(), f"k{i}", "v")
            coordinator.read_to(Reply(), f"k{i}")
        found = gc.collect()
    finally:
        gc.enable()
    writes, reads = outcomes[0::2], outcomes[1::2]
    assert all(isinstance(outcome, WriteOutcome) for outcome in writes), writes[:1]
    assert reads == [("v", "01a232b718df000000.gw")] * 20
    assert found == 0, f"{found} objects were left in reference cycles by 20 writes and reads"


def test_a_quorum_that_fails_goes_to_the_errback() -> None:
    coordinator = _coordinator()
    coordinator.write_quorum = 4  # more than the 3 replicas can give: min(4, 3) = 3, all must take it
    failures: list[Any] = []

    class Refusing(_Node):
        def apply_key_to(self, reply: Any, key: str, value: str | None, version: str) -> None:
            reply.errback(Failure(RuntimeError("disk full")))

    coordinator.nodes.node = Refusing()  # type: ignore[attr-defined]

    class Reply:
        def callback(self, outcome: Any) -> None:
            raise AssertionError(f"answered {outcome!r}")

        def errback(self, failure: Any) -> None:
            failures.append(failure)

    coordinator.write_to(Reply(), "k", "v")
    assert len(failures) == 1 and failures[0].check(QuorumFailed)
