"""
The twisted.web plumbing under every role's Klein app: a Site that bounds request bodies.

Twisted's web server reads a whole request body before any resource sees it and sets no
limit, so the limit lives here, in the channel and request: a Content-Length over the limit
is refused before one byte of the body is read, and a body without one (chunked) is cut off
as soon as it passes the limit. Either way the client gets a 413 JSON answer and the
connection is closed, since the rest of the body is not read. A body whose request lacks the
token its path needs is refused the same way, 401 from the head, before it is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import IO, Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource as web_resource
from twisted.web.http import NO_BODY_CODES, HTTPChannel, datetimeToString
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from twisted.web.server import version as server_version

from kvd import paths
from kvd.auth import Auth
from kvd.codec import answer_json
from kvd.keys import DEFAULT_MAX_VALUE_BYTES, internal_message_limit
from kvd.metrics import Metrics, now
from kvd.transport import send_eagerly

_log = Logger()

#: The largest POST /import body. Twisted spools a body of unknown or large length to a
#: temporary file (not memory) before the handler runs, and the import reads it a line at a
#: time, so this bounds the gateway's disk, not its memory: 16 GiB is 16M entries of 1 KiB.
DEFAULT_MAX_IMPORT_BYTES = 16 * 1024**3

#: Seconds a connection may sit idle (or dribble a request) before it is closed.
DEFAULT_IDLE_TIMEOUT = 60


json_body = answer_json


class HotRequest(Protocol):
    """
    What the fast routes' handlers, the error table (L{kvd.resources.render_error}) and the
    front door use of a request: a twisted.web Request has it all, and so has the lean
    connection's (L{kvd.lean_http.LeanRequest}), which has nothing more for handlers.
    """

    method: bytes
    #: The request target up to its query.
    path: bytes
    #: The query's arguments.
    args: dict[bytes, list[bytes]]
    content: IO[bytes]

    def getHeader(self, key: bytes) -> bytes | None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...


class Pending(Protocol):
    """
    An answer to come that a request cancels when its connection is lost first (see
    C{cancel_on_loss}): a L{Deferred}, or a handler's plain-callback answer
    (L{kvd.resources.Answering}).
    """

    @property
    def called(self) -> bool: ...

    def cancel(self) -> None: ...


_date: tuple[int, bytes] = (0, b"")


def http_date() -> bytes:
    """The Date header's value for now, formatted once a second rather than once an answer."""
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, datetimeToString(second))
    return _date[1]


def _canonical(name: bytes) -> bytes:
    """A header name as Twisted writes it (C{b"etag"} -> C{b"ETag"})."""
    headers = Headers()
    headers.setRawHeaders(name, [b""])
    return next(iter(headers.getAllRawHeaders()))[0]


#: The headers every answer of the hot routes carries, held by L{BoundedRequest} as they are
#: set (name as written, value) and written as one block: Twisted's L{Headers} encodes and
#: sanitises each name and value as it is set and again as it is written (a tenth of the
#: gateway's time per request, with the rest of its header handling).
_PLAIN = {
    spelling: _canonical(name)
    for name in (b"server", b"date", b"etag", b"content-type", b"content-length")
    for spelling in (name, _canonical(name))
}


def origin_form(target: bytes) -> bytes:
    """
    A request target in absolute form (C{http://host:port/kv/a?x}, which RFC 9112 says a server
    must accept) as the origin form it stands for (C{/kv/a?x}); any other target as it is.
    """
    scheme = target[:8].lower()
    if scheme.startswith(b"http://"):
        rest = target[7:]
    elif scheme == b"https://":
        rest = target[8:]
    else:
        return target
    ends = [at for at in (rest.find(b"/"), rest.find(b"?")) if at >= 0]
    path = rest[min(ends) :] if ends else b""
    return path if path[:1] == b"/" else b"/" + path


def _raw_response(status: int, reason: bytes, obj: object) -> bytes:
    body = json_body(obj)
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        status,
        reason,
        len(body),
        body,
    )


_UNAUTHORIZED = _raw_response(
    401, b"Unauthorized", {"success": False, "error": "this needs a valid Authorization: Bearer token"}
).replace(b"\r\n\r\n", b'\r\nWWW-Authenticate: Bearer realm="kvd"\r\n\r\n', 1)


def _too_large(limit: int) -> bytes:
    return _raw_response(
        413,
        b"Content Too Large",
        {"success": False, "error": f"request body is larger than the limit of {limit} bytes"},
    )


