"""
The HTTP layer of every role: thin Klein handlers that parse, call the domain and render JSON.

One error table (L{_render_error}) maps domain errors to status codes; anything unexpected
is logged with its traceback and answered with a plain 500 JSON body, never the traceback.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote_to_bytes

from attrs import define
from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import BaseConverter

from kvd.keys import (
    DEFAULT_MAX_VALUE_BYTES,
    ClientError,
    NotFound,
    Unavailable,
    parse_key,
    parse_value,
)
from kvd.store import Store, StoreError

_log = Logger()
_KV_PREFIX = b"/kv/"


def _json(request: IRequest, obj: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    body = json.dumps(obj, ensure_ascii=False).encode()
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _key_of(request: IRequest) -> str:
    # The raw path, not Klein's decoded argument: a key may hold an encoded "/" (%2F).
    return parse_key(request.path[len(_KV_PREFIX) :])


def _render_error(request: IRequest, failure: Failure) -> bytes:
    """The error table: one place that turns a failure into a status and a JSON body."""
    error = failure.value
    body: dict[str, Any] = {"success": False}
    key = getattr(request, "kvd_key", None)
    if key is not None:
        body["key"] = key
    if isinstance(error, (ClientError, Unavailable)):
        status, body["error"] = error.status, str(error)
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


class _Utf8Paths(Resource):
    """
    Answers a path that is not UTF-8 with 400 JSON before Klein sees it (Klein would answer
    in plain text).
    """

    isLeaf = True

    def __init__(self, app: Resource) -> None:
        super().__init__()
        self._app = app

    def render(self, request: IRequest) -> Any:
        try:
            unquote_to_bytes(request.path).decode("utf-8")
        except UnicodeDecodeError:
            _log.info("{path}: 400 the URL path is not valid UTF-8", path=_text(request.path))
            return _json(request, {"success": False, "error": "the URL path is not valid UTF-8"}, 400)
        return self._app.render(request)


def api_resource(app: Klein) -> Resource:
    """The resource to serve for a role's Klein app."""
    return _Utf8Paths(app.resource())


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
        return _json(request, {"success": True, "status": "ok"})


@define
class NodeAPI:
    """A storage node's HTTP API: the client API over a L{Store}, plus C{/node}."""

    node_id: str
    store: Store
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES

    app = Klein()
    _common_routes(app)

    @app.route("/kv/", methods=["GET", "PUT", "DELETE"])
    def empty_key(self, request: IRequest) -> bytes:
        return _key_of(request)  # type: ignore[return-value]  # always raises BadKey

    @app.route("/kv/<rest:_>", methods=["GET"])
    def get(self, request: IRequest, _: str) -> bytes:
        # Not async: a read touches memory only, and a coroutine per GET is measurable.
        request.kvd_key = key = _key_of(request)  # type: ignore[attr-defined]
        value = self.store.get(key)
        if value is None:
            raise NotFound("no such key")
        return _json(request, {"success": True, "key": key, "value": value})

    @app.route("/kv/<rest:_>", methods=["PUT"])
    async def put(self, request: IRequest, _: str) -> bytes:
        request.kvd_key = key = _key_of(request)  # type: ignore[attr-defined]
        value = parse_value(request.content.read(), self.max_value_bytes)
        await self.store.put(key, value)
        return _json(request, {"success": True, "key": key, "value": value})

    @app.route("/kv/<rest:_>", methods=["DELETE"])
    async def delete(self, request: IRequest, _: str) -> bytes:
        request.kvd_key = key = _key_of(request)  # type: ignore[attr-defined]
        deleted = self.store.delete(key)
        if deleted is None:
            raise NotFound("no such key")
        await deleted
        return _json(request, {"success": True, "key": key})

    @app.route("/node", methods=["GET"])
    def node(self, request: IRequest) -> bytes:
        return _json(request, {"success": True, "id": self.node_id, "keys": len(self.store)})

    def resource(self) -> Resource:
        return api_resource(self.app)
