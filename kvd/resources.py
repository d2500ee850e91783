"""
The HTTP layer of every role: thin Klein handlers that parse, call the domain and render JSON.

Each role's routes are declared once, with L{Routes}: that feeds Klein, and the hottest
routes (the key-value ones, and the internal batches) also feed a fast path that skips
Klein's router. One error table (L{STATUSES}, L{render_error}) maps domain errors to status
codes; anything unexpected is logged with its traceback and answered with a plain 500 JSON
body, never the traceback. Client errors (4xx) are not logged: they are the client's news,
not the server's (C{--access-log} records every request).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from types import CoroutineType
from typing import Any, Generic, TypeVar
from urllib.parse import unquote_to_bytes

from attrs import define, field
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import BaseConverter

from kvd import paths, ui
from kvd.auth import Auth
from kvd.changes import MAX_KEYS, ChangeIndex, unchanged
from kvd.codec import wire_json, wire_loads
from kvd.gateway.batch import ANSWER_BUDGET, Batch, BatchRunner
from kvd.gateway.cas import Proposer
from kvd.gateway.cluster import Cluster
from kvd.gateway.coordinator import Coordinator, WriteOutcome
from kvd.gateway.export import Cut, Exporter, ExportStopped, Importer, Valve
from kvd.gateway.feed import Feed, Watches
from kvd.gateway.figures import NodeFigures
from kvd.gateway.hot import HotKeys
from kvd.gateway.listing import Lister
from kvd.gateway.plan import parse_change, plan
from kvd.gateway.quorum import QuorumFailed
from kvd.gateway.repair import Repairer
from kvd.internal import RepairReport
from kvd.keys import (
    BATCH_VALUE_BUDGET,
    DEFAULT_MAX_VALUE_BYTES,
    TYPED,
    BadKey,
    ClientError,
    NotFound,
    Precondition,
    PreconditionFailed,
    Unavailable,
    ValueTooLarge,
    check_key,
    check_value,
    parse_key,
    parse_precondition,
    parse_value,
    raw_value,
    typed_json,
    value_json,
)
from kvd.lean_http import LeanRequest
from kvd.metrics import CONTENT_TYPE, Metrics
from kvd.paxos import Acceptor, Promise, Proposal
from kvd.registry import STATUSES as MEMBER_STATUSES
from kvd.registry import InvalidRegistration, Registry, StaleIncarnation, Status
from kvd.store import BUCKETS, Applied, BadBatch, Entry, Store, StoreError
from kvd.ttl import BadTTL, expired, expires, parse_ttl
from kvd.validate import Invalid, number
from kvd.versions import is_version
from kvd.web import BoundedRequest, HotRequest, json_body

_log = Logger()
#: The most keys one listing page may ask for.
MAX_LIST = 1000
DEFAULT_LIST = 100
#: The longest long poll the registry holds open.
MAX_WAIT = 300.0
DEFAULT_WAIT = 30.0
#: How many hot keys /cluster/hot lists unless asked, and at most.
DEFAULT_HOT = 10
MAX_HOT = 100
#: Changes a page of the change feed holds, by default and at most.
DEFAULT_PAGE = 100
MAX_PAGE = 1000

#: The error table: the first row whose class the error is an instance of gives its status.
STATUSES: tuple[tuple[type[BaseException], int], ...] = (
    (NotFound, 404),
    (ValueTooLarge, 413),
    (PreconditionFailed, 412),
    (ClientError, 400),
    (InvalidRegistration, 400),
    (BadBatch, 400),
    (BadTTL, 400),
    (StaleIncarnation, 409),
    (Unavailable, 503),
    (StoreError, 503),
    (RouteNotFound, 404),
    (MethodNotAllowed, 405),
)

#: What a handler gives: a body, a Deferred of one, or a coroutine of one.
Rendered = Any
H = TypeVar("H", bound=Callable[..., Any])
A = TypeVar("A")


def _json(request: HotRequest, obj: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    body = json_body(obj)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _wire(request: HotRequest, obj: object) -> bytes:
    """A 200 answer of the internal API, in its compact JSON (see L{kvd.codec})."""
    body = wire_json(obj)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def json_request(request: HotRequest, what: str, wire: bool = False) -> Any:
    """
    The request body, parsed as JSON; C{what} says what it should be, in the error. With
    C{wire}, the body is from another kvd process (see L{kvd.codec}).
    """
    try:
        raw = request.content.read()
        return wire_loads(raw) if wire else json.loads(raw)
    except (ValueError, RecursionError):  # nesting deep enough to exhaust the parser, too
        raise ClientError(f"the body must be JSON: {what}") from None


def _batch(request: HotRequest, name: str, wire: bool = False) -> list[Any]:
    """The list under C{name} of a JSON request body."""
    body = json_request(request, f'{{"{name}": [...]}}', wire)
    items = body.get(name) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ClientError(f'the body must be {{"{name}": [...]}}')
    return items


def _versioned(request: HotRequest, body: dict[str, Any]) -> bytes:
    """A key's answer, with its version as the ETag too (and its expiry, if it has one)."""
    version = body["version"]
    request.setHeader(b"etag", b'"%s"' % version.encode())
    if "~" in version:
        body["expires"] = expires(version)
    return _json(request, body)


def _wants_raw(request: HotRequest) -> bool:
    """Whether a GET asks for the value's bytes themselves (C{?raw=true}) rather than JSON."""
    values = request.args.get(b"raw")
    if not values:
        return False
    flag = values[0].lower()
    if flag not in (b"true", b"false", b"1", b"0"):
        raise ClientError("raw must be true or false")
    return flag in (b"true", b"1")


def _entry_answer(
    request: HotRequest, key: str, value: str, version: str, raw: bool = False, extra: dict[str, Any] | None = None
) -> bytes:
    """
    A key's answer: JSON (bytes as base64 with C{"encoding": "base64"}; C{extra} fields after
    the version) or, with C{raw}, the bytes.
    """
    if not raw:
        if value[:1] == TYPED:
            body = {"success": True, "key": key, **typed_json(value), "version": version}
        else:  # plain text (typed_json's answer for it, without making that dict)
            body = {"success": True, "key": key, "value": value, "version": version}
        if extra:
            body.update(extra)  # the same order as {**body, **extra}
        return _versioned(request, body)
    data, content_type = raw_value(value)
    request.setResponseCode(200)
    request.setHeader(b"etag", b'"%s"' % version.encode())
    request.setHeader(b"content-type", content_type.encode("latin-1"))
    request.setHeader(b"content-length", b"%d" % len(data))
    return data


def _content_type(request: HotRequest) -> bytes | None:
    value: bytes | None = request.getHeader(b"content-type")
    return value


