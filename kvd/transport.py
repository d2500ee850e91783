"""
Outgoing HTTP: every call kvd makes to another kvd process goes through here, over one
transport for every deployment (http and https, data calls and registry calls alike).

L{Peers} bounds each call in time (headers and body together) and in how much of the peer's
answer is read; a peer that cannot be reached, takes too long or answers with broken framing
is a L{PeerError} naming the URL, never a hang. Under it, L{KeepAlivePool} keeps HTTP/1.1
connections to each peer open between calls and speaks the little of HTTP that kvd peers
use. It was kept over treq and over a bare C{Agent} by measurement (C{bench/transport.py}):
treq took 3 to 7 times its CPU per call, a bare C{Agent} 2 to 3.6 times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from kvd.codec import wire_loads
from kvd.keys import DEFAULT_MAX_VALUE_BYTES, internal_message_limit

#: The default cap on a peer's answer: what an internal answer carrying one value of the
#: default maximum size can take. Callers derive theirs from --max-value-bytes.
DEFAULT_MAX_ANSWER = internal_message_limit(DEFAULT_MAX_VALUE_BYTES)
DEFAULT_TIMEOUT = 5.0
#: Requests that change nothing, so a call lost on a stale kept connection may be sent again.
_RETRYABLE = frozenset({"GET", "HEAD"})
#: A status line and headers longer than this are not from a kvd peer.
_MAX_HEAD = 64 * 1024


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


class BadFraming(Exception):
    """The peer's answer is not HTTP/1.1 as kvd speaks it."""


@frozen
class Answer:
    status: int
    body: bytes

    def json(self) -> Any:
        return wire_loads(self.body)


@frozen
class Origin:
    """Where a URL's request goes: scheme, host and port, and the Host header naming them."""

    scheme: str
    host: str
    port: int
    host_header: bytes


