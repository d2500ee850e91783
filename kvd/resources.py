"""
The HTTP layer of every role: thin Klein handlers that parse, call the domain and render JSON.

One error table (L{_render_error}) maps domain errors to status codes; anything unexpected
is logged with its traceback and answered with a plain 500 JSON body, never the traceback.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import define, field
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import BaseConverter

from kvd.auth import Auth
from kvd.gateway import Cluster
from kvd.keys import (
    DEFAULT_MAX_VALUE_BYTES,
    ClientError,
    NotFound,
    Unavailable,
    check_key,
    parse_key,
    parse_value,
)
from kvd.metrics import CONTENT_TYPE, Metrics
from kvd.registry import InvalidRegistration, Registry, StaleIncarnation
from kvd.replication import QuorumFailed, Repairer, Replicator
from kvd.store import BUCKETS, Entry, Store, StoreError
from kvd.validate import Invalid, number
from kvd.versions import is_version
from kvd.web import json_body

_log = Logger()
_KV_PREFIX = b"/kv/"
_OWNERS_PREFIX = b"/cluster/owners/"
#: The longest long poll the registry holds open.
MAX_WAIT = 300.0
DEFAULT_WAIT = 30.0


def _json(request: IRequest, obj: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    body = json_body(obj)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _key_of(request: IRequest, prefix: bytes = _KV_PREFIX) -> str:
    """The key in a request's path, remembered for error answers."""
    # The raw path, not Klein's decoded argument: a key may hold an encoded "/" (%2F).
    key = parse_key(request.path[len(prefix) :])
    request.kvd_key = key  # type: ignore[attr-defined]
    return key


def _batch(request: IRequest, field: str) -> list[Any]:
    """The list under C{field} of a JSON request body."""
    try:
        body = json.loads(request.content.read())
    except (ValueError, RecursionError):
        raise ClientError("the body must be JSON") from None
    items = body.get(field) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise ClientError(f'the body must be {{"{field}": [...]}}')
    return items


def _versioned(request: IRequest, body: dict[str, Any]) -> bytes:
    """A key's answer, with its version as the ETag too."""
    request.setHeader(b"etag", b'"%s"' % body["version"].encode())
    return _json(request, body)


def _number_arg(request: IRequest, name: bytes, kind: type[float] | type[int]) -> Any:
    values = request.args.get(name)
    if not values:
        return None
    try:
        return number(values[0].decode("utf-8", "replace"), kind, 0, name.decode())
    except Invalid as e:
        raise ClientError(str(e)) from None


def _render_error(request: IRequest, failure: Failure) -> bytes:
    """The error table: one place that turns a failure into a status and a JSON body."""
    error = failure.value
    body: dict[str, Any] = {"success": False}
    key = getattr(request, "kvd_key", None)
    if key is not None:
        body["key"] = key
    if isinstance(error, QuorumFailed):
        status, body["error"], body["answered"], body["needed"] = 503, str(error), error.answered, error.needed
    elif isinstance(error, (ClientError, Unavailable)):
        status, body["error"] = error.status, str(error)
    elif isinstance(error, InvalidRegistration):
        status, body["error"] = 400, str(error)
    elif isinstance(error, StaleIncarnation):
        status, body["error"] = 409, str(error)
    elif isinstance(error, StoreError):
        status, body["error"] = 503, str(error)
    elif isinstance(error, RouteNotFound):
        status, body["error"] = 404, "no such endpoint"
    elif isinstance(error, MethodNotAllowed):
        allowed = ", ".join(error.valid_methods or [])
        request.setHeader(b"allow", allowed.encode())
        status, body["error"] = 405, f"method not allowed here; allowed: {allowed}"
    else:
        _log.failure(
            "unexpected error answering {method} {path}",
            failure,
            method=_text(request.method),
            path=_text(request.path),
        )
        return _json(request, {"success": False, "error": "internal error; see the server log"}, 500)
    _log.info(
        "{method} {path}: {status} {error}",
        method=_text(request.method),
        path=_text(request.path),
        status=status,
        error=body["error"],
    )
    return _json(request, body, status)


#: A key-value handler: C{(request, key)} to a body, or a Deferred of one.
KVHandler = Callable[[IRequest, str], "bytes | Deferred[bytes]"]


