"""
A lean HTTP/1.1 server connection for the hot routes, the same on gateways and nodes.

twisted.web's HTTPChannel spends a quarter of a gateway's instructions on each request before and
after the handler: a C{lineReceived} call per header line, a L{Headers} object, a Request
with dozens of attributes, the process/render/finish machinery, notifications and a timer
per request. L{LeanChannel} parses a request's head itself (one C{find} of its end, one
split) and, when the request is one the role's front door sends straight to a handler (see
L{FastDoor}: the key-value routes, a node's internal batches) and is plain HTTP/1.1,
calls that same front door with a L{LeanRequest}: just what those handlers, the error
table and the front door use of a request (L{kvd.web.HotRequest}), answered with the
bytes L{kvd.web.BoundedRequest} would write.

Everything else is twisted.web's. A plain HTTP/1.1 request of another route (or method)
whose end is known is lent, alone, to a fresh L{kvd.web.BoundedChannel} on the same
transport, and the connection goes on here once it is answered: a gateway's kept-alive pool
sends all its calls to a node on the same connections. A request twisted.web must judge
(HTTP/1.0, C{Transfer-Encoding}, C{Expect}, C{Connection: close}, a malformed or oversized
head, an odd C{Content-Length}, a body over the limit or without its token, a duplicated
header) gives the connection to a L{kvd.web.BoundedChannel} for good, the bytes read so far
replayed to it, so its 400, 401, 413 and 431 answers and its rules apply unchanged (a body
it refuses is never read); so does a head's first lines as
soon as they say so, as twisted.web answers a bad line when it has it. Requests are answered
one at a time, in order: what a client pipelines behind a request is held until its answer
is written. A site with C{--access-log} on serves every connection with twisted.web.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Protocol, runtime_checkable

from twisted.internet.interfaces import IAddress, IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol as NetworkProtocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES, parse_qs
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from twisted.web.server import Request as TwistedRequest
from twisted.web.server import version as server_version
from zope.interface import implementer

from kvd.codec import answer_json
from kvd.metrics import now
from kvd.transport import send_eagerly
from kvd.web import _PLAIN, BoundedSite, HotRequest, Pending, http_date, origin_form

_log = Logger()

#: The methods the fast routes take; a request of any other goes to twisted.web.
_METHODS = frozenset((b"GET", b"PUT", b"DELETE", b"POST"))
#: Methods whose requests carry a body: without a Content-Length they go to twisted.web.
_WITH_BODY = frozenset((b"PUT", b"POST"))
#: The bytes a request target may hold here (printable ASCII, no space).
_TARGET_BYTES = bytes(range(33, 127))
#: The bytes of an HTTP token (a header name).
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: Headers whose presence sends a request to twisted.web (it has rules for each).
_NOT_TAKEN = frozenset((b"transfer-encoding", b"expect"))
#: A head longer than this, or with more lines, goes to twisted.web (its limits are 16 KiB and 500 headers).
_MAX_HEAD = 8192
_MAX_LINES = 100
#: A body larger than this goes to twisted.web, which spools large bodies to a file.
_MAX_BODY = 4 << 20
#: How much of what a client pipelines is read while a request is being answered (twisted.web's figure).
_MAX_HELD = 0x4000
_UNKNOWN = 1 << 62


@runtime_checkable
class FastDoor(Protocol):
    """What a role's front door (L{kvd.resources._FrontDoor}) offers a lean connection."""

    @property
    def serves_fast(self) -> bool:
        """Whether any request at all goes straight to a handler."""

    def takes(self, method: bytes, path: bytes) -> bool:
        """Whether this request goes straight to a handler, without Klein."""

    def serve(self, request: HotRequest) -> Any:
        """The answer's body, or L{NOT_DONE_YET} when the request is finished later."""


