"""
A small in-memory stand-in for a gateway that speaks DESIGN.md's JSON for the whole client
API, including the parts a real gateway of this branch may not serve yet (listing, batch,
TTL, conditional writes, watch, changes, export and import), so the clients and the ``kvd``
command can be tested against every form they send.

L{FakeGateway.handle} is one pure function of a request; L{FakeGateway.resource} serves it to
Twisted (for C{StubTreq}, no sockets) and L{serve_in_thread} over a real loopback socket (for
the blocking client and the command).
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.web.resource import Resource

__all__ = ["FakeGateway", "serve_in_thread"]

Answer = tuple[int, dict[str, str], bytes]


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


class FakeGateway:
    """Keys in a dict, versions from a counter; C{token} (if set) is required on every request."""

    def __init__(self, token: str | None = None) -> None:
        self.data: dict[str, tuple[str, str, float | None]] = {}
        #: The keys whose value is bytes (not UTF-8), held in C{data} in base64 as answers carry them.
        self.bytes_keys: set[str] = set()
        self.counter = 0
        self.log: list[tuple[str, str]] = []
        self.changes: list[tuple[int, str]] = []
        self.token = token
        #: When set, every /kv/ write answers this status (503 with a receipt, say).
        self.fail_writes: int | None = None
        #: Writes that go in behind a conditional writer's back: key -> how many are left.
        self.interfere: dict[str, int] = {}
        #: What /cluster lists (a gateway before the per-node figures: no keys, requests or repair).
        self.nodes: list[dict[str, object]] = [{"id": "a", "url": "http://127.0.0.1:9", "weight": 1}]
        self.lock = threading.Lock()

    def _version(self) -> str:
        self.counter += 1
        return f"{self.counter:018d}.fake"

    def _write(self, key: str, value: str | None, ttl: float | None = None) -> str:
        version = self._version()
        if value is None:
            self.data.pop(key, None)
            self.bytes_keys.discard(key)
        else:
            self.data[key] = (value, version, ttl)
        self.changes.append((self.counter, key))
        return version

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        with self.lock:
            return self._handle(method, target, {k.lower(): v for k, v in headers.items()}, body)

    def _handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        parts = urlsplit(target)
        path, query = parts.path, {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        self.log.append((method, target))
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return _json(401, {"success": False, "error": "this needs a valid Authorization: Bearer token"})
        if path.startswith("/kv/"):
            return self._key(method, unquote(path[4:]), query, headers, body)
        if path == "/kv" and method == "GET":
            return self._list(query)
        if path == "/batch" and method == "POST":
            return self._batch(json.loads(body))
        if path == "/changes" and method == "GET":
            cursor = int(query.get("cursor") or self.counter)
            keys = sorted({k for n, k in self.changes if n > cursor})
            found = [{"key": k, "value": self.data.get(k, (None, None, None))[0], "version": None} for k in keys]
            return _json(200, {"success": True, "changes": found, "next": str(self.counter)})
        if path == "/export" and method == "GET":
            lines = b"".join(
                json.dumps({"key": k, "value": v, "version": ver}).encode() + b"\n"
                for k, (v, ver, _) in sorted(self.data.items())
            )
            return 200, {"Content-Type": "application/x-ndjson"}, lines
        if path == "/import" and method == "POST":
            imported = 0
            for line in body.splitlines():
                if line.strip():
                    item = json.loads(line)
                    self.data[item["key"]] = (item["value"], item["version"], None)
                    imported += 1
            return _json(200, {"success": True, "imported": imported})
        if path == "/cluster":
            return _json(200, {"success": True, "nodes": self.nodes, "replicas": 1, "vnodes": 8, "repair": None})
        if path.startswith("/cluster/owners/"):
            return _json(200, {"success": True, "key": unquote(path[16:]), "nodes": ["a"]})
        if path == "/cluster/plan":
            if ("join" in query) == ("remove" in query):
                return _json(400, {"success": False, "error": "give exactly one of join or remove"})
            move = {"from": "a", "to": query.get("join", "a").split(":")[0], "share": 0.5}
            return _json(200, {"success": True, "moves": [move], "moved_share": 0.5})
        if path == "/cluster/hot":
            hot: list[dict[str, object]] = [{"key": "k", "requests": 10, "rate": 0.5}][: int(query.get("n", "10"))]
            return _json(200, {"success": True, "window": 60, "keys": hot})
        return _json(404, {"success": False, "error": "no such endpoint"})

    def _key(self, method: str, key: str, query: dict[str, str], headers: dict[str, str], body: bytes) -> Answer:
        current = self.data.get(key)
        if method == "GET":
            if "wait" in query and (current[1] if current else "") == query.get("version", ""):
                # The real gateway would hold the poll; this one lets a write in first.
                if key in self.interfere:
                    self._write(key, "changed-by-someone")
                    current = self.data.get(key)
            if current is None:
                return _json(404, {"success": False, "key": key, "error": "no such key"})
            answer: dict[str, Any] = {"success": True, "key": key, "value": current[0], "version": current[1]}
            if key in self.bytes_keys:
                answer["encoding"] = "base64"
            return _json(200, answer, {"ETag": f'"{current[1]}"'})
        if method not in ("PUT", "DELETE"):
            return _json(405, {"success": False, "error": "method not allowed"}, {"Allow": "GET, PUT, DELETE"})
        if self.interfere.get(key):
            self.interfere[key] -= 1
            self._write(key, "someone else's")
            current = self.data.get(key)
        expected = headers.get("if-match")
        if (expected is not None and (current is None or expected != f'"{current[1]}"')) or (
            headers.get("if-none-match") == "*" and current is not None
        ):
            version = None if current is None else current[1]
            return _json(412, {"success": False, "key": key, "version": version, "error": "precondition failed"})
        if self.fail_writes is not None:
            receipt = {"answered": 1, "needed": 2, "replicas": ["a"], "hinted": {}, "partial": True}
            return _json(self.fail_writes, {"success": False, "key": key, "error": "quorum not reached", **receipt})
        if method == "DELETE":
            if current is None:
                return _json(404, {"success": False, "key": key, "error": "no such key"})
            version = self._write(key, None)
            return _json(200, {"success": True, "key": key, "version": version, "replicas": ["a"]})
        try:
            value = body.decode("utf-8")
            self.bytes_keys.discard(key)
        except UnicodeDecodeError:  # kept as bytes, answered in base64, as a gateway does
            value = base64.b64encode(body).decode("ascii")
            self.bytes_keys.add(key)
        ttl = float(query["ttl"]) if "ttl" in query else None
        version = self._write(key, value, ttl)
        answer = {"success": True, "key": key, "value": value, "version": version, "replicas": ["a"], "hinted": {}}
        if key in self.bytes_keys:
            answer["encoding"] = "base64"
        if ttl is not None:
            answer["expires"] = 1e9 + ttl
        return _json(200, answer, {"ETag": f'"{version}"'})

    def _list(self, query: dict[str, str]) -> Answer:
        prefix, after = query.get("prefix", ""), query.get("after")
        limit = min(int(query.get("limit", "100")), 1000)
        keys = sorted(k for k in self.data if k.startswith(prefix) and (after is None or k > after))
        page, more = keys[:limit], len(keys) > limit
        body: dict[str, Any] = {"success": True, "next": page[-1] if more else None}
        if query.get("values") == "true":
            body["items"] = [{"key": k, "value": self.data[k][0], "version": self.data[k][1]} for k in page]
        else:
            body["keys"] = page
        return _json(200, body)

    def _batch(self, request: dict[str, Any]) -> Answer:
        results: dict[str, Any] = {}
        for key in request.get("get", []):
            found = self.data.get(key)
            results[key] = (
                {"success": True, "status": 200, "key": key, "value": found[0], "version": found[1]}
                if found
                else {"success": False, "status": 404, "key": key, "error": "no such key"}
            )
        for key, value in request.get("put", {}).items():
            results[key] = {"success": True, "status": 200, "key": key, "version": self._write(key, value)}
        for key in request.get("delete", []):
            results[key] = {"success": True, "status": 200, "key": key, "version": self._write(key, None)}
        return _json(200, {"success": True, "results": results})

    def resource(self) -> Resource:
        return _Resource(self)


class _Resource(Resource):
    isLeaf = True

    def __init__(self, gateway: FakeGateway) -> None:
        super().__init__()
        self._gateway = gateway

    def render(self, request: Any) -> bytes:
        headers = {k.decode(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        status, out, body = self._gateway.handle(
            request.method.decode(), request.uri.decode(), headers, request.content.read()
        )
        request.setResponseCode(status)
        for name, value in out.items():
            request.setHeader(name.encode(), value.encode())
        return body


@contextmanager
def serve_in_thread(gateway: FakeGateway) -> Iterator[str]:
    """Serve C{gateway} on a free 127.0.0.1 port in a thread; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self) -> None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()
                    if size == 0:
                        break
                    body += chunk
            else:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, headers, out = gateway.handle(self.command, self.path, dict(self.headers.items()), body)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_PUT = do_DELETE = do_POST = _any

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