def _text_arg(request: HotRequest, name: bytes) -> str | None:
    """A query argument as text; L{ClientError} unless it is UTF-8."""
    values = request.args.get(name)
    if not values:
        return None
    try:
        text: str = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ClientError(f"{name.decode()} must be UTF-8") from None
    return text


def _item(key: str, value: str, version: str) -> dict[str, Any]:
    item: dict[str, Any] = {"key": key, **value_json(value), "version": version}
    if "~" in version:
        item["expires"] = expires(version)
    return item


def _ttl_arg(request: HotRequest) -> float | None:
    """The C{ttl} query argument in seconds, if given; L{BadTTL} unless it is a sensible one."""
    values = request.args.get(b"ttl")
    return None if not values else parse_ttl(values[0].decode("utf-8", "replace"))


def _number_arg(request: HotRequest, name: bytes, kind: type[float] | type[int]) -> Any:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return number(values[0].decode("utf-8", "replace"), kind, 0, name.decode())
    except Invalid as e:
        raise ClientError(str(e)) from None


def _precondition(request: HotRequest, delete: bool = False) -> Precondition | None:
    if_match, if_none_match = request.getHeader(b"if-match"), request.getHeader(b"if-none-match")
    if if_match is None and if_none_match is None:
        return None  # parse_precondition's answer, without its call: most writes are not conditional
    return parse_precondition(if_match, if_none_match, delete)


def _watch_args(request: HotRequest) -> tuple[float, str]:
    """A watch's C{wait} (seconds, at most L{MAX_WAIT}) and C{version} ("": absent)."""
    wait = min(_number_arg(request, b"wait", float) or 0.0, MAX_WAIT)
    return wait, _text(request.args.get(b"version", [b""])[0])


def render_error(request: HotRequest, failure: Failure, key: str | None = None) -> bytes:
    """The error table at work: a failure becomes a status and a JSON body."""
    error = failure.value
    status = next((code for kind, code in STATUSES if isinstance(error, kind)), None)
    if status is None:
        _log.failure(
            "unexpected error answering {method} {path}",
            failure,
            method=_text(request.method),
            path=_text(request.path),
        )
        return _json(request, {"success": False, "error": "internal error; see the server log"}, 500)
    body: dict[str, Any] = {"success": False}
    if key is not None:
        body["key"] = key
    if isinstance(error, RouteNotFound):
        body["error"] = "no such endpoint"
    elif isinstance(error, MethodNotAllowed):
        allowed = ", ".join(sorted(error.valid_methods or []))
        request.setHeader(b"allow", allowed.encode())
        body["error"] = f"method not allowed here; allowed: {allowed}"
    else:
        body["error"] = str(error)
    if isinstance(error, PreconditionFailed):
        body["version"] = error.current
    if isinstance(error, QuorumFailed):
        body["answered"], body["needed"] = error.answered, error.needed
        if error.receipt is not None:
            body.update(error.receipt.to_json())
            body["partial"] = error.receipt.partial
    if isinstance(error, StaleIncarnation):
        body["incarnation"] = error.current  # what a restored node must move past
    if status >= 500:
        _log.warn(
            "{method} {path}: {status} {error}",
            method=_text(request.method),
            path=_text(request.path),
            status=status,
            error=body["error"],
        )
    return _json(request, body, status)


def _settled(result: Rendered, request: HotRequest, key: str | None) -> Rendered:
    """A handler's result with its errors rendered: bytes, or a Deferred that fires with bytes."""
    if isinstance(result, CoroutineType):  # inspect.iscoroutine's test, without its call
        result = Deferred.fromCoroutine(result)
    if isinstance(result, Deferred):
        return result.addErrback(_render_failure, request, key)
    return result


def _render_failure(failure: Failure, request: Any, key: str | None) -> bytes | None:
    if failure.check(CancelledError) and request._disconnected:
        return None  # the client went away; a write it started still completes
    return render_error(request, failure, key)


def _call_keyed(handler: Callable[..., Rendered], api: object, request: HotRequest, prefix: bytes) -> Rendered:
    # The raw path, not Klein's decoded argument: a key may hold an encoded "/" (%2F).
    try:
        key = parse_key(request.path[len(prefix) :])
    except BadKey:
        return render_error(request, Failure())
    try:
        result = handler(api, request, key)
    except Exception:
        return render_error(request, Failure(), key)
    return _settled(result, request, key)


def _call(handler: Callable[..., Rendered], api: object, request: HotRequest) -> Rendered:
    try:
        result = handler(api, request)
    except Exception:
        return render_error(request, Failure())
    return _settled(result, request, None)


class _Rest(BaseConverter):
    """The rest of the path, whatever it holds (werkzeug's own "path" stops at a newline)."""

    regex = r"[\s\S]+"
    part_isolating = False


class Routes:
    """
    A role's routes, declared once: each becomes a Klein route, and those marked C{fast}
    are also served by L{Routes.resource}'s front door without Klein's router (which binds
    a werkzeug map and runs a chain of Deferreds for every request: on the key-value path
    that was half of a node's time). Both call the same handler the same way.
    """

    def __init__(self) -> None:
        self.app = Klein()
        self._keyed: dict[tuple[bytes, bytes], Callable[..., Rendered]] = {}
        self._exact: dict[tuple[bytes, bytes], Callable[..., Rendered]] = {}
        self._common()

    def key(self, prefix: bytes, *methods: str, fast: bool = False) -> Callable[[H], H]:
        """A handler C{(api, request, key)} for C{PREFIX{key}}: the key is parsed (400 if bad) and errors carry it."""

        def register(handler: H) -> H:
            def via_klein(api: object, request: IRequest, **_: object) -> Rendered:
                result = _call_keyed(handler, api, request, prefix)
                return result.deferred() if result.__class__ is Answering else result

            def empty(api: object, request: IRequest, **_: object) -> Rendered:
                # Without strict slashes "/kv" matches "/kv/" too: on a role with no route of its
                # own there (a node's GET /kv, a listing), that is no endpoint, not an empty key.
                if request.path == prefix.rstrip(b"/"):
                    return render_error(request, Failure(RouteNotFound()))
                return via_klein(api, request)

            name = handler.__name__
            self.app.route(prefix.decode(), methods=list(methods), endpoint=f"{name}-empty")(empty)
            self.app.route(prefix.decode() + "<rest:_>", methods=list(methods), endpoint=name)(via_klein)
            if fast:
                for method in methods:
                    self._keyed[(method.encode(), prefix)] = handler
            return handler

        return register

    def path(self, path: str, *methods: str, fast: bool = False) -> Callable[[H], H]:
        """A handler C{(api, request, **url arguments)} for one path (Klein's syntax for arguments)."""

        def register(handler: H) -> H:
            def via_klein(api: object, request: IRequest, **arguments: object) -> Rendered:
                try:
                    result = handler(api, request, **arguments)
                except Exception:
                    return render_error(request, Failure())
                return _settled(result, request, None)

            self.app.route(path, methods=list(methods), endpoint=handler.__name__)(via_klein)
            if fast:
                for method in methods:
                    self._exact[(method.encode(), path.encode())] = handler
            return handler

        return register

    def _common(self) -> None:
        """Routes and error handling every role's app shares."""
        app = self.app
        app.url_map.merge_slashes = False
        app.url_map.strict_slashes = False
        app.url_map.converters["rest"] = _Rest

        @app.handle_errors(Exception)
        def error(self: Any, request: IRequest, failure: Failure) -> bytes:
            return render_error(request, failure)

        @self.path("/healthz", "GET")
        def healthz(api: Any, request: IRequest) -> bytes:
            problem = api.problem() if hasattr(api, "problem") else None
            if problem is not None:
                return _json(request, {"success": False, "status": "failing", "error": problem}, 503)
            return _json(request, {"success": True, "status": "ok"})

        @self.path("/metrics", "GET")
        def metrics(api: Any, request: IRequest) -> bytes:
            body: bytes = api.metrics.render()
            request.setHeader(b"content-type", CONTENT_TYPE)
            request.setHeader(b"content-length", b"%d" % len(body))
            return body

    def resource(self, api: object, auth: Auth) -> Resource:
        """What a role's Site serves for C{api}, an instance of the class these routes belong to."""
        app: Klein = self.app.__get__(api, type(api))
        return _FrontDoor(api, app.resource(), self._keyed, self._exact, auth)