class LeanRequest:
    """
    One request on a L{LeanChannel}: what the hot handlers read and set (L{HotRequest}),
    and the writing of its answer as L{kvd.web.BoundedRequest} writes it: Server and Date
    first, then the headers in the order set; those Twisted writes itself (C{Allow},
    C{WWW-Authenticate}...) before the ones L{BoundedRequest} holds, as it does.
    """

    __slots__ = (
        "_headers",
        "_other",
        "_pending",
        "_plain",
        "_chunked",
        "_no_body",
        "_disconnected",
        "args",
        "channel",
        "code",
        "code_message",
        "content",
        "finished",
        "method",
        "path",
        "started",
        "startedWriting",
        "uri",
    )

    def __init__(
        self, channel: LeanChannel, method: bytes, uri: bytes, headers: dict[bytes, bytes], body: bytes
    ) -> None:
        self.channel: LeanChannel | None = channel
        self.method = method
        self.uri = uri
        query = uri.find(b"?")
        self.path = uri if query < 0 else uri[:query]
        self.args: dict[bytes, list[bytes]] = {} if query < 0 else parse_qs(uri[query + 1 :], 1)
        self.content: Any = BytesIO(body)
        self._headers = headers
        self.code = 200
        self.code_message = b"OK"
        #: The headers L{_PLAIN} names, in the order set (as BoundedRequest.process sets the first two).
        self._plain: dict[bytes, bytes] = {b"Server": server_version, b"Date": http_date()}
        #: Any other header, in a L{Headers} as Twisted keeps them.
        self._other: Headers | None = None
        self._pending: Pending | None = None
        self._chunked = False
        self._no_body = False
        self._disconnected = False
        self.finished = False
        self.startedWriting = False
        self.started = now()

    def getHeader(self, key: bytes) -> bytes | None:
        return self._headers.get(key.lower())

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message or RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes, value: bytes) -> None:
        plain = _PLAIN.get(name)
        if plain is None or b"\r" in value or b"\n" in value:
            self._plain.pop(_PLAIN.get(name, b""), None)
            if self._other is None:
                self._other = Headers()
            self._other.setRawHeaders(name, [value])
            return
        self._plain[plain] = value

    def cancel_on_loss(self, answer: Pending) -> None:
        """Cancel C{answer} if the connection is lost before it has fired."""
        self._pending = answer

    def _head(self) -> bytes:
        plain, code, other = self._plain, self.code, self._other
        if other is None and b"Content-Length" in plain and b"Content-Type" in plain and code not in NO_BODY_CODES:
            head = [b"HTTP/1.1 %d %s" % (code, self.code_message)]
            head += map(b": ".join, plain.items())  # "name: value" lines, no generator a header
            head.append(b"\r\n")
            return b"\r\n".join(head)
        # What twisted.web writes for any other answer (BoundedRequest's held headers after its own).
        headers = other if other is not None else Headers()
        for name, value in plain.items():
            headers.setRawHeaders(name, [value])
        length = headers.getRawHeaders(b"Content-Length")
        if (
            code not in (304, 204)
            and headers.getRawHeaders(b"Content-Type") is None
            and TwistedRequest.defaultContentType is not None
            and not (length and length[0] == b"0")
        ):
            headers.setRawHeaders(b"Content-Type", [TwistedRequest.defaultContentType])
        if length is None and code not in NO_BODY_CODES:
            headers.setRawHeaders(b"Transfer-Encoding", [b"chunked"])
            self._chunked = True
        self._no_body = code in NO_BODY_CODES
        lines = [b"HTTP/1.1 %d %s\r\n" % (code, self.code_message)]
        for name, values in headers.getAllRawHeaders():
            lines.extend(b"%s: %s\r\n" % (name, value) for value in values)
        lines.append(b"\r\n")
        return b"".join(lines)

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        channel = self.channel
        if self._disconnected or channel is None:
            return
        head = b""
        if not self.startedWriting:
            self.startedWriting = True
            head = self._head()
        if self._no_body or not data:
            if head:
                channel.send(head)
            return
        if self._chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        channel.send(head + data if head else data)

    def finish(self) -> None:
        if self._disconnected:
            raise RuntimeError("Request.finish called on a request after its connection was lost")
        if self.finished:
            return
        if not self.startedWriting:
            self.write(b"")
        channel = self.channel
        assert channel is not None
        if self._chunked:
            channel.send(b"0\r\n\r\n")
        metrics = channel.site.metrics
        if metrics is not None:
            metrics.observe_request(self.path, self.method, self.code, now() - self.started)
        self.finished = True
        channel.answered(self)

    def processing_failed(self, reason: Failure) -> None:
        # As BoundedRequest.processingFailed: a handler's own error handling failed.
        _log.failure("unhandled error answering {path}", reason, path=self.path)
        if self.finished or self._disconnected:
            return
        body = answer_json({"success": False, "error": "internal error; see the server log"})
        self.setResponseCode(500)
        self.setHeader(b"content-type", b"application/json")
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def connection_lost(self) -> None:
        self._disconnected = True
        self.channel = None
        pending, self._pending = self._pending, None
        if pending is not None and not pending.called:
            pending.cancel()


