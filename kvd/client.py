"""
Outgoing HTTP: every call kvd makes to another kvd process goes through here.

One attrs class around an injected treq L{HTTPClient}, so tests pass a C{StubTreq} and a
C{Clock}. Every call is bounded in time (headers and body together) and in how much of the
peer's answer is read; a peer that cannot be reached or takes too long is a L{PeerError}
naming the URL, never a hang.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import treq
from attrs import define, frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError

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


def kv_path(key: str) -> str:
    """The canonical request path for a key: one segment, everything but unreserved encoded."""
    return "/kv/" + quote(key.encode("utf-8"), safe="")


@define
class Peers:
    """Makes bounded HTTP calls to other kvd processes."""

    http: HTTPClient
    reactor: Any  # IReactorTime; treq asks for a fuller reactor type than it uses
    timeout: float = DEFAULT_TIMEOUT
    max_answer: int = DEFAULT_MAX_ANSWER

    def call(self, method: str, url: str, body: bytes | None = None, timeout: float | None = None) -> Deferred[Answer]:
        """
        Make one request and read the whole answer, within C{timeout} seconds in all.

        @raise PeerTimeout: when the time runs out.
        @raise PeerUnreachable: when the connection fails or the answer is cut short or too large.
        """
        limit = self.timeout if timeout is None else timeout
        deadline = self.reactor.seconds() + limit
        d = Deferred.fromCoroutine(self._call(method, url, body, limit))
        d.addTimeout(limit, self.reactor)
        return d.addErrback(self._explain, url, limit, deadline)

    async def _call(self, method: str, url: str, body: bytes | None, limit: float) -> Answer:
        response = await self.http.request(method, url, data=body, timeout=limit, reactor=self.reactor, unbuffered=True)
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

    async def nodes(self, index: int | None = None, wait: float = 0) -> tuple[int, list[dict[str, Any]]]:
        """The registry's members and change index; with C{index}, a long poll of C{wait} seconds."""
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
        return body["index"], nodes


def _json_or_none(answer: Answer) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None
