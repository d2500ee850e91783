"""
Python clients of a kvd gateway: L{Client} (blocking, for scripts and notebooks) and
L{TwistedClient} (Deferreds and coroutines, on treq, for Twisted programs).

Both share one model: the requests they send (L{_Call}), the answers they give back (attrs
values: L{Entry}, L{Written}, L{Page}, L{Change}, ...) and the errors they raise (L{KvdError}
and its subclasses, named for what happened). Only the sending differs: urllib3's pool of
kept-alive connections for L{Client}, a treq C{HTTPClient} for L{TwistedClient}.
"""

from __future__ import annotations

import base64
import builtins
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from attrs import field, frozen

__all__ = [
    "DEFAULT_URL",
    "BadRequest",
    "BatchItem",
    "Change",
    "Changes",
    "Client",
    "ConnectionFailed",
    "Entry",
    "KvdError",
    "NotFound",
    "Page",
    "PreconditionFailed",
    "ServerError",
    "TooLarge",
    "TwistedClient",
    "Unauthorized",
    "Unavailable",
    "Written",
]

DEFAULT_URL = "http://127.0.0.1:8000"
#: Seconds a request may take, beyond any long poll it asks for.
DEFAULT_TIMEOUT = 10.0
#: How long each long poll of L{Client.watch} waits for a change (the server's most is 300).
WATCH_WAIT = 60.0
#: How many times L{Client.update} tries before giving up.
UPDATE_ATTEMPTS = 100

T = TypeVar("T")


# --- the answers ------------------------------------------------------------------------------


@frozen
class Entry:
    """A key's value and version; C{expires} (Unix seconds) when it was written with a TTL."""

    key: str
    value: str
    version: str
    expires: float | None = None
    #: C{"base64"} when C{value} is bytes in base64 (a value that is not UTF-8 text).
    encoding: str | None = None
    #: The content type stored with a typed value (bytes, or text PUT with a Content-Type).
    content_type: str | None = None

    @property
    def value_bytes(self) -> bytes:
        """The value's bytes: the base64 decoded for bytes, the text in UTF-8 otherwise."""
        if self.encoding == "base64":
            return base64.b64decode(self.value)
        return self.value.encode()

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"key": self.key, "value": self.value}
        if self.encoding is not None:
            body["encoding"] = self.encoding
        if self.content_type is not None:
            body["content_type"] = self.content_type
        body["version"] = self.version
        if self.expires is not None:
            body["expires"] = self.expires
        return body


@frozen
class Written:
    """
    The receipt of a write (a put, or a delete: C{value} None): its version, the replicas that
    made it durable, and C{hinted} (fallback -> owner) for copies held for an owner that was down.
    """

    key: str
    value: str | None
    version: str | None
    replicas: tuple[str, ...] = ()
    hinted: Mapping[str, str] = field(factory=dict)
    expires: float | None = None


@frozen
class Page:
    """One page of a listing: keys (or entries, with values) and where the next page starts (None: the last)."""

    keys: tuple[str, ...]
    entries: tuple[Entry, ...]
    next: str | None


@frozen
class Change:
    """A key written since a cursor: its newest value (None: deleted) and version."""

    key: str
    value: str | None
    version: str | None


@frozen
class Changes:
    """What L{Client.changes} answers: the changes, and the cursor to ask from next."""

    changes: tuple[Change, ...]
    next: str


@frozen
class BatchItem:
    """One key's answer in a batch: its own status and its single-key answer's fields."""

    key: str
    status: int
    body: Mapping[str, Any]

    @property
    def ok(self) -> bool:
        return self.status < 300


# --- the errors --------------------------------------------------------------------------------


