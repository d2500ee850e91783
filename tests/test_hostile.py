"""Hostile input at the HTTP layer: slow clients, oversized headers, junk; none stops a node."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from kvd.web import BoundedSite


class Ok(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


def connect(clock: Clock, timeout: float = 60) -> tuple[Any, StringTransport]:
    site = BoundedSite(Ok(), timeout=timeout, reactor=clock)
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_client_that_dribbles_its_request_is_cut_off_after_the_idle_timeout() -> None:
    clock = Clock()
    protocol, transport = connect(clock, timeout=60)
    protocol.dataReceived(b"GET /kv/k HTTP/1.1\r\nHost: x\r\n")
    clock.advance(59)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting or transport.disconnected


def test_an_idle_connection_is_closed_after_the_timeout() -> None:
    clock = Clock()
    protocol, transport = connect(clock, timeout=60)
    clock.advance(61)
    assert transport.disconnecting or transport.disconnected


def test_an_oversized_header_line_is_refused_with_json_431() -> None:
    protocol, transport = connect(Clock())
    protocol.dataReceived(b"GET /kv/k HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 20_000 + b"\r\n\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 431 ") and b'"success": false' in answer
    assert transport.disconnecting


def test_headers_too_large_in_total_are_refused_with_json() -> None:
    protocol, transport = connect(Clock())
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
    protocol.dataReceived(b"GET /kv/k HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"success": false' in answer
    assert transport.disconnecting


def test_too_many_headers_are_refused() -> None:
    protocol, transport = connect(Clock())
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
    protocol.dataReceived(b"GET /kv/k HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")


def test_a_garbage_request_line_gets_json_400() -> None:
    protocol, transport = connect(Clock())
    protocol.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")  # a TLS hello, say
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 400 ") and b'"success": false' in answer