class _FrontDoor(Resource):
    """
    What a role's Site serves: C{/kv/{key}} requests go straight to their handlers, and
    everything else to the role's Klein app.

    Klein binds a werkzeug URL map (with a getsockname call), matches it and runs a chain
    of Deferreds for every request; on the key-value path that was half of a node's time.
    The handlers are the same methods Klein routes to, and errors go through the same
    error table. A path that is not UTF-8 gets 400 JSON here (Klein would answer in plain
    text).
    """

    isLeaf = True

    def __init__(
        self,
        app: Resource,
        kv: Mapping[bytes, KVHandler],
        auth: Auth,
        exact: Mapping[tuple[bytes, bytes], KVHandler] | None = None,
    ) -> None:
        super().__init__()
        self._app = app
        self._kv = kv
        self._auth = auth
        self._exact = exact or {}

    def render(self, request: IRequest) -> Any:
        path = request.path
        if self._auth.required and not self._auth.allows(path, request.getHeader(b"authorization")):
            _log.info("{method} {path}: 401 no valid bearer token", method=_text(request.method), path=_text(path))
            request.setHeader(b"www-authenticate", b'Bearer realm="kvd"')
            return _json(request, {"success": False, "error": "this needs a valid Authorization: Bearer token"}, 401)
        if path.startswith(_KV_PREFIX) and len(path) > len(_KV_PREFIX):
            handler = self._kv.get(request.method)
            if handler is not None:
                return self._render_kv(request, handler)
        exact = self._exact.get((request.method, path))
        if exact is not None:
            return self._render_kv(request, exact)
        try:
            unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            _log.info("{path}: 400 the URL path is not valid UTF-8", path=_text(path))
            return _json(request, {"success": False, "error": "the URL path is not valid UTF-8"}, 400)
        return self._app.render(request)

    def _render_kv(self, request: Any, handler: KVHandler) -> Any:
        try:
            result = handler(request, "")
        except Exception:
            return _render_error(request, Failure())
        if not isinstance(result, Deferred):
            return result
        result.addErrback(_render_failure, request)
        result.addCallback(_write_and_finish, request)
        request.notifyFinish().addErrback(lambda _: result.cancel())
        return NOT_DONE_YET


def _render_failure(failure: Failure, request: Any) -> bytes | None:
    if failure.check(CancelledError) and request._disconnected:
        return None  # the client went away; a write it started still completes
    return _render_error(request, failure)


def _write_and_finish(body: bytes | None, request: Any) -> None:
    if body is not None and not request.finished and not request._disconnected:
        request.write(body)
        request.finish()


def api_resource(
    app: Klein,
    auth: Auth,
    kv: Mapping[bytes, KVHandler] | None = None,
    exact: Mapping[tuple[bytes, bytes], KVHandler] | None = None,
) -> Resource:
    """The resource to serve for a role's Klein app, its key-value handlers by method, and hot exact routes."""
    return _FrontDoor(app.resource(), kv or {}, auth, exact)


class _Rest(BaseConverter):
    """The rest of the path, whatever it holds (werkzeug's own "path" stops at a newline)."""

    regex = r"[\s\S]+"
    part_isolating = False


def _common_routes(app: Klein) -> None:
    """Routes and error handling every role's app shares."""
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.url_map.converters["rest"] = _Rest

    @app.handle_errors(Exception)
    def error(self: Any, request: IRequest, failure: Failure) -> bytes:
        return _render_error(request, failure)

    @app.route("/healthz", methods=["GET"])
    def healthz(self: Any, request: IRequest) -> bytes:
        problem = self.problem() if hasattr(self, "problem") else None
        if problem is not None:
            return _json(request, {"success": False, "status": "failing", "error": problem}, 503)
        return _json(request, {"success": True, "status": "ok"})

    @app.route("/metrics", methods=["GET"])
    def metrics(self: Any, request: IRequest) -> bytes:
        body: bytes = self.metrics.render()
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


