"""
Outgoing HTTP: every call kvd makes to another kvd process goes through here.

One attrs class around an injected treq L{HTTPClient}, so tests pass a C{StubTreq} and a
C{Clock}. Every call is bounded in time (headers and body together) and in how much of the
peer's answer is read; a peer that cannot be reached or takes too long is a L{PeerError}
naming the URL, never a hang.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

import treq
from attrs import define, field, frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

#: An answer bigger than this is cut off: enough for a JSON-escaped value of the default
#: maximum size (control characters escape to six bytes) and a little more.
DEFAULT_MAX_ANSWER = 8 * 1024 * 1024
DEFAULT_TIMEOUT = 5.0


class PeerError(Exception):
    """A peer could not be asked; C{str()} names it and says why."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class PeerUnreachable(PeerError):
    pass


class PeerTimeout(PeerError):
    pass


class AnswerTooLarge(Exception):
    pass


@frozen
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@define
class Peers:
    """Makes bounded HTTP calls to other kvd processes."""

    http: HTTPClient
    reactor: Any  # IReactorTime; treq asks for a fuller reactor type than it uses
    timeout: float = DEFAULT_TIMEOUT
    max_answer: int = DEFAULT_MAX_ANSWER
    #: When set, plain-http calls go through it instead of treq.
    keep_alive: KeepAlivePool | None = None
    #: The Authorization header sent with every call (the cluster secret), if any.
    authorization: bytes | None = None
    _origins: dict[str, tuple[str, int, str] | None] = field(factory=dict)

    def call(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        timeout: float | None = None,
        authorization: bytes | None = None,
    ) -> Deferred[Answer]:
        """
        Make one request and read the whole answer, within C{timeout} seconds in all.

        @raise PeerTimeout: when the time runs out.
        @raise PeerUnreachable: when the connection fails or the answer is cut short or too large.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = self.reactor.seconds() + limit
        authorization = authorization or self.authorization
        target = self._plain_http(url) if self.keep_alive is not None else None
        if target is not None and self.keep_alive is not None:
            host, port, path = target
            d = Deferred.fromCoroutine(self.keep_alive.call(host, port, method, path, body, authorization))
        else:
            d = Deferred.fromCoroutine(self._call(method, url, body, limit, authorization))
        d.addTimeout(limit, self.reactor)
        return d.addErrback(self._explain, url, limit, deadline)

    def _plain_http(self, url: str) -> tuple[str, int, str] | None:
        """(host, port, path) of a kvd data-path URL over plain http, else None; origins are parsed once."""
        if not url.startswith("http://"):
            return None
        cut = url.find("/", 7)
        if cut < 0:
            return None
        origin, path = url[:cut], url[cut:]
        if not path.startswith(("/kv/", "/internal/")):
            return None
        if origin not in self._origins:
            parts = urlsplit(origin)
            self._origins[origin] = (parts.hostname or "", parts.port or 80, "") if parts.hostname else None
        known = self._origins[origin]
        return None if known is None else (known[0], known[1], path)

    async def _call(
        self, method: str, url: str, body: bytes | None, limit: float, authorization: bytes | None
    ) -> Answer:
        headers = Headers({b"Authorization": [authorization]}) if authorization else None
        response = await self.http.request(
            method, url, data=body, headers=headers, timeout=limit, reactor=self.reactor, unbuffered=True
        )
        chunks: list[bytes] = []
        size = 0

        def collect(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self.max_answer:
                raise AnswerTooLarge(f"answer larger than {self.max_answer} bytes")
            chunks.append(data)

        await treq.collect(response, collect)
        return Answer(response.code, b"".join(chunks))

    def _explain(self, failure: Any, url: str, limit: float, deadline: float) -> Answer:
        # However the time-out surfaced (ours, or treq's cancellation wrapped by the agent).
        if failure.check(TimeoutError, CancelledError) or self.reactor.seconds() >= deadline:
            raise PeerTimeout(url, f"no answer within {limit:g}s")
        if failure.check(PeerError):
            failure.raiseException()
        reason = failure.getErrorMessage() or failure.type.__name__
        if hasattr(failure.value, "reasons") and failure.value.reasons:
            # ResponseNeverReceived and friends wrap the failures that matter.
            reason = "; ".join(r.getErrorMessage() for r in failure.value.reasons)
        raise PeerUnreachable(url, reason)


@define
class RegistryClient:
    """The registry API, as nodes and gateways use it."""

    peers: Peers
    base_url: str

    def _url(self, path: str) -> str:
        return self.base_url.rstrip("/") + path

    async def register(self, node_id: str, url: str, weight: int, incarnation: int) -> tuple[int, Any]:
        body = json.dumps({"url": url, "weight": weight, "incarnation": incarnation}).encode()
        answer = await self.peers.call("PUT", self._url(f"/registry/nodes/{quote(node_id, safe='')}"), body)
        return answer.status, _json_or_none(answer)

    async def leave(self, node_id: str, incarnation: int) -> int:
        answer = await self.peers.call(
            "DELETE", self._url(f"/registry/nodes/{quote(node_id, safe='')}?incarnation={incarnation}")
        )
        return answer.status

    async def nodes(self, index: int | None = None, wait: float = 0) -> tuple[int, list[dict[str, Any]], str | None]:
        """The registry's change index, members and epoch; with C{index}, a long poll of C{wait} seconds."""
        path = "/registry/nodes"
        if index is not None:
            path += f"?index={index}&wait={wait:g}"
        answer = await self.peers.call("GET", self._url(path), timeout=self.peers.timeout + wait)
        body = _json_or_none(answer)
        if answer.status != 200 or not isinstance(body, dict):
            raise PeerUnreachable(self.base_url, f"unexpected answer {answer.status}")
        nodes = body.get("nodes")
        if not isinstance(nodes, list) or not isinstance(body.get("index"), int):
            raise PeerUnreachable(self.base_url, "answer is not a registry listing")
        epoch = body.get("epoch")
        return body["index"], nodes, epoch if isinstance(epoch, str) else None