def parse_origin(origin: str) -> Origin | None:
    """The L{Origin} of C{scheme://host[:port]}, or None unless it is http or https with a host."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    return Origin(parts.scheme, host, port, f"{shown}:{port}".encode("idna"))


@define
class Peers:
    """Makes bounded HTTP calls to other kvd processes."""

    pool: KeepAlivePool
    reactor: Any  # IReactorTime
    timeout: float = DEFAULT_TIMEOUT
    #: The Authorization header sent with every call (the cluster secret), if any.
    authorization: bytes | None = None
    _origins: dict[str, Origin | None] = field(factory=dict)

    def call(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        timeout: float | None = None,
        authorization: bytes | None = None,
        max_answer: int | None = None,
        headers: bytes = b"",
    ) -> Deferred[Answer]:
        """
        Make one request and read the whole answer, within C{timeout} seconds in all.

        @param max_answer: a tighter cap on this answer than the pool's.
        @param headers: more header lines, each ending in CRLF (a client's C{If-Match}, say).
        @raise PeerTimeout: when the time runs out.
        @raise PeerUnreachable: when the connection fails, or the answer is cut short, too
            large or badly framed.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = self.reactor.seconds() + limit
        authorization = authorization or self.authorization
        target = self._target(url)
        if target is None:
            return Deferred.fromCoroutine(_refuse(url))
        origin, path = target
        d = self.pool.request(origin, method, path, body, authorization, max_answer, headers)
        d.addTimeout(limit, self.reactor)
        return d.addErrback(self._explain, url, limit, deadline)

    def _target(self, url: str) -> tuple[Origin, str] | None:
        """(origin, path and query) of an http or https URL; origins are parsed once."""
        scheme_end = url.find("://")
        cut = url.find("/", scheme_end + 3) if scheme_end > 0 else -1
        origin, path = (url[:cut], url[cut:]) if cut >= 0 else (url, "/")
        if origin not in self._origins:
            self._origins[origin] = parse_origin(origin)
        known = self._origins[origin]
        return None if known is None else (known, path.partition("#")[0])

    def _explain(self, failure: Any, url: str, limit: float, deadline: float) -> Answer:
        if failure.check(TimeoutError, CancelledError) or self.reactor.seconds() >= deadline:
            raise PeerTimeout(url, f"no answer within {limit:g}s")
        if failure.check(PeerError):
            failure.raiseException()
        reason = failure.getErrorMessage() or failure.type.__name__
        if hasattr(failure.value, "reasons") and failure.value.reasons:
            reason = "; ".join(r.getErrorMessage() for r in failure.value.reasons)
        raise PeerUnreachable(url, reason)


async def _refuse(url: str) -> Answer:
    raise PeerUnreachable(url, "not an http or https URL")


class _Eager:
    """
    Writes of a TCP connection that send at once: see L{send_eagerly}. Twisted's own
    transport buffers every write, registers for writability (an C{epoll_ctl}), sends on
    the next reactor turn and unregisters (another).
    """

    def write(self: Any, data: bytes) -> None:
        if not self._tempDataLen and not self.dataBuffer and not self.TLS and self.connected and type(data) is bytes:
            if not data or self._writeDisconnected or self._aborting:
                return
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # full (EAGAIN, ENOBUFS), or lost: the buffered write below finds out
            if sent == len(data):
                return
            data = data[sent:]
        tcp.Connection.write(self, data)

    def writeSequence(self: Any, iovec: Any) -> None:
        if not self._tempDataLen and not self.dataBuffer and not self.TLS and all(type(i) is bytes for i in iovec):
            self.write(b"".join(iovec))
        else:
            tcp.Connection.writeSequence(self, iovec)


class _EagerServer(_Eager, tcp.Server):
    pass


class _EagerClient(_Eager, tcp.Client):
    pass


_EAGER: dict[type, type] = {tcp.Server: _EagerServer, tcp.Client: _EagerClient}


def send_eagerly(transport: ITransport | None) -> None:
    """
    Make a plain TCP transport send each write at once when nothing is buffered before it,
    registering for writability only for what the socket did not take: one C{send} and
    no C{epoll_ctl} for a whole answer (most of them, on loopback or a LAN). Anything else
    (TLS, the in-memory network, test transports) is left as it is.
    """
    swapped = _EAGER.get(type(transport))
    if swapped is not None:
        transport.__class__ = swapped


class _QuietFactory(Factory):
    # One "Starting factory" log line per connection to a node is noise, not news.
    noisy = False


class _Closed(Exception):
    """The connection closed before a whole answer arrived."""

    def __init__(self, reason: str, answered: bool) -> None:
        super().__init__(reason)
        #: Whether any byte of an answer had arrived (so the request surely reached the peer).
        self.answered = answered


#: Parser states of L{KeepAliveProtocol}.
_HEAD, _BODY_LENGTH, _BODY_TO_END, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(7)


class KeepAliveProtocol(Protocol):
    """
    One HTTP/1.1 connection to a kvd process, one request at a time, kept open between them.

    Only what kvd peers send is understood: interim 1xx answers (skipped), a status line,
    headers, and a body framed by Content-Length, chunked encoding, or the end of the
    connection. Anything else fails the call and drops the connection. The answer is parsed
    as it arrives: each byte is looked at a bounded number of times.
    """

    def __init__(self, max_answer: int) -> None:
        self.max_answer = max_answer
        self.waiting: Deferred[Answer] | None = None
        self.closed = False
        self.reusable = False
        #: When the connection was last put back idle (the pool's clock).
        self.idle_since = 0.0
        self._limit = max_answer
        self._buffer = bytearray()
        self._state = _HEAD
        self._status = 0
        self._remaining = 0
        self._body: list[bytes] = []
        self._size = 0
        self._received = False
        self._has_answer_body = True

    def connectionMade(self) -> None:
        send_eagerly(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.waiting is not None:
            if self._state == _BODY_TO_END:
                self._finish()
            else:
                self._fail(_Closed(reason.getErrorMessage(), self._received))

    def request(
        self, head: bytes, body: bytes | None, has_answer_body: bool = True, max_answer: int | None = None
    ) -> Deferred[Answer]:
        assert self.waiting is None and self.transport is not None
        self._has_answer_body = has_answer_body
        self._limit = self.max_answer if max_answer is None else min(max_answer, self.max_answer)
        self.reusable = False
        self._buffer.clear()
        self._state, self._status, self._body, self._size, self._received = _HEAD, 0, [], 0, False
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
        self._received = True
        self._buffer += data
        try:
            self._parse()
        except (BadFraming, AnswerTooLarge) as e:
            self._fail(e)
            self.abort()

    def _parse(self) -> None:
        buffer = self._buffer
        while self.waiting is not None:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise BadFraming("the answer's head is too long")
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._parse_head(head)
            elif state == _BODY_LENGTH:
                if len(buffer) < self._remaining:
                    return
                self._take(bytes(buffer[: self._remaining]))
                del buffer[: self._remaining]
                self._finish()
            elif state == _BODY_TO_END:
                self._take(bytes(buffer))
                buffer.clear()
                return
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise BadFraming("a chunk-size line is too long")
                    return
                size = bytes(buffer[:end]).split(b";", 1)[0].strip()
                del buffer[: end + 2]
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BadFraming(f"bad chunk size {size[:20]!r}")
                self._remaining = int(size, 16)
                if self._size + self._remaining > self._limit:
                    raise AnswerTooLarge(f"answer larger than {self._limit} bytes")
                self._state = _CHUNK_DATA if self._remaining else _TRAILER
            elif state == _CHUNK_DATA:
                if len(buffer) < self._remaining + 2:
                    return
                if buffer[self._remaining : self._remaining + 2] != b"\r\n":
                    raise BadFraming("a chunk is not followed by CRLF")
                self._take(bytes(buffer[: self._remaining]))
                del buffer[: self._remaining + 2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD:
                        raise BadFraming("the trailer is too long")
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not (len(parts[1]) == 3 and parts[1].isdigit()):
            raise BadFraming("the answer is not HTTP")
        version, status = parts[0], int(parts[1])
        if 100 <= status < 200:
            if status == 101:
                raise BadFraming("the peer switched protocols")
            return  # an interim answer: the final one follows
        self._status = status
        keep_alive = version == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadFraming("a header line without a colon")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise BadFraming(f"bad Content-Length {value[:20]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                if value != b"chunked":
                    raise BadFraming(f"unknown Transfer-Encoding {value[:20]!r}")
                chunked = True
            elif name == b"connection":
                keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
        if not self._has_answer_body or status in (204, 304):
            length, chunked = 0, False
        elif chunked:
            length = None
        if length is not None and length > self._limit:
            raise AnswerTooLarge(f"answer of {length} bytes is larger than {self._limit}")
        self.reusable = keep_alive and (length is not None or chunked)
        if chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            self._state, self._remaining = _BODY_LENGTH, length
        else:
            self._state = _BODY_TO_END

    def _take(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise AnswerTooLarge(f"answer larger than {self._limit} bytes")
        if data:
            self._body.append(data)

    def _finish(self) -> None:
        d, self.waiting = self.waiting, None
        if self._buffer:
            self.reusable = False  # bytes after the answer: out of step with the peer
        self._buffer.clear()
        body, self._body = b"".join(self._body), []
        if d is not None:
            d.callback(Answer(self._status, body))

    def _fail(self, error: Exception) -> None:
        d, self.waiting = self.waiting, None
        self.reusable = False
        if d is not None:
            d.errback(error)


#: Connects a protocol to an origin; what tests and the in-memory network replace.
Connector = Callable[[Origin, KeepAliveProtocol], Deferred[KeepAliveProtocol]]


@define
class KeepAlivePool:
    """
    HTTP calls to kvd peers over kept-alive connections, for http and https alike.

    @ivar tls_policy: makes the TLS connection creator for an https origin
        (C{BrowserLikePolicyForHTTPS} or anything with C{creatorForNetloc}); https calls
        fail without one.
    @ivar connect: replaces the network (tests, the in-memory cluster).
    """

    reactor: Any
    max_answer: int = DEFAULT_MAX_ANSWER
    tls_policy: Any = None
    max_idle: int = 64
    #: A connection idle this long is not reused: the peer may be closing it (a node's idle timeout is 60s).
    idle_seconds: float = 30.0
    connect: Connector | None = None
    _idle: dict[Origin, list[KeepAliveProtocol]] = field(factory=dict)

    def _connect(self, origin: Origin, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
        if self.connect is not None:
            return self.connect(origin, protocol)
        factory = _QuietFactory.forProtocol(lambda: protocol)
        endpoint: Any = HostnameEndpoint(self.reactor, origin.host, origin.port)
        if origin.scheme == "https":
            if self.tls_policy is None:
                raise ConnectionLost("https needs a TLS policy")
            endpoint = wrapClientTLS(
                self.tls_policy.creatorForNetloc(origin.host.encode("idna"), origin.port), endpoint
            )
        connected: Deferred[KeepAliveProtocol] = endpoint.connect(factory).addCallback(lambda _: protocol)
        return connected

    def request(
        self,
        origin: Origin,
        method: str,
        path: str,
        body: bytes | None,
        authorization: bytes | None = None,
        max_answer: int | None = None,
        headers: bytes = b"",
    ) -> Deferred[Answer]:
        """
        One request over a kept connection (or a fresh one), and its whole answer: over an
        idle kept connection in plain callbacks (every quorum batch goes so, and a
        coroutine's making, stepping and Deferred cost more than the call's own work), over
        a fresh connection through a coroutine.
        """
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s%s\r\n" % (
            method.encode("ascii"),
            path.encode("ascii"),
            origin.host_header,
            len(body or b""),
            b"Authorization: %s\r\n" % authorization if authorization else b"",
            headers,
        )
        has_body = method != "HEAD"
        idle = self._idle.get(origin)
        if idle:
            stale_before = self.reactor.seconds() - self.idle_seconds
            while idle:
                connection = idle.pop()
                if connection.closed:
                    continue
                if connection.idle_since < stale_before:
                    connection.abort()
                    continue
                d = connection.request(head, body, has_body, max_answer)
                return d.addCallbacks(
                    self._kept,
                    self._reused_failed,
                    callbackArgs=(origin, connection),
                    errbackArgs=(origin, method, head, body, has_body, max_answer),
                )
        return Deferred.fromCoroutine(self._fresh(origin, head, body, has_body, max_answer))

    def _kept(self, answer: Answer, origin: Origin, connection: KeepAliveProtocol) -> Answer:
        self._keep(origin, connection)
        return answer

    def _reused_failed(
        self,
        failure: Failure,
        origin: Origin,
        method: str,
        head: bytes,
        body: bytes | None,
        has_body: bool,
        max_answer: int | None,
    ) -> Failure | Deferred[Answer]:
        error = failure.value
        if not isinstance(error, _Closed):
            return failure
        # The peer closed a kept connection as we reused it. The request may have been
        # applied; only a request that changes nothing, with no answer begun, goes again.
        if method not in _RETRYABLE or error.answered:
            raise ConnectionLost(str(error))
        return Deferred.fromCoroutine(self._fresh(origin, head, body, has_body, max_answer))

    async def _fresh(
        self, origin: Origin, head: bytes, body: bytes | None, has_body: bool, max_answer: int | None
    ) -> Answer:
        fresh = await self._connect(origin, KeepAliveProtocol(self.max_answer))
        try:
            answer = await fresh.request(head, body, has_body, max_answer)
        except _Closed as e:
            raise ConnectionLost(str(e)) from None
        self._keep(origin, fresh)
        return answer

    def _keep(self, origin: Origin, connection: KeepAliveProtocol) -> None:
        idle = self._idle.setdefault(origin, [])
        if connection.reusable and not connection.closed and len(idle) < self.max_idle:
            connection.idle_since = self.reactor.seconds()
            idle.append(connection)
        else:
            connection.abort()

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                if connection.transport is not None and not connection.closed:
                    connection.transport.loseConnection()
        self._idle.clear()