@define
class NodeAPI:
    """A storage node's HTTP API: the client API over a L{Store}, plus C{/node}."""

    node_id: str
    store: Store
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    metrics: Metrics = field(factory=Metrics)
    auth: Auth = field(factory=Auth)
    #: The last repair sweep's report of what it moved for this node, if any.
    rebalance: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        store = self.store
        self.metrics.gauges(
            ("kvd_keys", "Live keys held (tombstones not counted).", lambda: len(store)),
            ("kvd_journal_bytes", "Size of the journal since the last snapshot.", lambda: store.journal_bytes),
            ("kvd_snapshot_bytes", "Size of the last snapshot.", lambda: store.snapshot_bytes),
        )
        fsync = self.metrics.histogram("kvd_fsync_seconds", "Time of one group commit: journal write and fsync.")
        batch = self.metrics.histogram(
            "kvd_group_commit_writes", "Writes made durable by one group commit.", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )

        def observe(seconds: float, writes: int) -> None:
            fsync.observe(seconds)
            batch.observe(writes)

        store.observe_commit = observe

    app = Klein()
    _common_routes(app)

    @app.route("/kv/", methods=["GET", "PUT", "DELETE"])
    def empty_key(self, request: IRequest) -> bytes:
        return _key_of(request)  # type: ignore[return-value]  # always raises BadKey

    @app.route("/kv/<rest:_>", methods=["GET"])
    def get(self, request: IRequest, _: str) -> bytes:
        # Not async: a read touches memory only, and a coroutine per GET is measurable.
        key = _key_of(request)
        entry = self.store.entry(key)
        if entry is None or entry[0] is None:
            raise NotFound("no such key")
        return _versioned(request, {"success": True, "key": key, "value": entry[0], "version": entry[1]})

    @app.route("/kv/<rest:_>", methods=["PUT"])
    async def put(self, request: IRequest, _: str) -> bytes:
        key = _key_of(request)
        value = parse_value(request.content.read(), self.max_value_bytes)
        version = await self.store.put(key, value)
        return _versioned(request, {"success": True, "key": key, "value": value, "version": version})

    @app.route("/kv/<rest:_>", methods=["DELETE"])
    async def delete(self, request: IRequest, _: str) -> bytes:
        key = _key_of(request)
        deleted = self.store.delete(key)
        if deleted is None:
            raise NotFound("no such key")
        await deleted
        return _json(request, {"success": True, "key": key})

    # The internal API: what gateways use to replicate, read and repair. Batches, so one
    # request carries many keys.

    @app.route("/internal/apply", methods=["POST"])
    async def internal_apply(self, request: IRequest) -> bytes:
        """Apply [key, value or null, version] items; answer once all are durable, with which were live before."""
        items = _batch(request, "items")
        writes, live = [], []
        for item in items:
            if not (isinstance(item, list) and len(item) == 3 and (item[1] is None or isinstance(item[1], str))):
                raise ClientError("each item is [key, value or null, version]")
            key, value, version = check_key(item[0]), item[1], item[2]
            if not is_version(version):
                raise ClientError(f"not a version: {version!r}")
            live.append(self.store.get(key) is not None)
            written = self.store.apply(key, value, version)
            if written is not None:
                writes.append(written)
        for written in writes:
            await written
        return _json(request, {"success": True, "applied": len(writes), "live": live})

    @app.route("/internal/read", methods=["POST"])
    def internal_read(self, request: IRequest) -> bytes:
        """The entries ([value or null, version]) of the given keys; unknown keys are left out."""
        found = {}
        for key in _batch(request, "keys"):
            entry = self.store.entry(check_key(key))
            if entry is not None:
                found[key] = list(entry)
        return _json(request, {"success": True, "entries": found})

    @app.route("/internal/digests", methods=["GET"])
    def internal_digests(self, request: IRequest) -> bytes:
        return _json(request, {"success": True, "digests": [f"{d:016x}" for d in self.store.digests()]})

    @app.route("/internal/versions", methods=["POST"])
    def internal_versions(self, request: IRequest) -> bytes:
        """key -> version of every key (tombstones too) in the given key ranges."""
        buckets = _batch(request, "buckets")
        if not all(isinstance(b, int) and 0 <= b < BUCKETS for b in buckets):
            raise ClientError(f"buckets are whole numbers from 0 to {BUCKETS - 1}")
        versions, tombstones = self.store.versions_in(set(buckets))
        return _json(request, {"success": True, "versions": versions, "tombstones": tombstones})

    @app.route("/internal/drop", methods=["POST"])
    async def internal_drop(self, request: IRequest) -> bytes:
        """Forget [key, version] items this node no longer needs (only where the version still matches)."""
        writes = []
        for item in _batch(request, "items"):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], str)):
                raise ClientError("each item is [key, version]")
            written = self.store.drop(check_key(item[0]), item[1])
            if written is not None:
                writes.append(written)
        for written in writes:
            await written
        return _json(request, {"success": True, "dropped": len(writes)})

    @app.route("/internal/progress", methods=["POST"])
    def internal_progress(self, request: IRequest) -> bytes:
        """A repair sweep's report of what it moved for this node; shown in GET /node."""
        try:
            report = json.loads(request.content.read())
        except (ValueError, RecursionError):
            raise ClientError("the body must be JSON") from None
        fields = {"keys_to_send": int, "sent": int, "dropped": int}
        if not isinstance(report, dict) or not all(isinstance(report.get(f), t) for f, t in fields.items()):
            raise ClientError("a progress report has keys_to_send, sent, dropped and last_error")
        error = report.get("last_error")
        self.rebalance = {**{f: report[f] for f in fields}, "last_error": error if isinstance(error, str) else None}
        return _json(request, {"success": True})

    def problem(self) -> str | None:
        """Why this node cannot serve writes, if it cannot (for /healthz)."""
        failed = self.store.failed
        return None if failed is None else str(failed)

    @app.route("/node", methods=["GET"])
    def node(self, request: IRequest) -> bytes:
        body: dict[str, Any] = {"success": True, "id": self.node_id, "keys": len(self.store)}
        if self.rebalance is not None:
            body["rebalance"] = self.rebalance
        return _json(request, body)

    def resource(self) -> Resource:
        return api_resource(
            self.app,
            self.auth,
            {
                b"GET": self.get,
                b"PUT": lambda request, _: Deferred.fromCoroutine(self.put(request, _)),
                b"DELETE": lambda request, _: Deferred.fromCoroutine(self.delete(request, _)),
            },
            {
                (b"POST", b"/internal/apply"): lambda request, _: Deferred.fromCoroutine(self.internal_apply(request)),
                (b"POST", b"/internal/read"): lambda request, _: self.internal_read(request),
            },
        )


