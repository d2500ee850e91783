"""kvd's one transport: framing, reuse and failures over in-memory transports, and against a real Site."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from kvd.transport import (
    Answer,
    AnswerTooLarge,
    BadFraming,
    KeepAlivePool,
    KeepAliveProtocol,
    Origin,
    Peers,
    PeerTimeout,
    PeerUnreachable,
    parse_origin,
)


class Wire:
    """Connects each new protocol to a StringTransport the test can read and answer on."""

    def __init__(self) -> None:
        self.connections: list[tuple[KeepAliveProtocol, StringTransport]] = []

    def __call__(self, origin: Origin, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
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
    pool.request(ORIGIN, method, path, body).addBoth(results.append)
    return results


ORIGIN = parse_origin("http://127.0.0.1:8001")
assert ORIGIN is not None
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
    peers = Peers(pool, clock, 2.0)
    results: list[Any] = []
    peers.call("GET", "http://127.0.0.1:8001/kv/k").addBoth(results.append)
    clock.advance(1.9)
    assert results == []
    clock.advance(0.2)
    assert len(results) == 1 and results[0].check(PeerTimeout)
    assert wire.connections[0][1].disconnecting or wire.connections[0][0].closed


def test_peers_time_out_a_silent_peer_on_a_kept_connection_and_abort_it(wire: Wire) -> None:
    """A call over a kept connection (in plain callbacks, not a coroutine) times out as one over a fresh one."""
    clock = Clock()
    pool = KeepAlivePool(clock, connect=wire)
    peers = Peers(pool, clock, 2.0)
    results: list[Any] = []
    peers.call("POST", "http://127.0.0.1:8001/internal/apply", b"{}").addBoth(results.append)
    wire.answer(0, OK)
    assert results == [Answer(200, b'{"success": true')]
    peers.call("POST", "http://127.0.0.1:8001/internal/apply", b"{}").addBoth(results.append)
    assert len(wire.connections) == 1, "the kept connection is reused"
    clock.advance(2.1)
    assert len(results) == 2 and results[1].check(PeerTimeout)
    assert wire.connections[0][1].disconnecting or wire.connections[0][0].closed
    peers.call("POST", "http://127.0.0.1:8001/internal/apply", b"{}").addBoth(results.append)
    assert len(wire.connections) == 2, "the aborted connection is not reused"
    wire.answer(1, OK)
    assert results[2] == Answer(200, b'{"success": true')


def test_peers_name_the_url_when_a_peer_refuses(wire: Wire) -> None:
    def refuse(origin: Origin, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        return fail(ConnectionRefusedError())

    clock = Clock()
    peers = Peers(KeepAlivePool(clock, connect=refuse), clock)
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


def failed_with(results: list[Any], error: type[Exception]) -> bool:
    return len(results) == 1 and isinstance(results[0], Failure) and bool(results[0].check(error))


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"-6\r\nabcdef\r\n0\r\n\r\n", id="a negative chunk size"),
        pytest.param(b"+6\r\nabcdef\r\n0\r\n\r\n", id="a signed chunk size"),
        pytest.param(b"zz\r\nabcdef\r\n0\r\n\r\n", id="a chunk size that is not hex"),
        pytest.param(b"0x6\r\nabcdef\r\n0\r\n\r\n", id="a chunk size with a 0x prefix"),
        pytest.param(b"\r\nabcdef\r\n0\r\n\r\n", id="an empty chunk-size line"),
        pytest.param(b"6\r\nabcdefXY0\r\n\r\n", id="a chunk not followed by CRLF"),
        pytest.param(b"6" * 2000, id="a chunk-size line that never ends"),
    ],
)
def test_malformed_chunked_framing_fails_the_call_at_once_and_drops_the_connection(
    wire: Wire, pool: KeepAlivePool, framing: bytes
) -> None:
    results = start(pool)
    wire.answer(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + framing)
    assert failed_with(results, BadFraming)
    assert wire.connections[0][1].disconnecting


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"garbage\r\n\r\n", id="not a status line"),
        pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", id="a four-digit status"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", id="a negative Content-Length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", id="two lengths"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", id="an unknown transfer coding"),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", id="a header without a colon"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, id="a head that never ends"),
    ],
)
def test_a_malformed_head_fails_the_call(wire: Wire, pool: KeepAlivePool, head: bytes) -> None:
    results = start(pool)
    wire.answer(0, head)
    assert failed_with(results, BadFraming)


def test_a_negative_chunk_size_is_a_peer_error_naming_the_url_not_a_hang(wire: Wire) -> None:
    clock = Clock()
    peers = Peers(KeepAlivePool(clock, connect=wire), clock, 2.0)
    results: list[Any] = []
    peers.call("POST", "http://127.0.0.1:8001/internal/read", b"{}").addBoth(results.append)
    wire.answer(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nabcdef\r\n")
    assert failed_with(results, PeerUnreachable), "at once, before any timeout"
    assert "127.0.0.1:8001" in str(results[0].value)


def test_interim_1xx_answers_are_skipped_and_the_final_one_read(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool, "PUT", "/kv/k", b"v")
    wire.answer(0, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", chunk=7)
    assert results == [], "an interim answer is not the answer"
    wire.answer(0, OK)
    assert results == [Answer(200, b'{"success": true')]


def test_an_oversized_content_length_is_refused_at_the_header(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool)
    wire.answer(0, b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n")
    assert failed_with(results, AnswerTooLarge), "before any of the body is read"
    assert wire.connections[0][1].disconnecting


def test_an_oversized_chunk_is_refused_at_its_size_line(wire: Wire, pool: KeepAlivePool) -> None:
    results = start(pool)
    wire.answer(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1f4\r\n" + b"x" * 500 + b"\r\n3e9\r\n")
    assert failed_with(results, AnswerTooLarge)


def test_a_per_call_cap_is_tighter_than_the_pool_s(wire: Wire, pool: KeepAlivePool) -> None:
    results: list[Any] = []
    pool.request(ORIGIN, "GET", "/registry/nodes", None, max_answer=10).addBoth(results.append)
    wire.answer(0, OK)
    assert failed_with(results, AnswerTooLarge)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_a_request_that_may_have_been_applied_is_never_sent_twice(wire: Wire, pool: KeepAlivePool, method: str) -> None:
    start(pool)
    wire.answer(0, OK)
    results = start(pool, method, "/internal/apply", b'{"items": []}')
    wire.connections[0][0].connectionLost(Failure(ConnectionLost()))  # after the request was written
    assert len(wire.connections) == 1, "no second connection, no second request"
    assert failed_with(results, ConnectionLost)


def test_a_get_whose_answer_had_begun_is_not_sent_again(wire: Wire, pool: KeepAlivePool) -> None:
    start(pool)
    wire.answer(0, OK)
    results = start(pool)
    wire.answer(0, OK[:20])
    wire.connections[0][0].connectionLost(Failure(ConnectionLost()))
    assert len(wire.connections) == 1 and failed_with(results, ConnectionLost)


def test_a_kept_connection_found_closed_is_skipped_even_for_a_post(wire: Wire, pool: KeepAlivePool) -> None:
    start(pool)
    wire.answer(0, OK)
    wire.connections[0][0].connectionLost(Failure(ConnectionLost()))  # closed while idle, before any write
    results = start(pool, "POST", "/internal/apply", b"{}")
    assert len(wire.connections) == 2 and wire.connections[0][1].value().count(b"POST") == 0
    wire.answer(1, OK)
    assert results == [Answer(200, b'{"success": true')]


def test_a_connection_idle_too_long_is_not_reused() -> None:
    clock, wire = Clock(), Wire()
    pool = KeepAlivePool(clock, connect=wire, idle_seconds=30)
    start(pool)
    wire.answer(0, OK)
    clock.advance(31)
    start(pool, "POST", "/internal/apply", b"{}")
    assert len(wire.connections) == 2 and wire.connections[0][1].disconnecting


def test_an_ipv6_peer_is_named_in_brackets_in_the_host_header(wire: Wire) -> None:
    clock = Clock()
    peers = Peers(KeepAlivePool(clock, connect=wire), clock)
    peers.call("GET", "http://[::1]:8001/kv/k")
    assert wire.connections[0][1].value().startswith(b"GET /kv/k HTTP/1.1\r\nHost: [::1]:8001\r\n")


def test_origins_are_http_or_https_with_default_ports() -> None:
    assert parse_origin("https://node.example") == Origin("https", "node.example", 443, b"node.example:443")
    assert parse_origin("http://node.example") == Origin("http", "node.example", 80, b"node.example:80")
    assert parse_origin("ftp://node.example") is None
    assert parse_origin("http://node.example:99999") is None


def test_a_url_that_is_not_http_is_a_peer_error(wire: Wire) -> None:
    clock = Clock()
    results: list[Any] = []
    Peers(KeepAlivePool(clock, connect=wire), clock).call("GET", "ftp://x/kv/k").addBoth(results.append)
    assert failed_with(results, PeerUnreachable) and not wire.connections


def test_chunked_answers_are_parsed_incrementally(wire: Wire, pool: KeepAlivePool) -> None:
    """Bytes already parsed are not kept, so each byte is looked at a bounded number of times."""
    pool.max_answer = 10**6
    results = start(pool)
    protocol = wire.connections[0][0]
    protocol.max_answer = 10**6
    wire.answer(0, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(500):
        wire.answer(0, b"2\r\nab\r\n")
        assert len(protocol._buffer) == 0
    wire.answer(0, b"0\r\n\r\n")
    assert results == [Answer(200, b"ab" * 500)]


def test_https_origins_connect_through_the_tls_policy() -> None:
    class Policy:
        asked: list[tuple[bytes, int]] = []

        def creatorForNetloc(self, host: bytes, port: int) -> Any:
            self.asked.append((host, port))
            raise RuntimeError("stop here")

    clock = MemoryReactorClock()
    results: list[Any] = []
    peers = Peers(KeepAlivePool(clock, tls_policy=Policy()), clock)
    peers.call("GET", "https://node.example:8443/kv/k").addBoth(results.append)
    assert Policy.asked == [(b"node.example", 8443)]
    assert failed_with(results, PeerUnreachable)


class _Socket:
    """What an eager transport sends through: takes at most C{room} bytes a call (None: refuses with EAGAIN)."""

    def __init__(self, room: int | None) -> None:
        self.room = room
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        if self.room is None:
            raise BlockingIOError(11, "EAGAIN")
        taken = bytes(data[: self.room])
        self.sent.append(taken)
        return len(taken)


def _eager(room: int | None) -> tuple[Any, _Socket, list[str]]:
    """A plain TCP server transport made eager, over a fake socket; C{calls} records writability registrations."""
    from twisted.internet import tcp

    from kvd.transport import send_eagerly

    transport: Any = object.__new__(tcp.Server)
    socket = _Socket(room)
    calls: list[str] = []
    transport.socket, transport.connected, transport.producer, transport.disconnecting = socket, True, None, False
    transport._tempDataBuffer, transport._tempDataLen = [], 0
    transport.startWriting = lambda: calls.append("startWriting")
    send_eagerly(transport)
    assert type(transport) is not tcp.Server
    return transport, socket, calls


def test_an_eager_transport_sends_a_write_at_once_without_registering_for_writability() -> None:
    transport, socket, calls = _eager(room=1 << 20)
    transport.writeSequence([b"HTTP/1.1 200 OK\r\n", b"\r\n", b"body"])
    transport.write(b"more")
    assert socket.sent == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    assert calls == [] and transport._tempDataLen == 0


def test_what_an_eager_send_leaves_over_is_buffered_in_order_for_the_reactor() -> None:
    transport, socket, calls = _eager(room=3)
    transport.write(b"abcdef")
    transport.write(b"gh")  # something waits already: this goes behind it, not straight out
    assert socket.sent == [b"abc"]
    assert transport._tempDataBuffer == [b"def", b"gh"] and calls == ["startWriting", "startWriting"]


def test_a_full_socket_leaves_the_whole_write_to_the_reactor() -> None:
    transport, socket, calls = _eager(room=None)
    transport.write(b"abc")
    assert transport._tempDataBuffer == [b"abc"] and calls == ["startWriting"]


def test_only_plain_tcp_transports_are_made_eager() -> None:
    from kvd.transport import send_eagerly

    transport = StringTransport()
    send_eagerly(transport)
    assert type(transport) is StringTransport


def test_an_aborted_connection_sends_nothing_more() -> None:
    transport, socket, calls = _eager(room=1 << 20)
    transport._aborting = True
    transport.write(b"late")
    assert socket.sent == [] and calls == []
