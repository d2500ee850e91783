"""A bare twisted.web key-value server: the baseline kvd's node HTTP layer is measured against.

Usage: python bench/bare_server.py --port PORT

One isLeaf Resource over a dict, on a Site whose access log is off: GET /kv/<key> answers
the same JSON bytes as a kvd node ({"success": true, "key": K, "value": V}, content-type
application/json, Content-Length set); PUT /kv/<key> stores the body (in memory only, no
journal, no fsync) and answers the same JSON. GET /healthz answers as a node does. No
validation, no routing framework: the cheapest honest server of the same answers.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import endpoints, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

_KV = b"/kv/"


def _json(request: Any, obj: object, status: int = 200) -> bytes:
    body = json.dumps(obj, ensure_ascii=False).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


class KeyValues(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, str] = {}

    def render_GET(self, request: Any) -> bytes:
        path = request.path
        if path.startswith(_KV):
            key = unquote_to_bytes(path[len(_KV) :]).decode("utf-8")
            value = self.data.get(key)
            if value is None:
                return _json(request, {"success": False, "key": key, "error": "no such key"}, 404)
            return _json(request, {"success": True, "key": key, "value": value})
        if path == b"/healthz":
            return _json(request, {"success": True, "status": "ok"})
        return _json(request, {"success": False, "error": "no such endpoint"}, 404)

    def render_PUT(self, request: Any) -> bytes:
        path = request.path
        if not path.startswith(_KV):
            return _json(request, {"success": False, "error": "no such endpoint"}, 404)
        key = unquote_to_bytes(path[len(_KV) :]).decode("utf-8")
        value = request.content.read().decode("utf-8")
        self.data[key] = value
        return _json(request, {"success": True, "key": key, "value": value})


class QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    args = parser.parse_args()
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")
    endpoint.listen(QuietSite(KeyValues()))
    reactor.run()  # SIGTERM/SIGINT stop it


if __name__ == "__main__":
    main()