@define
class RegistryAPI:
    """The service registry's HTTP API over a L{Registry}; C{clock} gives the time and times long polls."""

    registry: Registry
    clock: IReactorTime
    metrics: Metrics = field(factory=Metrics)
    auth: Auth = field(factory=Auth)
    #: Tells watchers this is a new registry process even when its index matches an old one.
    epoch: str = field(factory=lambda: secrets.token_hex(8))

    def __attrs_post_init__(self) -> None:
        registry = self.registry
        self.metrics.gauges(
            ("kvd_registry_leases", "Members holding a live lease.", lambda: len(registry.members())),
            ("kvd_registry_index", "The registry's change index.", lambda: registry.index),
            ("kvd_registry_long_polls", "Long polls waiting for a change.", lambda: registry.waiting),
        )

    app = Klein()
    _common_routes(app)

    @app.route("/registry/nodes", methods=["GET"])
    async def nodes(self, request: IRequest) -> bytes:
        index = _number_arg(request, b"index", int)
        wait = _number_arg(request, b"wait", float)
        self.registry.expire(self.clock.seconds())
        if index is not None:
            waiting = self.registry.wait_for_change(index)
            waiting.addTimeout(min(DEFAULT_WAIT if wait is None else wait, MAX_WAIT), self.clock)
            try:
                await waiting
            except TimeoutError:
                pass  # nothing changed: answer with the same index
        return _json(
            request, {"success": True, **self.registry.snapshot(), "ttl": self.registry.ttl, "epoch": self.epoch}
        )

    @app.route("/registry/nodes/<rest:node_id>", methods=["PUT"])
    def register(self, request: IRequest, node_id: str) -> bytes:
        try:
            body = json.loads(request.content.read())
        except (ValueError, RecursionError):  # nesting deep enough to exhaust the parser, too
            raise ClientError('the body must be JSON: {"url": URL, "weight": 1}') from None
        self.registry.register(node_id, body, self.clock.seconds())
        return _json(request, {"success": True, "ttl": self.registry.ttl})

    @app.route("/registry/nodes/<rest:node_id>", methods=["DELETE"])
    def leave(self, request: IRequest, node_id: str) -> bytes:
        incarnation = _number_arg(request, b"incarnation", int)
        if not self.registry.leave(node_id, self.clock.seconds(), incarnation):
            raise NotFound(f"no registered node {node_id!r}")
        return _json(request, {"success": True, "id": node_id})

    def resource(self) -> Resource:
        return api_resource(self.app, self.auth)