class _FrontDoor(Resource):
    """
    Checks the bearer token, then sends the fast routes straight to their handlers and
    everything else to the role's Klein app. A path that is not UTF-8 gets 400 JSON here
    (Klein would answer in plain text).
    """

    isLeaf = True

    def __init__(
        self,
        api: object,
        app: Resource,
        keyed: dict[tuple[bytes, bytes], Callable[..., Rendered]],
        exact: dict[tuple[bytes, bytes], Callable[..., Rendered]],
        auth: Auth,
    ) -> None:
        super().__init__()
        self._api = api
        self._app = app
        self._kv = {method: handler for (method, prefix), handler in keyed.items() if prefix == paths.KV}
        self._exact = exact
        self._allowed: dict[bytes, set[str]] = {}
        for method, exact_path in exact:
            self._allowed.setdefault(exact_path, set()).update(
                {method.decode(), "HEAD"} if method == b"GET" else {method.decode()}
            )
        self._auth = auth

    @property
    def auth(self) -> Auth:
        """What requests must carry (the Site checks it too, before reading a large body)."""
        return self._auth

    @property
    def serves_fast(self) -> bool:
        """Whether any route is served without Klein (what a lean connection asks first)."""
        return bool(self._kv or self._exact)

    def takes(self, method: bytes, path: bytes) -> bool:
        """Whether L{serve} sends this request straight to a handler, without Klein."""
        if path.startswith(paths.KV) and len(path) > len(paths.KV) and method in self._kv:
            return True
        return (method, path) in self._exact

    def render(self, request: IRequest) -> Any:
        return self.serve(request)

    def serve(self, request: HotRequest) -> Any:
        """
        What C{render} answers; a lean connection (L{kvd.lean_http}) calls it for the
        requests L{takes} says go straight to a handler.
        """
        path = request.path
        if self._auth.required and not self._auth.allows(path, request.getHeader(b"authorization")):
            request.setHeader(b"www-authenticate", b'Bearer realm="kvd"')
            return _json(request, {"success": False, "error": "this needs a valid Authorization: Bearer token"}, 401)
        if path.startswith(paths.KV) and len(path) > len(paths.KV):
            handler = self._kv.get(request.method)
            if handler is not None:
                return self._finish(request, _call_keyed(handler, self._api, request, paths.KV))
        exact = self._exact.get((request.method, path))
        if exact is not None:
            return self._finish(request, _call(exact, self._api, request))
        allowed = self._allowed.get(path)
        if allowed is not None and request.method.decode("ascii", "replace") not in allowed:
            # Klein would take "/kv" for an empty key under "/kv/" (its rules ignore a missing
            # trailing slash): a fast exact path answers other methods itself.
            return render_error(request, Failure(MethodNotAllowed(valid_methods=sorted(allowed))))
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            return _json(request, {"success": False, "error": "the URL path is not valid UTF-8"}, 400)
        return self._app.render(request)  # never a lean request: L{takes} said no to it

    def _finish(self, request: Any, result: Rendered) -> Any:
        if result.__class__ is Answering:
            result.write()
            if not result.called:
                if isinstance(request, (BoundedRequest, LeanRequest)):
                    request.cancel_on_loss(result)
                else:
                    request.notifyFinish().addErrback(lambda _: result.cancel())
            return NOT_DONE_YET
        if not isinstance(result, Deferred):
            return result
        result.addCallback(_write_and_finish, request)
        if isinstance(request, (BoundedRequest, LeanRequest)):
            request.cancel_on_loss(result)  # what notifyFinish does, without a Deferred a request
        else:
            request.notifyFinish().addErrback(lambda _: result.cancel())
        return NOT_DONE_YET


def _write_and_finish(body: bytes | None, request: Any) -> None:
    if body is not None and not request.finished and not request._disconnected:
        request.write(body)
        request.finish()


class Answering(Generic[A]):
    """
    A hot handler's answer to come, in plain callbacks: what the Deferred a handler returned
    did (its C{render} callback, the error table's errback, the front door's writing of the
    body), without the Deferred and its chain, for the gateway's GET, PUT and DELETE. A
    L{kvd.gateway.quorum.Reply} of the coordinator's outcome; told once, and nothing after
    its request's connection is lost (a write it started still completes).

    Whoever takes the handler's result says where the body goes: the front door has it written
    (L{write}), Klein (a HEAD, say) gets a Deferred of it (L{deferred}). A body that comes before
    (the outcome was known at once) waits here for that.
    """

    __slots__ = ("request", "key", "render", "called", "_body", "_direct", "_deferred")

    def __init__(self, request: Any, key: str, render: Callable[[A], bytes]) -> None:
        self.request, self.key, self.render = request, key, render
        self.called = False
        self._body: bytes | None = None
        self._direct = False
        self._deferred: Deferred[bytes] | None = None

    def callback(self, outcome: A) -> None:
        if self.called:
            return
        self.called = True
        try:
            body = self.render(outcome)
        except Exception:
            body = render_error(self.request, Failure(), self.key)
        self._answer(body)

    def errback(self, failure: Failure | BaseException) -> None:
        if self.called:
            return
        self.called = True
        failure = failure if isinstance(failure, Failure) else Failure(failure)
        self._answer(render_error(self.request, failure, self.key))

    def cancel(self) -> None:
        self.called = True

    def _answer(self, body: bytes) -> None:
        if self._direct:
            _write_and_finish(body, self.request)
        elif self._deferred is not None:
            self._deferred.callback(body)
        else:
            self._body = body  # the handler has not returned yet

    def write(self) -> None:
        """Write the answer to the request when it comes (now, if it has)."""
        body, self._body = self._body, None
        if body is not None:
            _write_and_finish(body, self.request)
        else:
            self._direct = True

    def deferred(self) -> Deferred[bytes | None] | bytes:
        """The answer, or a Deferred of it (with the errback L{_settled} gives a handler's)."""
        body, self._body = self._body, None
        if body is not None:
            return body
        self._deferred = Deferred()
        return self._deferred.addErrback(_render_failure, self.request, self.key)


