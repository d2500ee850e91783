"""The Site every role serves: request bodies are bounded before they are buffered."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvd import web
from kvd.web import BoundedSite


class Echo(Resource):
    isLeaf = True

    def render_PUT(self, request: object) -> bytes:
        return b"got %d bytes" % len(request.content.read())  # type: ignore[attr-defined]


def connect(limit: int) -> tuple[object, StringTransport]:
    site = BoundedSite(Echo(), max_body=limit)
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_content_length_over_the_limit_is_refused_before_the_body_arrives() -> None:
    protocol, transport = connect(10)
    protocol.dataReceived(  # type: ignore[attr-defined]
        b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer
    assert b'"success": false' in answer
    assert transport.disconnecting


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit() -> None:
    protocol, transport = connect(10)
    protocol.dataReceived(  # type: ignore[attr-defined]
        b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n"
    )
    assert transport.value() == b""
    protocol.dataReceived(b"8\r\n12345678\r\n0\r\n\r\n")  # type: ignore[attr-defined]
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"got" not in answer, "the resource never sees a cut-off body"
    assert transport.disconnecting


def test_bodies_within_the_limit_reach_the_resource() -> None:
    protocol, transport = connect(10)
    protocol.dataReceived(  # type: ignore[attr-defined]
        b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n5\r\n67890\r\n0\r\n\r\n"
    )
    protocol.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")  # type: ignore[attr-defined]
    answer = transport.value()
    assert answer.count(b"HTTP/1.1 200 ") == 2 and answer.count(b"got 10 bytes") == 2, answer


def test_a_malformed_request_gets_a_json_400() -> None:
    protocol, transport = connect(10)
    protocol.dataReceived(b"GET /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")  # type: ignore[attr-defined]
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"success": false' in answer, answer


def test_an_http_1_0_client_that_asks_to_keep_its_connection_keeps_it() -> None:
    protocol, transport = connect(10)
    for _ in range(2):
        protocol.dataReceived(  # type: ignore[attr-defined]
            b"PUT /kv/k HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Length: 3\r\n\r\nabc"
        )
    answer = transport.value()
    assert answer.count(b"HTTP/1.0 200 ") == 2 and answer.count(b"got 3 bytes") == 2, answer
    assert answer.lower().count(b"connection: keep-alive") == 2, answer
    assert not transport.disconnecting


def test_an_http_1_0_client_that_does_not_ask_is_closed_after_its_answer() -> None:
    protocol, transport = connect(10)
    protocol.dataReceived(b"PUT /kv/k HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.0 200 ")
    assert transport.disconnecting


def test_the_socket_address_is_asked_once_a_connection_not_once_a_request() -> None:
    protocol, transport = connect(10)
    asked: list[str] = []
    host = transport.getHost

    def counted() -> object:
        asked.append("getHost")
        return host()

    transport.getHost = counted  # type: ignore[method-assign]
    for _ in range(3):
        protocol.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")  # type: ignore[attr-defined]
    assert transport.value().count(b"HTTP/1.1 200 ") == 3
    assert len(asked) == 1


def test_the_date_header_is_formatted_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    formatted: list[int] = []
    monkeypatch.setattr(web, "datetimeToString", lambda second: formatted.append(second) or b"D%d" % second)
    monkeypatch.setattr(web.time, "time", lambda: 1000.25)
    protocol, transport = connect(10)
    for _ in range(2):
        protocol.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")  # type: ignore[attr-defined]
    monkeypatch.setattr(web.time, "time", lambda: 1001.5)
    protocol.dataReceived(b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na")  # type: ignore[attr-defined]
    answer = transport.value()
    assert answer.count(b"Date: D1000\r\n") == 2 and answer.count(b"Date: D1001\r\n") == 1, answer
    assert formatted == [1000, 1001]


class Writes(StringTransport):
    """A transport that records each write (a writeSequence is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))