@define
class GatewayAPI:
    """
    The client API in front of the cluster: each write goes to the key's N replicas and is
    answered after W; each read asks R and answers the newest (see L{kvd.replication}).
    Plus C{/cluster}, with the repair sweep's progress.
    """

    cluster: Cluster
    replicator: Replicator
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    metrics: Metrics = field(factory=Metrics)
    auth: Auth = field(factory=Auth)
    repairer: Repairer | None = None

    def __attrs_post_init__(self) -> None:
        cluster, repairer = self.cluster, self.repairer
        self.metrics.gauges(("kvd_ring_members", "Nodes on the gateway's ring.", lambda: len(cluster.members)))
        if repairer is not None:
            progress = repairer.progress
            self.metrics.gauges(
                ("kvd_repair_backlog", "Keys the last repair sweep still had to send.", lambda: progress.keys_to_send),
                ("kvd_repair_sent", "Keys repair sweeps have sent to their owners.", lambda: progress.sent),
                ("kvd_repair_dropped", "Keys dropped from nodes that no longer own them.", lambda: progress.dropped),
            )

    app = Klein()
    _common_routes(app)

    @app.route("/kv/", methods=["GET", "PUT", "DELETE"])
    def empty_key(self, request: IRequest) -> bytes:
        return _key_of(request)  # type: ignore[return-value]  # always raises BadKey

    @app.route("/kv/<rest:_>", methods=["GET", "PUT", "DELETE"])
    async def kv(self, request: IRequest, _: str) -> bytes:
        key = _key_of(request)
        method = request.method
        if method == b"PUT":
            value = parse_value(request.content.read(), self.max_value_bytes)
            version, _live = await self.replicator.write(key, value)
            return _versioned(request, {"success": True, "key": key, "value": value, "version": version})
        if method == b"DELETE":
            version, was_live = await self.replicator.write(key, None)
            if not was_live:
                raise NotFound("no such key")
            return _versioned(request, {"success": True, "key": key, "version": version})
        return await self.read_kv(request, _)

    def read_kv(self, request: IRequest, _: str) -> Deferred[bytes]:
        """GET (and HEAD): without a coroutine, as this is the gateway's busiest path."""
        key = _key_of(request)

        def render(entry: Entry | None) -> bytes:
            if entry is None or entry[0] is None:
                raise NotFound("no such key")
            return _versioned(request, {"success": True, "key": key, "value": entry[0], "version": entry[1]})

        return self.replicator.read(key).addCallback(render)

    @app.route("/cluster", methods=["GET"])
    def describe(self, request: IRequest) -> bytes:
        return _json(
            request,
            {
                "success": True,
                "nodes": [m.to_json() for m in self.cluster.sorted()],
                "replicas": self.cluster.replicas,
                "vnodes": self.cluster.vnodes,
                "write_quorum": self.replicator.write_quorum,
                "read_quorum": self.replicator.read_quorum,
                "repair": None if self.repairer is None else self.repairer.progress.to_json(),
            },
        )

    def resource(self) -> Resource:
        forward: KVHandler = lambda request, _: Deferred.fromCoroutine(self.kv(request, _))  # noqa: E731
        return api_resource(self.app, self.auth, {b"GET": self.read_kv, b"PUT": forward, b"DELETE": forward})

    @app.route("/cluster/owners/", methods=["GET"])
    def owners_of_nothing(self, request: IRequest) -> bytes:
        return _key_of(request, _OWNERS_PREFIX)  # type: ignore[return-value]  # always raises BadKey

    @app.route("/cluster/owners/<rest:_>", methods=["GET"])
    def owners(self, request: IRequest, _: str) -> bytes:
        key = _key_of(request, _OWNERS_PREFIX)
        return _json(request, {"success": True, "key": key, "nodes": self.cluster.owners(key)})