def _json_or_none(answer: Answer) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None


class _QuietFactory(Factory):
    # One "Starting factory" log line per connection to a node is noise, not news.
    noisy = False


class _Closed(Exception):
    """The connection closed before a whole answer arrived."""


class KeepAliveProtocol(Protocol):
    """
    One HTTP/1.1 connection to a kvd process, one request at a time, kept open between them.

    Only what kvd peers send is understood: a status line, headers, and a body framed by
    Content-Length, chunked encoding, or the end of the connection.
    """

    def __init__(self, max_answer: int) -> None:
        self.max_answer = max_answer
        self.waiting: Deferred[Answer] | None = None
        self.closed = False
        self.reusable = False
        self._buffer = bytearray()
        self._status = 0
        self._length: int | None = None
        self._chunked = False
        self._body_start = -1
        self._has_answer_body = True
        self.used = 0

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.waiting is not None:
            if self._body_start >= 0 and self._length is None and not self._chunked:
                self._finish(bytes(self._buffer[self._body_start :]))
            else:
                self._fail(_Closed(reason.getErrorMessage()))

    def request(self, head: bytes, body: bytes | None, has_answer_body: bool = True) -> Deferred[Answer]:
        assert self.waiting is None and self.transport is not None
        self._has_answer_body = has_answer_body
        self.used += 1
        self.reusable = False
        self._buffer.clear()
        self._status, self._length, self._chunked, self._body_start = 0, None, False, -1
        self.waiting = Deferred(self._cancel)
        self.transport.write(head + body if body else head)
        return self.waiting

    def _cancel(self, d: Deferred[Answer]) -> None:
        self.waiting = None
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is None:
            self.abort()  # nothing was asked: the peer is confused
            return
        self._buffer += data
        if len(self._buffer) > self.max_answer + 65536:
            self._fail(AnswerTooLarge(f"answer larger than {self.max_answer} bytes"))
            self.abort()
            return
        if self._body_start < 0 and not self._parse_head():
            return
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None and len(self._buffer) - self._body_start >= self._length:
            self._finish(bytes(self._buffer[self._body_start : self._body_start + self._length]))

    def _parse_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buffer[:end]).split(b"\r\n")
        try:
            version, status = lines[0].split(b" ", 2)[:2]
            self._status = int(status)
        except ValueError:
            self._fail(_Closed("the answer is not HTTP"))
            self.abort()
            return False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length" and value.isdigit():
                self._length = int(value)
            elif name == b"transfer-encoding" and value == b"chunked":
                self._chunked = True
            elif name == b"connection":
                keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
        self.reusable = keep_alive and (self._length is not None or self._chunked)
        self._body_start = end + 4
        if not self._has_answer_body or self._status in (204, 304) or 100 <= self._status < 200:
            self._length, self._chunked = 0, False
        return True

    def _parse_chunks(self) -> None:
        position, body = self._body_start, bytearray()
        while True:
            line_end = self._buffer.find(b"\r\n", position)
            if line_end < 0:
                return
            try:
                size = int(bytes(self._buffer[position:line_end]).split(b";")[0], 16)
            except ValueError:
                self._fail(_Closed("bad chunked encoding"))
                self.abort()
                return
            if size == 0:
                if self._buffer.find(b"\r\n\r\n", line_end) < 0:
                    return
                self._finish(bytes(body))
                return
            if len(self._buffer) < line_end + 2 + size + 2:
                return
            body += self._buffer[line_end + 2 : line_end + 2 + size]
            position = line_end + 2 + size + 2

    def _finish(self, body: bytes) -> None:
        d, self.waiting = self.waiting, None
        self._buffer.clear()
        if d is not None:
            d.callback(Answer(self._status, body))

    def _fail(self, error: Exception) -> None:
        d, self.waiting = self.waiting, None
        self.reusable = False
        if d is not None:
            d.errback(error)