@define
class NodeAPI:
    """A storage node's HTTP API: the client API over a L{Store}, plus C{/node}."""

    node_id: str
    store: Store
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    metrics: Metrics = field(factory=Metrics)
    auth: Auth = field(factory=Auth)
    #: The last repair sweep's report of what it moved for this node, if any.
    rebalance: RepairReport | None = None
    #: The Paxos acceptor for gateways' conditional writes (None: this node takes no part in them).
    acceptor: Acceptor | None = None
    #: Times long polls (watches, the change feed); without one they answer at once.
    clock: IReactorTime | None = None
    #: The store's write order, for watches and the change feed; built from the store by default.
    changes: ChangeIndex = field(default=None)

    routes = Routes()

    def __attrs_post_init__(self) -> None:
        if self.changes is None:
            self.changes = ChangeIndex.follow(self.store)

    @routes.key(paths.KV, "GET", fast=True)
    def get(self, request: HotRequest, key: str) -> Rendered:
        # Not async: a read touches memory only, and a coroutine per GET is measurable.
        if b"wait" in request.args:
            return self._watch(request, key)
        return self._answer(request, key)

    def _answer(self, request: HotRequest, key: str) -> bytes:
        raw = _wants_raw(request)
        entry = self.store.entry(key)
        if entry is None or entry[0] is None:
            raise NotFound("no such key")
        return _entry_answer(request, key, entry[0], entry[1], raw)

    async def _watch(self, request: HotRequest, key: str) -> bytes:
        """GET with C{wait}: answer once the key's version here is not C{version}, or when the wait is over."""
        wait, version = _watch_args(request)
        clock = self.clock
        if clock is not None:
            deadline = clock.seconds() + wait
            while unchanged(self.store.entry(key), version) and clock.seconds() < deadline:
                waiting = self.changes.wait_for_key(key)
                waiting.addTimeout(deadline - clock.seconds(), clock)
                try:
                    await waiting
                except TimeoutError:
                    break
        return self._answer(request, key)

    @routes.key(paths.KV, "PUT", fast=True)
    async def put(self, request: HotRequest, key: str) -> bytes:
        precondition = _precondition(request)
        ttl = _ttl_arg(request)
        value = parse_value(request.content.read(), self.max_value_bytes, _content_type(request))
        if precondition is not None:
            # Checked and written in one step on the reactor: nothing comes between.
            self._check(key, precondition)
        version = await self.store.put(key, value, ttl)
        return _entry_answer(request, key, value, version)

    @routes.key(paths.KV, "DELETE", fast=True)
    async def delete(self, request: HotRequest, key: str) -> bytes:
        precondition = _precondition(request, delete=True)
        if precondition is not None:
            self._check(key, precondition)
        deleted = self.store.delete(key)
        if deleted is None:
            raise NotFound("no such key")
        await deleted
        return _json(request, {"success": True, "key": key})

    def _check(self, key: str, precondition: Precondition) -> None:
        entry = self.store.entry(key)
        precondition.check(*(entry if entry is not None else (None, None)))

    # The internal API: what gateways use to replicate, read and repair. Batches, so one
    # request carries many keys. Its client is kvd.gateway.nodes.

    def _acceptor(self) -> Acceptor:
        if self.acceptor is None:
            raise Unavailable("this node takes no part in conditional writes")
        return self.acceptor

    @routes.path("/internal/paxos", "POST", fast=True)
    def internal_paxos(self, request: HotRequest) -> Deferred[bytes]:
        """
        A batch of conditional-write traffic, answered once all of it is durable, per item in
        order: ["p", key, ballot] (prepare: [promised, the ballot promised, the accepted
        proposal or null, what the store holds or null: [live, its version], no value, as a
        proposer needs only these]), ["a", key, ballot, value or null, version]
        (accept: [accepted, the ballot promised]), ["c", key, value or null, version]
        (commit, a replicated write: [live before, the version held]) and ["k", key, version]
        (commit of the proposal of that version this acceptor accepted: as "c" with its value,
        or null when it holds no such proposal; the answer says "accepted_commits": true, so a
        gateway knows this node takes them). The commits, then the acceptor's changes, go to
        the store's journal in one group commit (one write + fsync for the batch).
        Plain callbacks rather than a coroutine: this is every conditional write's hot path.
        """
        items = _batch(request, "items", wire=True)
        asked: list[tuple[str, str | Proposal]] = []
        commits: list[list[Any]] = []
        kinds: list[str] = []
        for item in items:
            kind = item[0] if type(item) is list and item else None
            if kind == "p" and len(item) == 3 and type(item[2]) is str:
                asked.append((check_key(item[1]), item[2]))
            elif (
                kind == "a"
                and len(item) == 5
                and type(item[2]) is str
                and (item[3] is None or type(item[3]) is str)
                and is_version(item[4])
            ):
                if item[3] is not None:
                    check_value(item[3])
                asked.append((check_key(item[1]), Proposal(item[2], item[3], item[4])))
            elif kind == "c" and len(item) == 4:
                commits.append(item[1:])
            elif kind == "k" and len(item) == 3 and type(item[1]) is str and type(item[2]) is str:
                # The proposal this acceptor accepted of this version, committed: a version
                # names one proposal, whose value the acceptor holds (durably: it answered).
                accepted = self._acceptor().state(item[1])[1]
                if accepted is None or accepted.version != item[2]:
                    kind = "missing"
                else:
                    kind = "c"
                    commits.append([item[1], accepted.value, item[2]])
            else:
                raise ClientError(
                    'each item must be ["p", key, ballot], ["a", key, ballot, value, version],'
                    ' ["c", key, value, version] or ["k", key, version]'
                )
            kinds.append(kind)
        acceptor = self._acceptor()
        # The store raises BadBatch before it changes anything. The commits are queued first:
        # a promise that forgets a proposal committed here must follow its commit in the journal.
        applied = self.store.apply_batch(commits) if commits else None
        proposed = acceptor.batch(asked) if asked else succeed([])
        store = self.store

        def answer(paxos: list[Promise | tuple[bool, str]], done: Applied | None) -> bytes:
            answers: list[Any] = []
            promises, keys = iter(paxos), iter(asked)
            commit = 0
            for kind in kinds:
                if kind == "c":
                    assert done is not None
                    answers.append([done.live[commit], done.held[commit]])
                    commit += 1
                    continue
                if kind == "missing":
                    answers.append(None)  # the gateway sends the whole commit instead
                    continue
                got, key = next(promises), next(keys)[0]
                if type(got) is Promise:
                    entry = store.entry(key)
                    accepted = got.accepted
                    answers.append(
                        [
                            got.promised,
                            got.ballot,
                            None if accepted is None else [accepted.ballot, accepted.value, accepted.version],
                            None if entry is None else [entry[0] is not None, entry[1]],
                        ]
                    )
                else:
                    answers.append(got)
            now = int(store.clock.now() * 1000)
            return _wire(request, {"success": True, "answers": answers, "now": now, "accepted_commits": True})

        if applied is None:
            return proposed.addCallback(answer, None)
        commits_done = applied

        def both(paxos: list[Promise | tuple[bool, str]]) -> Deferred[bytes]:
            return commits_done.addCallback(lambda done: answer(paxos, done))

        def failed(failure: Failure) -> Deferred[Any]:
            # The commits' own outcome first (their failure, if any, is the one told).
            return commits_done.addCallback(lambda _: failure)

        return proposed.addCallbacks(both, failed)

    @routes.path("/internal/apply", "POST", fast=True)
    def internal_apply(self, request: HotRequest) -> Deferred[bytes]:
        """
        Apply [key, value or null, version] items; answer once all are durable, with which
        were live before and the version each holds after (a newer one it kept, or the item's).
        (A callback, not a coroutine: a loaded node takes hundreds of these a second.)
        """
        return self.store.apply_batch(_batch(request, "items", wire=True)).addCallback(self._applied, request)

    def _applied(self, done: Applied, request: HotRequest) -> bytes:
        # What each key holds now, and this node's clock: a coordinator moves past both.
        body = {"success": True, "applied": done.applied, "live": done.live, "versions": done.held}
        return _wire(request, {**body, "now": int(self.store.clock.now() * 1000)})

    @routes.path("/internal/read", "POST", fast=True)
    def internal_read(self, request: HotRequest) -> bytes:
        """
        The entries ([value or null, version]) of the given keys; unknown keys are left out.
        With C{max_chars}, entries stop once their values pass it (one at least) and the
        keys not looked at are listed in C{more}, to be asked for again.
        """
        body = json_request(request, '{"keys": [...]}', wire=True)
        keys = body.get("keys") if isinstance(body, dict) else None
        budget = body.get("max_chars", BATCH_VALUE_BUDGET) if isinstance(body, dict) else None
        if not isinstance(keys, list) or type(budget) is not int:
            raise ClientError('the body must be {"keys": [...], "max_chars": N}')
        found: dict[str, list[str | None]] = {}
        for done, key in enumerate(keys):
            if budget < 0:
                return _wire(request, {"success": True, "entries": found, "more": keys[done:]})
            entry = self.store.entry(check_key(key))
            if entry is not None:
                found[key] = list(entry)
                budget -= len(entry[0] or "")
        return _wire(request, {"success": True, "entries": found})

    @routes.path("/internal/list", "POST", fast=True)
    def internal_list(self, request: HotRequest) -> bytes:
        """
        The next keys under a prefix after a key, in key order, tombstones (and expired
        entries) included with a null value: [key, value or null, version] each, with
        C{more} true when the answer stopped at its C{limit} or value budget.
        """
        body = json_request(request, '{"prefix": P, "after": K, "limit": N, "values": B}')
        if not isinstance(body, dict):
            raise ClientError('the body must be {"prefix": P, "after": K, "limit": N, "values": B}')
        prefix, after, limit, values = body.get("prefix", ""), body.get("after"), body.get("limit"), body.get("values")
        if (
            not isinstance(prefix, str)
            or not (after is None or isinstance(after, str))
            or type(limit) is not int
            or not 1 <= limit <= MAX_LIST
            or not isinstance(values, bool)
        ):
            raise ClientError(f"prefix and after are strings, limit 1 to {MAX_LIST}, values true or false")
        listed = self.store.listing(prefix, after, limit, values)
        return _json(request, {"success": True, "entries": listed.entries, "more": listed.more})

    @routes.path("/internal/changes", "POST")
    async def internal_changes(self, request: IRequest) -> bytes:
        """
        The keys changed here after a position of this node's write order (L{ChangeIndex}),
        each with its entry now; waits up to C{wait} seconds for one when there is none. A
        position of another epoch (an earlier run of this node) counts as 0.
        """
        shape = '{"since": [EPOCH, POSITION] or null, "prefix": P, "limit": N, "wait": S}'
        body = json_request(request, shape)
        if not isinstance(body, dict):
            raise ClientError("the body must be a JSON object")
        since, prefix, limit = body.get("since"), body.get("prefix", ""), body.get("limit", 1000)
        wait, values = body.get("wait", 0), body.get("values", True)
        if not (
            (since is None or (isinstance(since, list) and len(since) == 2 and isinstance(since[0], str)))
            and isinstance(prefix, str)
            and type(limit) is int
            and limit > 0
            and type(wait) in (int, float)
            and isinstance(values, bool)
        ) or (since is not None and type(since[1]) is not int):
            raise ClientError(f"the body must be {shape}")
        index = self.changes
        if since is None:
            position = index.position
        elif since[0] != index.epoch or not 0 <= since[1] <= index.position:
            position = 0
        else:
            position = since[1]
        limit = min(limit, MAX_KEYS)
        page = index.since(position, prefix, limit)
        if not page.keys and not page.more and wait > 0 and self.clock is not None:
            waiting = index.wait_for_prefix(prefix)
            waiting.addTimeout(min(float(wait), MAX_WAIT), self.clock)
            try:
                await waiting
            except TimeoutError:
                pass
            page = index.since(position, prefix, limit)
        changes: list[list[str | int | None]] = []
        budget, next_position, more = BATCH_VALUE_BUDGET, page.next, page.more
        for done, key in enumerate(page.keys):
            if budget < 0:
                next_position, more = index.seq_of(page.keys[done - 1]) or position, True
                break
            entry = self.store.entry(key)
            if entry is None:
                continue
            # Without values, a live key's value is sent as "" and a tombstone's as null.
            # [key, value, version, position of the change]
            changes.append([key, entry[0] if values or entry[0] is None else "", entry[1], index.seq_of(key)])
            if values:
                budget -= len(entry[0] or "")
        return _json(
            request, {"success": True, "epoch": index.epoch, "next": next_position, "more": more, "changes": changes}
        )

    @routes.path("/internal/digests", "GET")
    def internal_digests(self, request: IRequest) -> bytes:
        return _json(request, {"success": True, "digests": [f"{d:016x}" for d in self.store.digests()]})

    @routes.path("/internal/versions", "POST")
    def internal_versions(self, request: IRequest) -> bytes:
        """key -> version of every key (tombstones too) in the given key ranges."""
        buckets = _batch(request, "buckets")
        if not all(isinstance(b, int) and 0 <= b < BUCKETS for b in buckets):
            raise ClientError(f"buckets are whole numbers from 0 to {BUCKETS - 1}")
        versions, tombstones = self.store.versions_in(set(buckets))
        return _json(request, {"success": True, "versions": versions, "tombstones": tombstones})

    @routes.path("/internal/drop", "POST")
    async def internal_drop(self, request: IRequest) -> bytes:
        """Forget [key, version] items this node no longer needs (only where the version still matches)."""
        dropped = await self.store.drop_batch(_batch(request, "items"))
        return _json(request, {"success": True, "dropped": dropped})

    @routes.path("/internal/progress", "POST")
    def internal_progress(self, request: IRequest) -> bytes:
        """A repair sweep's report of what it moved for this node; shown in GET /node."""
        try:
            self.rebalance = RepairReport.from_json(json_request(request, "a progress report"))
        except ValueError as e:
            raise ClientError(str(e)) from None
        return _json(request, {"success": True})

    def problem(self) -> str | None:
        """Why this node cannot serve writes, if it cannot (for /healthz)."""
        failed = self.store.failed
        return None if failed is None else str(failed)

    @routes.path("/node", "GET")
    def node(self, request: IRequest) -> bytes:
        body: dict[str, Any] = {"success": True, "id": self.node_id, "keys": len(self.store)}
        if self.rebalance is not None:
            body["rebalance"] = self.rebalance.to_json()
        return _json(request, body)

    def resource(self) -> Resource:
        return self.routes.resource(self, self.auth)