class _Unpausable:
    """The network producer of a transport that is none (as twisted.web's own stand-in)."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


@implementer(IPushProducer)
class LeanChannel(NetworkProtocol, TimeoutMixin):
    """
    A server connection that answers the fast routes' requests itself, lends each request
    of another route to a twisted.web channel, and hands itself over to one for good at a
    request only twisted.web may judge.
    """

    #: Seconds after an idle timeout before the connection is aborted (twisted.web's figure).
    abortTimeout = 15

    def __init__(self, site: LeanSite, door: FastDoor, addr: IAddress | None) -> None:
        self.site = site
        self.door = door
        self.addr = addr
        #: The twisted.web channel this connection became, if it did.
        self.fallen: NetworkProtocol | None = None
        #: The twisted.web channel answering one request of this connection now, if one is.
        self._lent: Any = None
        self._current: LeanRequest | None = None
        #: What has arrived but is not parsed yet, and how much of it there must be first.
        self._held: list[bytes] = []
        self._held_size = 0
        self._needed = 0
        self._serving = False
        self._lost = False
        self._held_pause = False
        self._transport_pause = False
        self._timed_out_answering = False
        self._aborting: Any = None
        self._network: Any = _Unpausable()

    def connectionMade(self) -> None:
        transport = self.transport
        send_eagerly(transport)
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        self.setTimeout(self.timeOut)
        self._network = IPushProducer(transport, _Unpausable())
        self._network.registerProducer(self, True)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        if self.fallen is not None:
            self.fallen.dataReceived(data)
            return
        self.resetTimeout()
        if self._held:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size < self._needed:
                self._pause_if_much()
                return
            data = b"".join(self._held)
            self._held, self._held_size = [], 0
        elif self._current is not None or self._lent is not None:
            self._hold(data, _UNKNOWN)
            return
        self._serve(data)

    def _hold(self, data: bytes, needed: int) -> None:
        self._held, self._held_size, self._needed = [data], len(data), needed
        self._pause_if_much()

    def _pause_if_much(self) -> None:
        # As twisted.web: read no more of what a client pipelines behind a request being answered.
        busy = self._current is not None or self._lent is not None
        if busy and self._held_size > _MAX_HELD and not self._held_pause:
            self._held_pause = True
            self._network.pauseProducing()

    def _serve(self, data: bytes) -> None:
        """Answer the whole requests at the start of C{data}, in order; hold the rest."""
        self._serving = True
        try:
            pos, size = 0, len(data)
            while pos < size:
                if self._current is not None or self._lent is not None:
                    self._hold(data[pos:], _UNKNOWN)
                    return
                if self._lost or self.fallen is not None:
                    return
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    # twisted.web answers a bad line as soon as it has it (and the next one):
                    # the lines of a head not all here yet are looked at as they come.
                    lines = data.rfind(b"\r\n", pos)
                    if size - pos > _MAX_HEAD or (lines > pos and self._parse(data[pos:lines], False) is None):
                        self._fall_back(data[pos:])
                    else:
                        self._hold(data[pos:], size - pos + 1)
                    return
                parsed = self._parse(data[pos:end])
                if parsed is None:
                    self._fall_back(data[pos:])
                    return
                method, uri, headers, length = parsed
                start = end + 4
                stop = start + length
                if stop > size:
                    self._hold(data[pos:], stop - pos)
                    return
                if headers is None:
                    self._lend(data[pos:stop])
                    pos = stop
                    continue
                request = LeanRequest(self, method, uri, headers, data[start:stop] if length else b"")
                pos = stop
                self._current = request
                self._process(request)
        finally:
            self._serving = False

    def _parse(self, head: bytes, whole: bool = True) -> tuple[bytes, bytes, dict[bytes, bytes] | None, int] | None:
        """
        A request's method, target, headers (by lower-case name) and body length, or None
        when twisted.web is to have the rest of the connection. The headers are None when
        the request is plain HTTP/1.1 whose end is known but not one of the fast routes':
        twisted.web is lent it alone. Given the first lines of a head only (not C{whole}),
        None if they already say the connection is twisted.web's.
        """
        lines = head.split(b"\r\n")
        if len(head) > _MAX_HEAD or len(lines) > _MAX_LINES:
            return None
        if len(head) - len(head.translate(None, b"\r\n\x00")) != 2 * len(lines) - 2:
            return None  # a NUL, or a lone CR or LF: twisted.web decides what it means
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return None
        method, uri, version = parts
        if uri[:1] != b"/":
            uri = origin_form(uri)  # an absolute-form target: served as twisted.web serves it
        if (
            version != b"HTTP/1.1"
            or not method
            or method.translate(None, _TOKEN_BYTES)
            or uri[:1] != b"/"
            or uri.translate(None, _TARGET_BYTES)
        ):
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            colon = line.find(b":")
            name = line[:colon].lower()
            if colon <= 0 or name.translate(None, _TOKEN_BYTES) or name in headers:
                return None
            headers[name] = line[colon + 1 :].strip(b" \t")
        length = 0
        if b"content-length" in headers:
            text = headers[b"content-length"]
            if not text.isdigit() or len(text) > 12:
                return None
            length = int(text)
        if (
            length > _MAX_BODY
            or (length and length > self.site.limit_for(uri))
            or (b"connection" in headers and b"close" in headers[b"connection"].lower())
            or not _NOT_TAKEN.isdisjoint(headers)
        ):
            return None
        query = uri.find(b"?")
        auth = self.site.auth
        if (
            whole
            and length
            and auth is not None
            and auth.required
            and not auth.allows(uri if query < 0 else uri[:query], headers.get(b"authorization"))
        ):
            return None  # a body without its token: twisted.web refuses it from the head, unread
        if (
            method not in _METHODS
            or (method in _WITH_BODY and b"content-length" not in headers)
            or (method == b"POST" and b"content-type" in headers)  # a form: twisted.web parses it
            or not self.door.takes(method, uri if query < 0 else uri[:query])
        ):
            return method, uri, None, length
        return method, uri, headers, length

    def _lend(self, data: bytes) -> None:
        """Have a twisted.web channel answer the one request C{data} holds, then go on here."""
        channel: Any = self.site.twisted_channel(self.addr)
        self._lent = channel
        self._network.unregisterProducer()  # the channel is the transport's producer meanwhile
        channel.on_request_done = self._returned
        channel.makeConnection(self.transport)
        channel.dataReceived(data)

    def _returned(self) -> None:
        channel = self._lent
        if channel is None:
            return
        if not channel.persistent:
            self.fallen, self._lent = channel, None  # it is closing the connection
            self.setTimeout(None)
            return
        channel.on_request_done = None
        channel.setTimeout(None)
        self._lent = None
        self._network.unregisterProducer()
        self._network.registerProducer(self, True)
        # The transport may have been paused before or during the lent answer (its buffer
        # full), and it would tell the channel lent it, not this one, when it drains: read
        # again now, as twisted.web's requestDone does; the next write pauses anew if it is
        # still full. (Else a pipelining client that reads slowly was never read again.)
        self._transport_pause = False
        if not self._held_pause:
            self._network.resumeProducing()
        self._go_on()

    def _process(self, request: LeanRequest) -> None:
        # As twisted.web's Request.process and render, for what the front door answers.
        try:
            body = self.door.serve(request)
            if body is NOT_DONE_YET:
                return
            if not isinstance(body, bytes):
                raise TypeError(f"the front door answered {type(body).__name__}, not bytes")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.write(body)
            request.finish()
        except BaseException:
            request.processing_failed(Failure())

    def answered(self, request: LeanRequest) -> None:
        """C{request}'s answer is written: go on with what was held behind it."""
        if request is not self._current:
            return
        self._current = None
        self._go_on()

    def _go_on(self) -> None:
        """The answer of a request is done: the connection is idle, or serves what was held."""
        if self._serving:
            return  # answered at once: the loop of _serve goes on
        if self._timed_out_answering:
            self._timed_out_answering = False
            self.setTimeout(self.timeOut)
        else:
            self.resetTimeout()  # the connection is idle from now
        if self._held_pause:
            self._held_pause = False
            if not self._transport_pause:
                self._network.resumeProducing()
        if self._held:
            data = b"".join(self._held)
            self._held, self._held_size, self._needed = [], 0, 0
            self._serve(data)

    def _fall_back(self, data: bytes) -> None:
        """Become a twisted.web channel for the rest of this connection, starting with C{data}."""
        self.setTimeout(None)
        channel: Any = self.site.twisted_channel(self.addr)
        self.fallen = channel
        self._network.unregisterProducer()
        if self._held_pause or self._transport_pause:
            self._held_pause = self._transport_pause = False
            self._network.resumeProducing()
        channel.makeConnection(self.transport)
        if data:
            channel.dataReceived(data)

    def timeoutConnection(self) -> None:
        if self._current is not None or self._lent is not None:
            self._timed_out_answering = True  # not idle: the timer starts again after the answer
            return
        assert self.transport is not None
        _log.info("Timing out client: {peer}", peer=str(self.transport.getPeer()))
        self._aborting = self.callLater(self.abortTimeout, self._abort)
        self.transport.loseConnection()

    def _abort(self) -> None:
        self._aborting = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.fallen is not None:
            self.fallen.connectionLost(reason)  # type: ignore[arg-type]
            return
        self._lost = True
        self.setTimeout(None)
        if self._aborting is not None:
            self._aborting.cancel()
            self._aborting = None
        if self._lent is not None:
            self._lent.connectionLost(reason)
        current, self._current = self._current, None
        if current is not None:
            current.connection_lost()

    # IPushProducer: the transport's buffer is full; read nothing more until it drains.

    def pauseProducing(self) -> None:
        if self.fallen is None and not self._transport_pause:
            self._transport_pause = True
            self._network.pauseProducing()

    def resumeProducing(self) -> None:
        if self.fallen is None and self._transport_pause:
            self._transport_pause = False
            if not self._held_pause:
                self._network.resumeProducing()

    def stopProducing(self) -> None:
        pass


class LeanSite(BoundedSite):
    """A L{BoundedSite} whose connections are L{LeanChannel}s when its resource has fast routes."""

    def buildProtocol(self, addr: IAddress | None) -> Any:
        door = self.resource
        if self.access_log or not isinstance(door, FastDoor) or not door.serves_fast:
            return super().buildProtocol(addr)
        channel = LeanChannel(self, door, addr)
        channel.factory = self
        channel.callLater = self.reactor.callLater  # type: ignore[method-assign,assignment]
        channel.timeOut = self.timeOut  # type: ignore[assignment]
        return channel

    def twisted_channel(self, addr: IAddress | None) -> Any:
        """The twisted.web channel (a L{kvd.web.BoundedChannel}) a connection is served by otherwise."""
        return super().buildProtocol(addr)