class BoundedChannel(HTTPChannel):
    """An HTTP channel that refuses request bodies larger than its site's C{max_body}."""

    site: BoundedSite
    _refused = False
    _host: Any = None
    _peer: Any = None
    #: An answer's status line and headers, held until its first body bytes (or its end) so
    #: that both leave in one write: one send, as the transport sends each write at once.
    _head = b""

    def makeConnection(self, transport: Any) -> None:
        send_eagerly(transport)
        super().makeConnection(transport)

    # twisted.web asks for both with every request (getHost is a getsockname): once a connection.

    def getHost(self) -> Any:
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def refuse(self) -> None:
        """Answer 413 at once, read nothing more and close the connection."""
        if self._refused:
            return
        self._refused = True
        limit = self.site.limit_for(getattr(self, "_path", b""))
        if self.site.metrics is not None:
            self.site.metrics.observe_request(getattr(self, "_path", b""), getattr(self, "_command", b"?"), 413, 0.0)
        assert self.transport is not None
        self.transport.write(_too_large(limit))
        self.loseConnection()

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own answer to a malformed request line or header is an empty 400.
        assert self.transport is not None
        self.transport.write(
            _raw_response(400, b"Bad Request", {"success": False, "error": "malformed or oversized HTTP request"})
        )
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request line or header over MAX_LENGTH (16 KiB); Twisted would just hang up.
        assert self.transport is not None
        self.transport.write(
            _raw_response(
                431,
                b"Request Header Fields Too Large",
                {"success": False, "error": f"a request or header line is longer than {self.MAX_LENGTH} bytes"},
            )
        )
        self.loseConnection()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._flush_head()
        self._head = b"".join(head)

    def _flush_head(self) -> None:
        if self._head:
            head, self._head = self._head, b""
            if self.transport is not None:
                self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self._head:
            data, self._head = self._head + data, b""
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, iovec: Any) -> None:
        if self._head:
            self.write(b"".join(iovec))
        else:
            super().writeSequence(iovec)

    #: Told when a request's answer is done (a lean connection lends a channel one request).
    on_request_done: Callable[[], None] | None = None

    def requestDone(self, request: Any) -> None:
        self._flush_head()  # an answer without a body ends here
        super().requestDone(request)
        if self.on_request_done is not None:
            self.on_request_done()

    def loseConnection(self) -> None:
        self._flush_head()
        super().loseConnection()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        # Twisted closes every HTTP/1.0 connection; one that asks to be kept (ab -k, old
        # proxies) is kept when its answer has a Content-Length (see BoundedRequest.write).
        if version == b"HTTP/1.0":
            tokens = b",".join(request.requestHeaders.getRawHeaders(b"connection", [])).lower()
            if b"keep-alive" in tokens.replace(b" ", b"").split(b","):
                request.keep_alive_10 = True
                return True
        return bool(super().checkPersistence(request, version))

    def allHeadersReceived(self) -> None:
        if self._path[:1] != b"/":
            self._path = origin_form(self._path)  # served, limited and checked as its origin form
        if self.length is not None and self.length > self.site.limit_for(self._path):
            # Before super(): it would answer "100 Continue" to a client that asked.
            self.refuse()
            self.setRawMode()
            return
        if self._unauthorized_body():
            self._refuse_unauthorized()
            self.setRawMode()
            return
        super().allHeadersReceived()

    def _unauthorized_body(self) -> bool:
        # A body whose request lacks its token (an import's, up to 16 GiB spooled to disk; a
        # batch's or an internal one's, up to the internal limit in memory; a PUT's) is refused
        # from the head, not after it is read: an unauthenticated client must not fill the
        # gateway's disk or memory.
        auth = self.site.auth
        if auth is None or not auth.required or self.length == 0 or not self.requests:
            return False
        given = self.requests[-1].requestHeaders.getRawHeaders(b"authorization")
        return not auth.allows(self._path.split(b"?", 1)[0], given[0] if given else None)

    def _refuse_unauthorized(self) -> None:
        self._refused = True
        if self.site.metrics is not None:
            self.site.metrics.observe_request(self._path, getattr(self, "_command", b"?"), 401, 0.0)
        assert self.transport is not None
        self.transport.write(_UNAUTHORIZED)
        self.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        if not self._refused:
            self._pausing = True  # for the setTimeout(None) Twisted makes now, see setTimeout
            super().allContentReceived()
            self._pausing = False

    # Twisted stops the idle timer while it answers a request (cancels it) and starts it
    # again after (a new delayed call): two reactor operations and a new object every
    # request. Here the timer stays armed instead, and if it runs out while a request is
    # being answered it does nothing: the connection is not idle. The same timeouts, as seen
    # from outside.
    _pausing = False
    _answering = False

    def setTimeout(self, period: float | None) -> float | None:
        if period is None and self._pausing:
            self._pausing = False
            self._answering = True
            paused, self.timeOut = self.timeOut, None
            return paused
        self._pausing = self._answering = False
        previous: float | None = super().setTimeout(period)
        return previous

    def timeoutConnection(self) -> None:
        if self._answering:
            return  # the timer ran out while a request was being answered; it is set again after
        super().timeoutConnection()