def _status_arg(request: IRequest) -> Status | None:
    values = request.args.get(b"status")
    if not values:
        return None
    for status in MEMBER_STATUSES:
        if values[0] == status.encode():
            return status
    raise ClientError(f"status must be one of {', '.join(MEMBER_STATUSES)}, not {_text(values[0])[:40]!r}")


@define
class RegistryAPI:
    """The service registry's HTTP API over a L{Registry}; C{clock} gives the time and times long polls."""

    registry: Registry
    clock: IReactorTime
    metrics: Metrics = field(factory=Metrics)
    auth: Auth = field(factory=Auth)
    #: Tells watchers this is a new registry process even when its index matches an old one.
    epoch: str = field(factory=lambda: secrets.token_hex(8))

    routes = Routes()

    @routes.path("/registry/nodes", "GET")
    async def nodes(self, request: IRequest) -> bytes:
        index = _number_arg(request, b"index", int)
        wait = _number_arg(request, b"wait", float)
        status = _status_arg(request)
        self.registry.expire(self.clock.seconds())
        if index is not None:
            waiting = self.registry.wait_for_change(index)
            waiting.addTimeout(min(DEFAULT_WAIT if wait is None else wait, MAX_WAIT), self.clock)
            try:
                await waiting
            except TimeoutError:
                pass  # nothing changed: answer with the same index
        return _json(
            request,
            {"success": True, **self.registry.snapshot(status), "ttl": self.registry.ttl, "epoch": self.epoch},
        )

    @routes.path("/registry/nodes/<rest:node_id>", "PUT")
    def register(self, request: IRequest, node_id: str) -> bytes:
        body = json_request(request, '{"url": URL, "weight": 1}')
        self.registry.register(node_id, body, self.clock.seconds())
        return _json(request, {"success": True, "ttl": self.registry.ttl})

    @routes.path("/registry/nodes/<rest:node_id>", "DELETE")
    def leave(self, request: IRequest, node_id: str) -> bytes:
        incarnation = _number_arg(request, b"incarnation", int)
        if not self.registry.leave(node_id, self.clock.seconds(), incarnation):
            raise NotFound(f"no registered node {node_id!r}")
        return _json(request, {"success": True, "id": node_id})

    def resource(self) -> Resource:
        return self.routes.resource(self, self.auth)