@define
class KeepAlivePool:
    """
    Plain-HTTP calls to kvd peers over kept-alive connections: the gateway's data path.

    treq and Agent do far more per request than a forward needs (URL objects, cookie
    handling, header objects, producers); measured here, a treq forwarder ran at 0.17 of a
    node's throughput. This pool writes the request bytes itself and reads the answer with
    the little parsing above. Anything else (https, the registry) goes through treq.
    """

    reactor: Any
    max_answer: int = DEFAULT_MAX_ANSWER
    max_idle: int = 64
    _idle: dict[tuple[str, int], list[KeepAliveProtocol]] = field(factory=dict)
    #: Connects a protocol to (host, port); tests replace it.
    connect: Callable[[str, int, KeepAliveProtocol], Deferred[KeepAliveProtocol]] | None = None

    def _connect(self, host: str, port: int, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
        if self.connect is not None:
            return self.connect(host, port, protocol)
        factory = _QuietFactory.forProtocol(lambda: protocol)
        return HostnameEndpoint(self.reactor, host, port).connect(factory).addCallback(lambda _: protocol)

    async def call(
        self, host: str, port: int, method: str, path: str, body: bytes | None, authorization: bytes | None = None
    ) -> Answer:
        head = b"%s %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Length: %d\r\n%s\r\n" % (
            method.encode("ascii"),
            path.encode("ascii"),
            host.encode("idna"),
            port,
            len(body or b""),
            b"Authorization: %s\r\n" % authorization if authorization else b"",
        )
        idle = self._idle.setdefault((host, port), [])
        while idle:
            connection = idle.pop()
            if connection.closed:
                continue
            try:
                answer = await connection.request(head, body, method != "HEAD")
            except _Closed:
                # The peer closed a kept connection as we reused it: retry once, on a new one.
                break
            self._keep(host, port, connection)
            return answer
        fresh = await self._connect(host, port, KeepAliveProtocol(self.max_answer))
        try:
            answer = await fresh.request(head, body, method != "HEAD")
        except _Closed as e:
            raise ConnectionLost(str(e)) from None
        self._keep(host, port, fresh)
        return answer

    def _keep(self, host: str, port: int, connection: KeepAliveProtocol) -> None:
        idle = self._idle.setdefault((host, port), [])
        if connection.reusable and not connection.closed and len(idle) < self.max_idle:
            idle.append(connection)
        else:
            connection.abort()

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                if connection.transport is not None and not connection.closed:
                    connection.transport.loseConnection()
        self._idle.clear()