class BoundedRequest(Request):
    """A request that counts its body as it arrives (for bodies of no announced length)."""

    channel: BoundedChannel
    _received = 0
    started = 0.0
    #: An HTTP/1.0 client asked for its connection to be kept.
    keep_alive_10 = False

    _pending: Pending | None = None
    #: The answer's headers of L{_PLAIN}'s names, written as set (see L{setHeader}).
    _plain: dict[bytes, bytes] | None = None

    def setHeader(self, name: Any, value: Any) -> None:
        plain = _PLAIN.get(name) if isinstance(value, bytes) else None
        if plain is None or b"\r" in value or b"\n" in value:
            if self._plain is not None:
                self._plain.pop(_PLAIN.get(name, b""), None)
            super().setHeader(name, value)
            return
        if self._plain is None:
            self._plain = {}
        self._plain[plain] = value

    def _fast_head(self) -> bytes | None:
        """
        The status line and headers of an answer that needs none of Twisted's own header
        logic (no chunking, HEAD, encoder, cookies or other headers), or None.
        """
        plain = self._plain
        if (
            plain is None
            or b"Content-Length" not in plain
            or b"Content-Type" not in plain  # else Twisted adds its default
            or self.responseHeaders._rawHeaders
            or self.method == b"HEAD"
            or self.code in NO_BODY_CODES
            or self.keep_alive_10
            or self._encoder is not None
            or self._inFakeHead
            or self.lastModified is not None
            or self.etag is not None
            or self.cookies
        ):
            return None
        head = [b"%s %d %s\r\n" % (self.clientproto, self.code, self.code_message)]
        head.extend(b"%s: %s\r\n" % item for item in plain.items())
        head.append(b"\r\n")
        return b"".join(head)

    def _unplain(self) -> None:
        """Move the plain headers into L{responseHeaders}, for Twisted's own writing."""
        plain, self._plain = self._plain, None
        if plain:
            for name, value in plain.items():
                self.responseHeaders.setRawHeaders(name, [value])

    def cancel_on_loss(self, answer: Pending) -> None:
        """Cancel C{answer} if the connection is lost before it has fired."""
        self._pending = answer

    def connectionLost(self, reason: Failure) -> None:
        pending, self._pending = self._pending, None
        super().connectionLost(reason)
        if pending is not None and not pending.called:
            pending.cancel()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self.started = now()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # twisted.web.server.Request.process, with the Date header formatted once a second.
        self.site = self.channel.site
        self.setHeader(b"Server", server_version)
        self.setHeader(b"Date", http_date())
        self.prepath = []
        self.postpath = list(map(unquote_to_bytes, self.path[1:].split(b"/")))
        if self.path == b"*":
            self._handleStar()
            return
        try:
            found = self.site.getResourceFor(self)
            if web_resource._IEncodingResource.providedBy(found):
                encoder = found.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(found)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        if not self.startedWriting and not self.finished and not self._disconnected:
            head = self._fast_head()
            if head is not None:
                # What Twisted's first write does for such an answer, in one write.
                self.startedWriting = 1
                self._plain = None
                self.sentLength += len(data)
                self.channel.write(head + data)
                return
            self._unplain()
        if self.keep_alive_10 and not self.startedWriting:
            if self.responseHeaders.hasHeader(b"content-length"):
                self.responseHeaders.setRawHeaders(b"connection", [b"Keep-Alive"])
            else:
                self.channel.persistent = False  # only the end of the connection can end this answer
        super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.channel.site.limit_for(getattr(self.channel, "_path", b"")):
            self.channel.refuse()
            return
        super().handleContentChunk(data)

    def processingFailed(self, reason: Failure) -> None:
        # Reached only when a handler's own error handling failed: still JSON, no traceback.
        _log.failure("unhandled error answering {path}", reason, path=self.path)
        if self.finished or self._disconnected:
            return
        self._answer(500, {"success": False, "error": "internal error; see the server log"})

    def _answer(self, status: int, obj: object) -> None:
        body = json_body(obj)
        self.setResponseCode(status)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()


class BoundedSite(Site):
    """
    The Site every role serves: bounded bodies, an idle timeout, no tracebacks to clients,
    and per-request access logging only when asked for (it costs about a third of a node's
    throughput).
    """

    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        max_body: int = DEFAULT_MAX_VALUE_BYTES,
        access_log: bool = False,
        timeout: float = DEFAULT_IDLE_TIMEOUT,
        metrics: Metrics | None = None,
        max_import: int = DEFAULT_MAX_IMPORT_BYTES,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, timeout=timeout, **kwargs)
        self.max_body = max_body
        #: What the resource requires of requests (its front door's), checked here too for an
        #: import's body, before it is read.
        self.auth: Auth | None = getattr(resource, "auth", None)
        #: Batches between kvd processes carry many values at once; so does a client's
        #: POST /batch, bounded the same way: the gateway holds its body in memory, as a node
        #: does an internal batch (a batch of 1,000 values of the largest size is refused).
        self.internal_max_body = internal_message_limit(max_body)
        self.max_import = max_import
        self.access_log = access_log
        self.metrics = metrics

    def limit_for(self, path: bytes) -> int:
        if path.split(b"?", 1)[0] == paths.IMPORT:
            return self.max_import
        if path.startswith(paths.INTERNAL) or path == paths.BATCH:
            return self.internal_max_body
        return self.max_body

    def log(self, request: HTTPRequest) -> None:
        # Called by every request as it finishes.
        if self.metrics is not None:
            started = getattr(request, "started", 0.0)
            self.metrics.observe_request(
                request.path, request.method, request.code, now() - started if started else 0.0
            )
        if self.access_log:
            super().log(request)