@define
class GatewayAPI:
    """
    The client API in front of the cluster: each write goes to the key's N replicas and is
    answered after W; each read asks R and answers the newest (see L{kvd.gateway.coordinator}).
    Plus C{/cluster}, with the repair sweep's progress and what this gateway's failure
    detector thinks of each node, C{/readyz}, whether quorums can be reached,
    C{/cluster/plan} (what a membership change would move) and C{/cluster/hot} (the most
    requested keys of the last minute, counted in C{hot} when given).
    """

    cluster: Cluster
    coordinator: Coordinator
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    metrics: Metrics = field(factory=Metrics)
    auth: Auth = field(factory=Auth)
    repairer: Repairer | None = None
    proposer: Proposer | None = None
    hot: HotKeys | None = None
    #: Whether a /cluster/plan dry run is being worked out (one at a time: each builds a ring).
    _planning: bool = field(default=False, init=False)

    #: Times watches and the change feed's long polls; without one they answer at once.
    clock: IReactorTime | None = None
    feed: Feed = field(default=None)
    watches: Watches | None = None
    #: The nodes' own figures for /cluster; made on the node clients' transport unless given.
    figures: NodeFigures = field(default=None)

    routes = Routes()

    def __attrs_post_init__(self) -> None:
        if self.feed is None:
            self.feed = Feed(self.cluster, self.coordinator.nodes)
        if self.watches is None and self.clock is not None:
            self.watches = Watches(self.cluster, self.coordinator, self.clock)
        if self.figures is None and self.coordinator is not None:
            nodes = self.coordinator.nodes
            self.figures = NodeFigures(nodes, nodes.peers.reactor)

    def _conditional(
        self, key: str, value: str | None, precondition: Precondition, ttl: float | None = None
    ) -> Deferred[WriteOutcome]:
        if self.proposer is None:
            raise Unavailable("this gateway takes no conditional writes")
        return self.proposer.write(key, value, precondition, ttl)

    @routes.key(paths.KV, "GET", fast=True)
    def get(self, request: HotRequest, key: str) -> Deferred[bytes] | Answering[Entry | None]:
        # Without a coroutine, as this is the gateway's busiest path.
        if self.hot is not None:
            self.hot.record(key)

        raw = _wants_raw(request)

        def render(entry: Entry | None) -> bytes:
            if entry is None or entry[0] is None or ("~" in entry[1] and expired(entry[1], self._now())):
                raise NotFound("no such key")
            return _entry_answer(request, key, entry[0], entry[1], raw)

        if b"wait" in request.args and self.watches is not None:
            wait, version = _watch_args(request)
            return Deferred.fromCoroutine(self.watches.watch(key, version, wait)).addCallback(render)
        answering = Answering(request, key, render)
        self.coordinator.read_to(answering, key)
        return answering

    @routes.path("/changes", "GET")
    async def changes(self, request: IRequest) -> bytes:
        """The change feed: keys written since a cursor, on every node, merged."""
        wait, _ = _watch_args(request) if self.clock is not None else (0.0, "")
        limit = _number_arg(request, b"limit", int)
        if limit is not None and not 1 <= limit <= MAX_PAGE:
            raise ClientError(f"limit must be from 1 to {MAX_PAGE}")
        cursor = request.args.get(b"cursor", [None])[0]
        prefix = _text(request.args.get(b"prefix", [b""])[0])
        page = await self.feed.changes(
            None if cursor is None else _text(cursor), prefix, DEFAULT_PAGE if limit is None else limit, wait
        )
        changes = [
            {"key": key, "value": None, "version": version} if value is None else _item(key, value, version)
            for key, value, version in page.changes
        ]
        return _json(request, {"success": True, "changes": changes, "next": page.next})

    @routes.key(paths.KV, "PUT", fast=True)
    def put(self, request: HotRequest, key: str) -> Deferred[bytes] | Answering[WriteOutcome]:
        if self.hot is not None:
            self.hot.record(key)
        precondition = _precondition(request)
        ttl = _ttl_arg(request)
        value = parse_value(request.content.read(), self.max_value_bytes, _content_type(request))

        def render(written: WriteOutcome) -> bytes:
            return _entry_answer(request, key, value, written.version, extra=written.receipt.to_json())

        if precondition is not None:
            return self._conditional(key, value, precondition, ttl).addCallback(render)
        answering = Answering(request, key, render)
        self.coordinator.write_to(answering, key, value, ttl)
        return answering

    @routes.key(paths.KV, "DELETE", fast=True)
    def delete(self, request: HotRequest, key: str) -> Deferred[bytes] | Answering[WriteOutcome]:
        if self.hot is not None:
            self.hot.record(key)

        def render(written: WriteOutcome) -> bytes:
            if not written.live:
                raise NotFound("no such key")
            body = {"success": True, "key": key, "version": written.version}
            return _versioned(request, {**body, **written.receipt.to_json()})

        precondition = _precondition(request, delete=True)
        if precondition is not None:
            return self._conditional(key, None, precondition).addCallback(render)
        answering = Answering(request, key, render)
        self.coordinator.write_to(answering, key, None)
        return answering

    def _now(self) -> float:
        return self.coordinator.clock.now()

    @routes.path("/kv", "GET", fast=True)
    async def list_keys(self, request: HotRequest) -> bytes:
        """A page of the cluster's keys in byte order (see L{kvd.gateway.listing})."""
        args = request.args
        prefix, after = _text_arg(request, b"prefix") or "", _text_arg(request, b"after")
        limit = _number_arg(request, b"limit", int)
        limit = DEFAULT_LIST if limit is None else limit
        if not 1 <= limit <= MAX_LIST:
            raise ClientError(f"limit must be 1 to {MAX_LIST}, not {limit}")
        values = (args.get(b"values") or [b"false"])[0].lower()
        if values not in (b"true", b"false", b"1", b"0"):
            raise ClientError("values must be true or false")
        with_values = values in (b"true", b"1")
        lister = Lister(self.coordinator.cluster, self.coordinator.nodes, self._now)
        page = await lister.page(prefix, after or None, limit, with_values)
        body: dict[str, Any] = {"success": True}
        if with_values:
            body["items"] = [_item(key, value, version) for key, value, version in page.items]
        else:
            body["keys"] = [key for key, _, _ in page.items]
        body["next"] = page.next
        return _json(request, body)

    @routes.path("/batch", "POST")
    async def batch(self, request: IRequest) -> bytes:
        """Many keys' reads, writes and deletes in one round trip (see L{kvd.gateway.batch})."""
        batch = Batch.parse(json_request(request, "a batch"), self.max_value_bytes)
        coordinator = self.coordinator
        budget = max(ANSWER_BUDGET, self.max_value_bytes)
        results = await BatchRunner(coordinator, coordinator.nodes, self._now, budget).run(batch)
        return _json(request, {"success": True, "results": results})

    @routes.path("/export", "GET")
    async def export(self, request: IRequest) -> bytes | None:
        """
        Every key's entry no later than the cut, as NDJSON, a page at a time (see
        L{kvd.gateway.export}). Errors before the first page are JSON answers; one after
        the answer has begun ends the body with a line C{{"success": false, "error": ...}}.
        """
        cut = Cut.parse(_text_arg(request, b"at"), self.coordinator)
        lister = Lister(self.coordinator.cluster, self.coordinator.nodes, self._now)
        exporter = Exporter(lister, cut)
        valve = Valve()
        chunks = exporter.chunks(valve)
        first = await chunks.__anext__()  # a cluster that cannot list is a 503 before any line
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.setHeader(b"kvd-export-at", cut.text.encode())
        consumer: Any = request  # a twisted.web Request is a consumer too
        consumer.registerProducer(valve, True)
        try:
            request.write(first)
            async for chunk in chunks:
                if chunk:
                    request.write(chunk)
        except ExportStopped:
            return None
        except Exception as e:
            error = str(e) if isinstance(e, Unavailable) else "internal error; see the server log"
            if not isinstance(e, Unavailable):
                _log.failure("export failed after {count} keys", Failure(), count=exporter.exported)
            request.write(json_body({"success": False, "error": error}) + b"\n")
        finally:
            consumer.unregisterProducer()
        _log.info(
            "exported {count} keys at {cut}; {newer} written since were left out",
            count=exporter.exported,
            cut=cut.text,
            newer=exporter.newer,
        )
        return b""

    @routes.path("/import", "POST")
    async def import_(self, request: IRequest) -> bytes:
        """
        NDJSON entries, each written with its own version (see L{kvd.gateway.export}): 200
        when every line was imported or skipped; otherwise 400 (bad lines) or 503 (writes
        the cluster could not take), the rest imported all the same, with the counts.
        """
        content = request.content
        content.seek(0)
        importer = Importer(self.coordinator, self.max_value_bytes, self._now, clock=self.clock)
        done = await importer.run(content)
        body: dict[str, Any] = {"success": done.failed == 0, **done.to_json()}
        if done.failed == 0:
            return _json(request, body)
        first = done.errors[0]
        body["error"] = f"{done.failed} lines were not imported; line {first['line']}: {first['error']}"
        return _json(request, body, 503 if done.unavailable else 400)

    @routes.path("/cluster", "GET")
    async def describe(self, request: IRequest) -> bytes:
        """
        Every member as the registry and this gateway's failure detector see it, with its key
        count and repair report from its own C{/node} (kept a few seconds; see
        L{kvd.gateway.figures}) and how many requests this gateway has sent it.
        """
        health = self.coordinator.nodes.health
        figures = await self.figures.of(self.cluster.view())
        return _json(
            request,
            {
                "success": True,
                "nodes": [
                    {**m.to_json(), **health.to_json(m.id), **self.figures.to_json(m.id, figures)}
                    for m in self.cluster.sorted()
                ],
                "replicas": self.cluster.replicas,
                "vnodes": self.cluster.vnodes,
                "write_quorum": self.coordinator.write_quorum,
                "read_quorum": self.coordinator.read_quorum,
                "repair": None if self.repairer is None else self.repairer.progress.to_json(),
            },
        )

    def _unreachable(self) -> list[str]:
        view = self.cluster.view()
        if self.coordinator is None:  # a gateway API without a coordinator (a test's)
            return [node_id for node_id in sorted(view.members) if view.members[node_id].status == "down"]
        health = self.coordinator.nodes.health
        return [node_id for node_id in sorted(view.members) if not view.usable(node_id, health.reachable)]

    @routes.path("/readyz", "GET")
    def ready(self, request: IRequest) -> bytes:
        """
        200 when every key can be written and read now: at least W members are reachable (a
        write lands on fallbacks for unreachable owners), and every ring range has at least R
        reachable owners (a read from fallbacks alone could miss acknowledged writes); else 503.
        """
        view, health = self.cluster.view(), self.coordinator.nodes.health
        down = self._unreachable()
        reachable = [node_id for node_id in sorted(view.members) if node_id not in down]
        write_quorum = min(self.coordinator.write_quorum, view.replicas)
        read_quorum = min(self.coordinator.read_quorum, view.replicas)
        writes = bool(view.members) and len(reachable) >= write_quorum
        short = view.ranges_short_of(read_quorum, health.reachable) if view.members else 0
        reads = bool(view.members) and short == 0
        body: dict[str, Any] = {
            "success": writes and reads,
            "ready": writes and reads,
            "writes": writes,
            "reads": reads,
            "reachable": reachable,
            "down": down,
        }
        if not (writes and reads):
            body["error"] = (
                "no storage nodes are registered"
                if not view.members
                else f"{len(reachable)} of {len(view.members)} nodes reachable: "
                + ("" if writes else f"fewer than W={write_quorum}; ")
                + ("" if reads else f"{short} ring ranges have fewer than R={read_quorum} reachable owners; ")
                + "not ready"
            )
        return _json(request, body, 200 if writes and reads else 503)

    @routes.key(paths.OWNERS, "GET")
    def owners(self, request: IRequest, key: str) -> bytes:
        return _json(request, {"success": True, "key": key, "nodes": self.cluster.owners(key)})

    @routes.path("/cluster/ring", "GET")
    def ring(self, request: IRequest) -> bytes:
        """The ring's ownership in C{segments} equal slices, as runs (for the dashboard's circle)."""
        segments = _number_arg(request, b"segments", int)
        segments = ui.DEFAULT_SEGMENTS if segments is None else segments
        if not 1 <= segments <= ui.MAX_SEGMENTS:
            raise ClientError(f"segments must be from 1 to {ui.MAX_SEGMENTS}")
        runs = ui.ring_arcs(self.cluster.ring, segments)
        arcs = [{"start": start, "node": node} for start, node in runs]
        shares = ui.shares(runs, segments)
        return _json(request, {"success": True, "segments": segments, "arcs": arcs, "shares": shares})

    @routes.key(paths.CLUSTER_KEY, "GET")
    async def replicas(self, request: IRequest, key: str) -> bytes:
        """
        The version each owner holds of a key, and each fallback holding one (hinted writes),
        asked from the nodes at once; a node that cannot answer is listed with its error.
        Versions only, never values.
        """
        view = self.cluster.view()
        owners, fallbacks = view.placement(key)
        asked = [(node, "owner") for node in owners] + [(node, "fallback") for node in fallbacks]
        clients = self.coordinator.nodes
        answers = await DeferredList([clients(view.members[node]).read([key]) for node, _ in asked], consumeErrors=True)
        found = []
        for (node, role), (_, answer) in zip(asked, answers, strict=True):
            row: dict[str, Any] = {"node": node, "role": role, "version": None, "deleted": False, "error": None}
            if isinstance(answer, Failure):
                row["error"] = str(answer.value) or type(answer.value).__name__
            else:
                entry = answer.get(key)
                if entry is None and role == "fallback":
                    continue
                if entry is not None:
                    row["version"], row["deleted"] = entry[1], entry[0] is None
            found.append(row)
        return _json(request, {"success": True, "key": key, "replicas": found})

    @routes.path("/ui", "GET")
    def dashboard(self, request: IRequest) -> bytes:
        """The dashboard: one self-contained page that fetches the JSON above (it holds no data itself)."""
        body = ui.page()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"content-security-policy", ui.CONTENT_SECURITY_POLICY)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    @routes.path("/cluster/plan", "GET")
    async def plan(self, request: IRequest) -> bytes:
        """
        A dry run of C{?join=ID[:WEIGHT]} or C{?remove=ID}: what would move where; nothing
        changes. It builds a second ring, so it runs where the cluster builds rings (a thread).
        """
        ring, replicas = self.cluster.ring, self.cluster.replicas
        try:
            change = parse_change(_text_arg(request, b"join"), _text_arg(request, b"remove"), ring.nodes)
        except Invalid as e:
            raise ClientError(str(e)) from None
        if self._planning:
            # Each builds a second ring (5 s at 1,000 nodes): a burst must not fill the threads.
            raise Unavailable("another plan is being worked out; try again in a moment")
        self._planning = True
        try:
            moves = await self.cluster.run(lambda: plan(ring, change, replicas).to_json())
        finally:
            self._planning = False
        return _json(request, {"success": True, **moves})

    @routes.path("/cluster/hot", "GET")
    def hot_keys(self, request: IRequest) -> bytes:
        """The C{?n=N} (default 10, at most 100) most requested keys of the last minute."""
        n = _number_arg(request, b"n", int)
        if n is not None and not 1 <= n <= MAX_HOT:
            raise ClientError(f"n must be a whole number from 1 to {MAX_HOT}")
        hot = self.hot
        keys = [] if hot is None else [k.to_json() for k in hot.top(n or DEFAULT_HOT)]
        window = None if hot is None else hot.window
        return _json(request, {"success": True, "window": window, "keys": keys})

    def resource(self) -> Resource:
        return self.routes.resource(self, self.auth)
