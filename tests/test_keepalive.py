"""The gateway's kept-alive HTTP client: framing, reuse, and failures, over in-memory transports."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kvd.client import Answer, AnswerTooLarge, KeepAlivePool, KeepAliveProtocol, Peers, PeerTimeout, PeerUnreachable


class Wire:
    """Connects each new protocol to a StringTransport the test can read and answer on."""

    def __init__(self) -> None:
        self.connections: list[tuple[KeepAliveProtocol, StringTransport]] = []

    def __call__(self, host: str, port: int, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)

    def answer(self, index: int, data: bytes, chunk: int = 0) -> None:
        protocol, _ = self.connections[index]
        if chunk:
            for i in range(0, len(data), chunk):
                protocol.dataReceived(data[i : i + chunk])
        else:
            protocol.dataReceived(data)


def start(pool: KeepAlivePool, method: str = "GET", path: str = "/kv/k", body: bytes | None = None) -> list[Any]:
    results: list[Any] = []
    ensureDeferred(pool.call("127.0.0.1", 8001, method, path, body)).addBoth(results.append)
    return results


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"success": true}'[:-1]


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def pool(wire: Wire) -> KeepAlivePool:
    return KeepAlivePool(Clock(), max_answer=1000, connect=wire)


def test_a_request_is_written_once_and_its_answer_parsed_even_byte_by_byte(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool, "PUT", "/kv/a%2Fb", b"value")
    assert wire.connections[0][1].value() == (
        b"PUT /kv/a%2Fb HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nContent-Length: 5\r\n\r\nvalue"
    )
    wire.answer(0, OK, chunk=1)
    assert results == [Answer(200, b'{"success": true')]


def test_a_kept_alive_connection_is_reused(wire: Wire, pool: KeepAlivePool) -> None:
    first = start(pool)
    wire.answer(0, OK)
    second = start(pool)
    wire.answer(0, OK)
    assert first and second and len(wire.connections) == 1


def test_connection_close_is_honoured(wire: Wire, pool: KeepAlivePool) -> None:
    start(pool)
    wire.answer(0, OK.replace(b"Content-Length", b"Connection: close\r\nContent-Length"))
    start(pool)
    assert len(wire.connections) == 2


def test_chunked_answers_are_decoded(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool)
    wire.answer(
        0, b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", chunk=3
    )
    assert results == [Answer(404, b"abcde")]


def test_an_answer_without_length_ends_with_the_connection(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool)
    wire.answer(0, b"HTTP/1.0 200 OK\r\n\r\nall of it")
    assert results == []
    wire.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert results == [Answer(200, b"all of it")]


def test_a_connection_lost_mid_answer_fails_the_call(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool)
    wire.answer(0, OK[:30])
    wire.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert len(results) == 1 and isinstance(results[0], Failure) and results[0].check(ConnectionLost)


def test_a_stale_kept_connection_is_retried_once_on_a_new_one(wire: Wire, pool: KeepAlivePool) -> None:
    start(pool)
    wire.answer(0, OK)
    results = start(pool)
    wire.connections[0][0].connectionLost(Failure(ConnectionLost()))  # the peer had closed it
    assert len(wire.connections) == 2 and results == []
    wire.answer(1, OK)
    assert results == [Answer(200, b'{"success": true')]


def test_an_oversized_answer_is_refused(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool)
    wire.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n" + b"x" * 70000)
    assert len(results) == 1 and results[0].check(AnswerTooLarge)
    assert wire.connections[0][1].disconnecting, "the connection is dropped"


def test_peers_time_out_a_silent_peer_and_abort_its_connection(wire: Wire) -> None:
    clock = Clock()
    pool = KeepAlivePool(clock, connect=wire)
    peers = Peers(http=None, reactor=clock, timeout=2.0, keep_alive=pool)  # type: ignore[arg-type]
    results: list[Any] = []
    peers.call("GET", "http://127.0.0.1:8001/kv/k").addBoth(results.append)
    clock.advance(1.9)
    assert results == []
    clock.advance(0.2)
    assert len(results) == 1 and results[0].check(PeerTimeout)
    assert wire.connections[0][1].disconnecting or wire.connections[0][0].closed


def test_peers_name_the_url_when_a_peer_refuses(wire: Wire) -> None:
    def refuse(host: str, port: int, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        return fail(ConnectionRefusedError())

    clock = Clock()
    peers = Peers(http=None, reactor=clock, keep_alive=KeepAlivePool(clock, connect=refuse))  # type: ignore[arg-type]
    results: list[Any] = []
    peers.call("GET", "http://127.0.0.1:8001/kv/k").addBoth(results.append)
    assert results[0].check(PeerUnreachable) and "127.0.0.1:8001" in str(results[0].value)


def test_the_answer_to_head_has_no_body_whatever_its_length_says(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool, "HEAD")
    wire.answer(0, OK.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert results == [Answer(200, b"")]
    again = start(pool)
    wire.answer(0, OK)
    assert again and len(wire.connections) == 1, "the connection is still in step"