class Answers(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/empty":
            request.setResponseCode(204)
            return b""
        if request.path == b"/chunked":
            request.write(b"part")
            request.finish()
            return NOT_DONE_YET  # type: ignore[no-any-return]
        request.setHeader(b"content-length", b"4")
        return b"body"


def test_an_answer_s_head_and_body_reach_the_transport_in_one_write() -> None:
    protocol = BoundedSite(Answers()).buildProtocol(None)
    transport = Writes()
    protocol.makeConnection(transport)
    pipelined = b"".join(
        b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % path for path in (b"one", b"empty", b"chunked", b"two")
    )
    protocol.dataReceived(pipelined)  # type: ignore[attr-defined]
    whole = transport.value()
    assert whole.count(b"HTTP/1.1 ") == 4, whole
    one, empty = transport.writes[0], transport.writes[1]
    assert one.startswith(b"HTTP/1.1 200 ") and one.endswith(b"\r\n\r\nbody"), one
    assert empty.startswith(b"HTTP/1.1 204 ") and empty.endswith(b"\r\n\r\n"), empty
    assert transport.writes[2].startswith(b"HTTP/1.1 200 ") and transport.writes[2].endswith(b"4\r\npart\r\n")
    assert transport.writes[3] == b"0\r\n\r\n"  # the chunked answer's end
    assert transport.writes[4].startswith(b"HTTP/1.1 200 ") and transport.writes[4].endswith(b"body")
    assert len(transport.writes) == 5


def test_a_fast_route_s_pending_answer_is_cancelled_when_its_client_goes() -> None:
    from twisted.internet.defer import Deferred
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    from kvd.auth import Auth
    from kvd.resources import Routes

    pending: list[Deferred[bytes]] = []

    class Slow:
        routes = Routes()

        @routes.path("/slow", "GET", fast=True)
        def slow(self, request: Any) -> Deferred[bytes]:
            d: Deferred[bytes] = Deferred()
            pending.append(d)
            return d

    protocol = BoundedSite(Slow.routes.resource(Slow(), Auth())).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert len(pending) == 1 and not pending[0].called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert pending[0].called, "the client went: its quorum is not waited for"
    assert transport.value() == b""


class Headed(Resource):
    """Answers as the hot routes do (headers set one by one), and in the ways that need Twisted's own writing."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.path == b"/bare":
            return b"{}"  # Twisted gives it its default Content-Type
        request.setHeader(b"etag", b'"v1"')
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/odd":
            request.setHeader(b"content-type", b"text/plain\r\nX-Injected: 1")  # sanitised, as by Twisted
            request.setHeader(b"allow", b"GET")
        if request.path == b"/nolength":
            return b"{}"  # the Site sets the length itself, after the handler
        request.setHeader(b"content-length", b"2")
        request.setHeader(b"etag", b'"v2"')  # set again: the last value counts
        return b"{}"


def _answers(site: Any, requests: bytes) -> list[tuple[bytes, list[bytes], bytes]]:
    """Each answer's status line, sorted header lines (the Date's value left out) and body."""
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(requests)
    answers = []
    for raw in transport.value().split(b"HTTP/1.")[1:]:
        head, _, body = raw.partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        lines = sorted(b"Date: ..." if line.startswith(b"Date: ") else line for line in lines)
        answers.append((status, lines, body))
    return answers


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /odd HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /nolength HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /bare HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HEAD /plain HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /plain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /plain HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /plain HTTP/1.0\r\n\r\n",
    ],
)
def test_an_answer_s_headers_are_the_ones_twisted_writes(request_bytes: bytes) -> None:
    from twisted.web.server import Site

    ours = _answers(BoundedSite(Headed()), request_bytes * 2)
    theirs = _answers(Site(Headed()), request_bytes * 2)
    if b"HTTP/1.0" in request_bytes and b"keep-alive" in request_bytes:
        # kvd keeps such a connection (Twisted closes it) and says so.
        for _, lines, _ in ours:
            lines.remove(b"Connection: Keep-Alive")
        theirs = theirs * 2
    assert ours == theirs
    assert all(b"Date: ..." in lines and b"X-Injected: 1" not in lines for _, lines, _ in ours)


def test_the_hot_routes_answer_is_one_block_in_twisted_s_order() -> None:
    protocol = BoundedSite(Headed()).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    head = transport.value().split(b"\r\n")
    assert head[0] == b"HTTP/1.1 200 OK"
    names = [line.split(b":")[0] for line in head[1:6]]
    assert names == [b"Server", b"Date", b"ETag", b"Content-Type", b"Content-Length"]
    assert head[3] == b'ETag: "v2"' and head[-1] == b"{}"


class Later(Resource):
    """Answers /slow only when told to; anything else at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        if request.path == b"/slow":
            self.waiting.append(request)
            return NOT_DONE_YET
        return b"now"


def test_the_idle_timer_is_not_made_anew_for_each_request_and_keeps_its_meaning() -> None:
    from twisted.internet.task import Clock

    clock = Clock()
    resource = Later()
    protocol = BoundedSite(resource, timeout=60, reactor=clock).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    (timer,) = clock.getDelayedCalls()
    for _ in range(3):
        protocol.dataReceived(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().count(b"HTTP/1.1 200 ") == 3
    assert clock.getDelayedCalls() == [timer] and timer.active(), "one timer, armed, for the whole connection"
    clock.advance(59)
    # A request longer than the idle timeout is not cut off: the connection is not idle.
    protocol.dataReceived(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    clock.advance(120)
    assert not transport.disconnecting
    request = resource.waiting.pop()
    request.write(b"late")
    request.finish()
    assert transport.value().endswith(b"4\r\nlate\r\n0\r\n\r\n")
    clock.advance(59)
    assert not transport.disconnecting, "idle for 59 s since its answer"
    clock.advance(2)
    assert transport.disconnecting, "idle for 61 s"
    protocol.connectionLost(None)  # type: ignore[attr-defined]
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("lean", [False, True])
def test_an_import_without_its_token_is_refused_before_its_body_is_read(lean: bool) -> None:
    """An import (up to 16 GiB, spooled to disk) from a client without the token: 401 at once, body unread."""
    from kvd.auth import Auth
    from kvd.lean_http import LeanSite
    from kvd.resources import Routes

    class Imports:
        routes = Routes()

        @routes.path("/import", "POST")
        def import_(self, request: Any) -> bytes:
            return b"imported"

    kind = LeanSite if lean else BoundedSite
    site = kind(Imports.routes.resource(Imports(), Auth(client_token=b"tok")), max_body=10)
    for path, authorization in ((b"/import", b""), (b"/import?x=1", b"Authorization: Bearer wrong\r\n")):
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(  # type: ignore[attr-defined]
            b"POST %s HTTP/1.1\r\nHost: x\r\n%sContent-Length: 100000\r\n\r\nsome" % (path, authorization)
        )
        answer = transport.value()
        assert answer.startswith(b"HTTP/1.1 401 "), (path, answer)
        assert b'WWW-Authenticate: Bearer realm="kvd"' in answer and b'"success": false' in answer
        assert transport.disconnecting, path
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(  # type: ignore[attr-defined]
        b"POST /import HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nContent-Length: 4\r\n\r\nbody"
    )
    assert b"imported" in transport.value(), "with the token the body is read and the handler answers"