class KvdError(Exception):
    """A request failed: C{status} is the HTTP status (None when there was no answer), C{body} the JSON answer."""

    def __init__(self, message: str, status: int | None = None, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body: Mapping[str, Any] = body or {}


class ConnectionFailed(KvdError):
    """The gateway could not be reached, or did not answer in time."""


class BadRequest(KvdError):
    """400: the request must change (a bad key, a value that is not UTF-8, a bad argument)."""


class Unauthorized(KvdError):
    """401: a token is needed, or the one sent is wrong."""


class NotFound(KvdError):
    """404: no such key (or no such endpoint)."""


class PreconditionFailed(KvdError):
    """412: a conditional write lost; C{current_version} is the key's version now (None: absent)."""

    @property
    def current_version(self) -> str | None:
        version = self.body.get("version")
        return version if isinstance(version, str) else None


class TooLarge(KvdError):
    """413: the value is larger than the gateway accepts."""


class ServerError(KvdError):
    """Any other failure the gateway answered (5xx, or an answer that is not kvd's JSON)."""


class Unavailable(ServerError):
    """
    503: too few replicas answered. The receipt says how far it got: C{answered} of C{needed},
    the C{replicas} that made a write durable, and C{partial} when the write may still become
    visible (some replica took it).
    """

    @property
    def answered(self) -> int | None:
        return _int_or_none(self.body.get("answered"))

    @property
    def needed(self) -> int | None:
        return _int_or_none(self.body.get("needed"))

    @property
    def replicas(self) -> tuple[str, ...]:
        return tuple(r for r in self.body.get("replicas") or () if isinstance(r, str))

    @property
    def hinted(self) -> dict[str, str]:
        hinted = self.body.get("hinted")
        return dict(hinted) if isinstance(hinted, dict) else {}

    @property
    def partial(self) -> bool:
        return self.body.get("partial") is True


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_ERRORS: dict[int, type[KvdError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    412: PreconditionFailed,
    413: TooLarge,
    503: Unavailable,
}


def error_for(status: int, raw: bytes, what: str) -> KvdError:
    """The exception for an answer of C{status} with the body C{raw}, to a request described by C{what}."""
    body = _loads(raw)
    message = body.get("error") if isinstance(body.get("error"), str) else None
    if message is None:
        message = f"HTTP {status}" + ("" if body else f": {raw[:200].decode('utf-8', 'replace')!r}")
    kind = _ERRORS.get(status, ServerError if status >= 500 or status < 400 else KvdError)
    return kind(f"{what}: {message}", status, body)


def _loads(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


# --- the requests and how their answers read, shared by both clients ---------------------------


@frozen
class _Call:
    """One HTTP request to the gateway, and what it is about (for error messages)."""

    method: str
    path: str
    what: str
    query: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    #: Extra seconds a long poll may take.
    wait: float = 0.0

    def target(self) -> str:
        return self.path + ("?" + urlencode(self.query) if self.query else "")


def key_path(key: str) -> str:
    """C{/kv/{key}} with the key percent-encoded as one path segment."""
    if not key:
        raise BadRequest("a key is 1 to 512 bytes of UTF-8")
    return "/kv/" + quote(key, safe="")


def _get(key: str) -> _Call:
    return _Call("GET", key_path(key), f"get {key!r}")


def _put(key: str, value: str | bytes, ttl: float | None, if_version: str | None, if_absent: bool) -> _Call:
    if if_version is not None and if_absent:
        raise ValueError("if_version and if_absent cannot both be given")
    headers: list[tuple[str, str]] = []
    if if_version is not None:
        headers.append(("If-Match", f'"{if_version}"'))
    if if_absent:
        headers.append(("If-None-Match", "*"))
    query = (("ttl", _number(ttl)),) if ttl is not None else ()
    body = value if isinstance(value, bytes) else value.encode()
    return _Call("PUT", key_path(key), f"put {key!r}", query, body, tuple(headers))


def _delete(key: str, if_version: str | None) -> _Call:
    headers = (("If-Match", f'"{if_version}"'),) if if_version is not None else ()
    return _Call("DELETE", key_path(key), f"delete {key!r}", headers=headers)


def _number(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else repr(float(n))


def _entry(body: Mapping[str, Any], key: str) -> Entry:
    value, version = body.get("value"), body.get("version")
    if not isinstance(value, str):
        raise ServerError(f"get {key!r}: the answer has no value", 200, body)
    expires, encoding, content_type = body.get("expires"), body.get("encoding"), body.get("content_type")
    return Entry(
        str(body.get("key", key)),
        value,
        version if isinstance(version, str) else "",
        float(expires) if isinstance(expires, (int, float)) else None,
        encoding if isinstance(encoding, str) else None,
        content_type if isinstance(content_type, str) else None,
    )


def _written(body: Mapping[str, Any], key: str) -> Written:
    value, version, hinted, expires = body.get("value"), body.get("version"), body.get("hinted"), body.get("expires")
    return Written(
        str(body.get("key", key)),
        value if isinstance(value, str) else None,
        version if isinstance(version, str) else None,
        tuple(r for r in body.get("replicas") or () if isinstance(r, str)),
        dict(hinted) if isinstance(hinted, dict) else {},
        float(expires) if isinstance(expires, (int, float)) else None,
    )


def _list(prefix: str, after: str | None, limit: int | None, values: bool) -> _Call:
    query = [("prefix", prefix)]
    if after is not None:
        query.append(("after", after))
    if limit is not None:
        query.append(("limit", str(limit)))
    if values:
        query.append(("values", "true"))
    return _Call("GET", "/kv", f"list {prefix!r}", tuple(query))


def _page(body: Mapping[str, Any]) -> Page:
    entries = tuple(_entry(item, str(item.get("key"))) for item in body.get("items") or () if isinstance(item, dict))
    keys = tuple(k for k in body.get("keys") or () if isinstance(k, str)) or tuple(e.key for e in entries)
    following = body.get("next")
    return Page(keys, entries, following if isinstance(following, str) else None)


def _watch(key: str, version: str | None, wait: float) -> _Call:
    query = (("wait", _number(wait)), ("version", version or ""))
    return _Call("GET", key_path(key), f"watch {key!r}", query, wait=wait)


def _changes(cursor: str | None, prefix: str | None, wait: float | None, limit: int | None) -> _Call:
    query = [(name, str(value)) for name, value in (("cursor", cursor), ("prefix", prefix)) if value is not None]
    if wait is not None:
        query.append(("wait", _number(wait)))
    if limit is not None:
        query.append(("limit", str(limit)))
    return _Call("GET", "/changes", "changes", tuple(query), wait=wait or 0.0)


def _parse_changes(body: Mapping[str, Any]) -> Changes:
    changes = tuple(
        Change(
            str(c.get("key")),
            c.get("value") if isinstance(c.get("value"), str) else None,
            c.get("version") if isinstance(c.get("version"), str) else None,
        )
        for c in body.get("changes") or ()
        if isinstance(c, dict)
    )
    return Changes(changes, str(body.get("next", "")))


def _batch(get: Iterable[str], put: Mapping[str, str], delete: Iterable[str]) -> _Call:
    body = json.dumps({"get": list(get), "put": dict(put), "delete": list(delete)}).encode()
    return _Call("POST", "/batch", "batch", body=body, headers=(("Content-Type", "application/json"),))


def _batch_items(body: Mapping[str, Any]) -> dict[str, BatchItem]:
    results = body.get("results")
    items = {}
    for key, answer in (results if isinstance(results, dict) else {}).items():
        if isinstance(answer, dict):
            status = answer.get("status")
            if not isinstance(status, int):
                status = 200 if answer.get("success") is True else 500
            items[key] = BatchItem(key, status, answer)
    return items


def _export(at: str | None) -> _Call:
    return _Call("GET", "/export", "export", (("at", at),) if at is not None else ())


def _import() -> _Call:
    return _Call("POST", "/import", "import", headers=(("Content-Type", "application/x-ndjson"),))


def _simple(path: str, what: str, query: tuple[tuple[str, str], ...] = ()) -> _Call:
    return _Call("GET", path, what, query)


def _plan(join: str | None, remove: str | None) -> _Call:
    query = tuple((name, value) for name, value in (("join", join), ("remove", remove)) if value is not None)
    return _simple("/cluster/plan", "plan", query)


def _lines(chunks: Iterable[bytes]) -> Iterator[Entry]:
    """NDJSON lines, however the chunks cut them, as entries."""
    rest = b""
    for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for line in lines:
            if line.strip():
                yield _entry(_loads(line), "?")
    if rest.strip():
        yield _entry(_loads(rest), "?")


def entry_line(entry: Entry) -> bytes:
    """An entry as one NDJSON line, as export gives and import takes."""
    return json.dumps(entry.to_json(), ensure_ascii=False).encode() + b"\n"


# --- the blocking client -----------------------------------------------------------------------


class Client:
    """
    A blocking client of a kvd gateway at C{url}, over kept-alive connections (urllib3).

    C{token} is sent as C{Authorization: Bearer}; C{ca_cert} is the CA file https
    gateways are checked against (default: the system's). Use it as a context manager,
    or call L{close}, to close its connections.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        ca_cert: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        import urllib3  # here, so that Twisted programs using only TwistedClient need not have it

        self.url = url.rstrip("/")
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._pool = urllib3.PoolManager(ca_certs=ca_cert, retries=False, maxsize=4)
        self._urllib3 = urllib3

    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, call: _Call, body: bytes | Iterable[bytes] | None = None, stream: bool = False) -> Any:
        headers = {**self._headers, **dict(call.headers)}
        payload = call.body if body is None else body
        try:
            response = self._pool.request(
                call.method,
                self.url + call.target(),
                body=payload,
                headers=headers,
                timeout=self._urllib3.Timeout(connect=self.timeout, read=self.timeout + call.wait),
                preload_content=not stream,
                chunked=payload is not None and not isinstance(payload, bytes),
                redirect=False,
            )
        except self._urllib3.exceptions.HTTPError as e:
            raise ConnectionFailed(f"{call.what}: cannot reach {self.url}: {_reason(e)}") from None
        if response.status >= 300:
            raw = response.read() if stream else response.data
            if stream:
                response.release_conn()
            raise error_for(response.status, raw, call.what)
        return response

    def _json(self, call: _Call) -> dict[str, Any]:
        response = self._open(call)
        body = _loads(response.data)
        if body.get("success") is not True:
            raise ServerError(f"{call.what}: the answer is not kvd's JSON", response.status, body)
        return body

    def get(self, key: str) -> Entry:
        """The key's value and version; L{NotFound} if it has none."""
        return _entry(self._json(_get(key)), key)

    def put(
        self,
        key: str,
        value: str | bytes,
        ttl: float | None = None,
        if_version: str | None = None,
        if_absent: bool = False,
    ) -> Written:
        """
        Write C{value}: expiring C{ttl} seconds later if given; only if the key's version is
        C{if_version}, or only if it is absent (C{if_absent}), else L{PreconditionFailed}.
        Bytes are sent as they are (the gateway keeps bytes that are not UTF-8 as bytes).
        """
        return _written(self._json(_put(key, value, ttl, if_version, if_absent)), key)

    def delete(self, key: str, if_version: str | None = None) -> Written:
        """Delete the key (L{NotFound} if absent); only if its version is C{if_version}, if given."""
        return _written(self._json(_delete(key, if_version)), key)

    def page(self, prefix: str = "", after: str | None = None, limit: int | None = None, values: bool = False) -> Page:
        """One page of the keys starting with C{prefix}, after the key C{after}."""
        return _page(self._json(_list(prefix, after, limit, values)))

    def list(self, prefix: str = "", limit: int | None = None) -> Iterator[str]:
        """Every key that starts with C{prefix}, in byte order, page after page."""
        after = None
        while True:
            page = self.page(prefix, after, limit)
            yield from page.keys
            if page.next is None:
                return
            after = page.next

    def items(self, prefix: str = "", limit: int | None = None) -> Iterator[Entry]:
        """Every entry whose key starts with C{prefix}, in byte order, page after page."""
        after = None
        while True:
            page = self.page(prefix, after, limit, values=True)
            yield from page.entries
            if page.next is None:
                return
            after = page.next

    def batch(
        self, get: Iterable[str] = (), put: Mapping[str, str] | None = None, delete: Iterable[str] = ()
    ) -> dict[str, BatchItem]:
        """Many keys in one round trip (not atomic): each key's own answer and status."""
        return _batch_items(self._json(_batch(get, put or {}, delete)))

    def watch(self, key: str, version: str | None = None, wait: float = WATCH_WAIT) -> Iterator[Entry | None]:
        """
        Each new state of the key, as it changes: its entry, or None once it is absent. With
        C{version} (or None: the current one is asked first), from that version on.
        """
        if version is None:
            current = self._current(key)
            version = None if current is None else current.version
        while True:
            try:
                entry: Entry | None = _entry(self._json(_watch(key, version, wait)), key)
            except NotFound:
                entry = None
            seen = None if entry is None else entry.version
            if seen != version:
                version = seen
                yield entry

    def _current(self, key: str) -> Entry | None:
        try:
            return self.get(key)
        except NotFound:
            return None

    def changes(
        self, cursor: str | None = None, prefix: str | None = None, wait: float | None = None, limit: int | None = None
    ) -> Changes:
        """The keys written since C{cursor} (None: from now on; "0": from the start); pass C{next} on."""
        return _parse_changes(self._json(_changes(cursor, prefix, wait, limit)))

    def update(self, key: str, fn: Callable[[str | None], str], attempts: int = UPDATE_ATTEMPTS) -> Written:
        """
        Write C{fn(current value or None)} conditionally on the version C{fn} saw, again and
        again until no other writer came in between (L{PreconditionFailed} after C{attempts}).
        """
        for _ in range(attempts - 1):
            current = self._current(key)
            try:
                return self._put_after(key, fn, current)
            except PreconditionFailed:
                continue
        return self._put_after(key, fn, self._current(key))

    def _put_after(self, key: str, fn: Callable[[str | None], str], current: Entry | None) -> Written:
        value = fn(None if current is None else current.value)
        if current is None:
            return self.put(key, value, if_absent=True)
        return self.put(key, value, if_version=current.version)

    def owners(self, key: str) -> builtins.list[str]:
        """The key's preference list, first owner first."""
        return [str(n) for n in self._json(_simple("/cluster/owners/" + quote(key, safe=""), "owners"))["nodes"]]

    def cluster(self) -> dict[str, Any]:
        """The gateway's /cluster answer."""
        return self._json(_simple("/cluster", "cluster"))

    def node(self) -> dict[str, Any]:
        """The /node answer (for a client whose url is a node's)."""
        return self._json(_simple("/node", "node"))

    def plan(self, join: str | None = None, remove: str | None = None) -> dict[str, Any]:
        """What C{join=ID[:WEIGHT]} or C{remove=ID} would move; nothing changes."""
        return self._json(_plan(join, remove))

    def hot(self, n: int = 10) -> dict[str, Any]:
        """The gateway's n most requested keys of the last minute."""
        return self._json(_simple("/cluster/hot", "hot", (("n", str(n)),)))

    def export(self, at: str | None = None) -> Iterator[Entry]:
        """Every key's newest entry (no later than HLC time C{at}), streamed."""
        response = self._open(_export(at), stream=True)
        try:
            yield from _lines(response.stream(64 * 1024))
        finally:
            response.release_conn()

    def import_entries(self, entries: Iterable[Entry]) -> dict[str, Any]:
        """Write every entry with its own version (newer data is kept), streamed."""
        return self.import_lines(entry_line(e) for e in entries)

    def import_lines(self, lines: Iterable[bytes]) -> dict[str, Any]:
        """Stream NDJSON lines, as export gives them, to POST /import."""
        call = _import()
        response = self._open(call, body=iter(lines))
        body = _loads(response.data)
        if body.get("success") is not True:
            raise ServerError("import: the answer is not kvd's JSON", response.status, body)
        return body


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    return str(reason or error)


# --- the Twisted client ------------------------------------------------------------------------


class TwistedClient:
    """
    The same client for Twisted programs: every method is a coroutine (wrap it in
    C{Deferred.fromCoroutine} for a Deferred); L{list} and L{watch} are async iterators.
    C{http} is a treq C{HTTPClient} (default: one on a pool of its own, closed by L{close}).
    """

    def __init__(
        self,
        reactor: Any,
        url: str = DEFAULT_URL,
        token: str | None = None,
        http: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        self.url = url.rstrip("/")
        self.timeout = timeout
        self._reactor = reactor
        self._headers = {"Authorization": [f"Bearer {token}"]} if token else {}
        self._pool = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor)
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.closeCachedConnections()

    async def _raw(self, call: _Call, body: bytes | None = None) -> tuple[int, bytes]:
        from twisted.internet.error import ConnectError, TimeoutError
        from twisted.web.client import ResponseFailed

        headers = {**self._headers, **{name: [value] for name, value in call.headers}}
        try:
            response = await self._http.request(
                call.method,
                self.url + call.target(),
                data=call.body if body is None else body,
                headers=headers,
                timeout=self.timeout + call.wait,
                reactor=self._reactor,
            )
            raw: bytes = await response.content()
        except (ConnectError, TimeoutError, ResponseFailed) as e:
            raise ConnectionFailed(f"{call.what}: cannot reach {self.url}: {e}") from None
        return response.code, raw

    async def _json(self, call: _Call, body: bytes | None = None) -> dict[str, Any]:
        status, raw = await self._raw(call, body)
        if status >= 300:
            raise error_for(status, raw, call.what)
        answer = _loads(raw)
        if answer.get("success") is not True:
            raise ServerError(f"{call.what}: the answer is not kvd's JSON", status, answer)
        return answer

    async def get(self, key: str) -> Entry:
        return _entry(await self._json(_get(key)), key)

    async def put(
        self,
        key: str,
        value: str | bytes,
        ttl: float | None = None,
        if_version: str | None = None,
        if_absent: bool = False,
    ) -> Written:
        return _written(await self._json(_put(key, value, ttl, if_version, if_absent)), key)

    async def delete(self, key: str, if_version: str | None = None) -> Written:
        return _written(await self._json(_delete(key, if_version)), key)

    async def page(
        self, prefix: str = "", after: str | None = None, limit: int | None = None, values: bool = False
    ) -> Page:
        return _page(await self._json(_list(prefix, after, limit, values)))

    async def list(self, prefix: str = "", limit: int | None = None) -> AsyncIterator[str]:
        after = None
        while True:
            page = await self.page(prefix, after, limit)
            for key in page.keys:
                yield key
            if page.next is None:
                return
            after = page.next

    async def batch(
        self, get: Iterable[str] = (), put: Mapping[str, str] | None = None, delete: Iterable[str] = ()
    ) -> dict[str, BatchItem]:
        return _batch_items(await self._json(_batch(get, put or {}, delete)))

    async def _current(self, key: str) -> Entry | None:
        try:
            return await self.get(key)
        except NotFound:
            return None

    async def watch(
        self, key: str, version: str | None = None, wait: float = WATCH_WAIT
    ) -> AsyncIterator[Entry | None]:
        if version is None:
            current = await self._current(key)
            version = None if current is None else current.version
        while True:
            try:
                entry: Entry | None = _entry(await self._json(_watch(key, version, wait)), key)
            except NotFound:
                entry = None
            seen = None if entry is None else entry.version
            if seen != version:
                version = seen
                yield entry

    async def changes(
        self, cursor: str | None = None, prefix: str | None = None, wait: float | None = None, limit: int | None = None
    ) -> Changes:
        return _parse_changes(await self._json(_changes(cursor, prefix, wait, limit)))

    async def update(
        self, key: str, fn: Callable[[str | None], str | Awaitable[str]], attempts: int = UPDATE_ATTEMPTS
    ) -> Written:
        """As L{Client.update}; C{fn} may be a coroutine function."""
        for attempt in range(attempts):
            current = await self._current(key)
            value = fn(None if current is None else current.value)
            if not isinstance(value, str):
                value = await value
            try:
                if current is None:
                    return await self.put(key, value, if_absent=True)
                return await self.put(key, value, if_version=current.version)
            except PreconditionFailed:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    async def owners(self, key: str) -> builtins.list[str]:
        body = await self._json(_simple("/cluster/owners/" + quote(key, safe=""), "owners"))
        return [str(n) for n in body["nodes"]]

    async def cluster(self) -> dict[str, Any]:
        return await self._json(_simple("/cluster", "cluster"))

    async def plan(self, join: str | None = None, remove: str | None = None) -> dict[str, Any]:
        return await self._json(_plan(join, remove))

    async def hot(self, n: int = 10) -> dict[str, Any]:
        return await self._json(_simple("/cluster/hot", "hot", (("n", str(n)),)))

    async def export(self, at: str | None = None) -> builtins.list[Entry]:
        """Every key's newest entry (no later than C{at}); gathered in memory, unlike L{Client.export}."""
        call = _export(at)
        status, raw = await self._raw(call)
        if status >= 300:
            raise error_for(status, raw, call.what)
        return list(_lines([raw]))

    async def import_entries(self, entries: Iterable[Entry]) -> dict[str, Any]:
        return await self._json(_import(), b"".join(entry_line(e) for e in entries))
