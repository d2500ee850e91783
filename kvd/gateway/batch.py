"""
Many keys in one client round trip (C{POST /batch}), not atomically.

The body is C{{"get": [K...], "put": {K: V...}, "delete": [K...]}}; every key is answered as
if it had come alone, with its own C{"status"} inside the results. The whole request is
refused (nothing done) when it is malformed: not that shape, a bad key, a key named twice
(its results would collide), a value that is neither a string (text) nor
C{{"value": BASE64, "encoding": "base64"}} (bytes, C{"content_type"} optional) (400), more than L{MAX_KEYS} keys
or a value over the value limit (413).

The answer is bounded: the values the gets read add up to at most L{ANSWER_BUDGET} bytes
(or one largest value, if that is more). A get whose value would go over it is answered
C{"status": 413, "error": "answer too large: ask for fewer keys"}, and its value is let go
as it arrives, so the gateway never holds more than the budget (plus what is in flight from
the nodes) for one batch. Which gets those are follows the order the values arrive in, not
the order of the body; the first value always fits, so asking again for the keys answered
413 always makes progress.

Every key's read or write is started through the coordinator at once with the node clients
corked (L{kvd.gateway.nodes.Cork}), so the quorum traffic of the whole batch leaves as one
internal request per node and kind (cut only by the usual batch bounds), not one per key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.gateway.coordinator import Coordinator, WriteOutcome
from kvd.gateway.nodes import NodeClients
from kvd.gateway.quorum import QuorumFailed
from kvd.keys import (
    ClientError,
    NotFound,
    Unavailable,
    ValueTooLarge,
    check_key,
    text_value,
    typed_json,
    value_size,
)
from kvd.store import Entry
from kvd.ttl import expired, expires

_log = Logger()

#: The most keys one batch may name, in all.
MAX_KEYS = 1000

#: Bytes of values the gets of one batch answer with, at most (see the module's docstring).
ANSWER_BUDGET = 16 * 1024 * 1024

#: What a get over the answer budget answers.
OVER_BUDGET = "answer too large: ask for fewer keys"


class AnswerTooLarge(ClientError):
    """A get in a batch whose value would take the answer over its budget (a 413 of its own)."""


@define
class Batch:
    """What a checked batch body asks for."""

    get: list[str]
    put: dict[str, str]
    delete: list[str]

    @classmethod
    def parse(cls, body: object, max_value_bytes: int) -> Batch:
        """
        @raise ClientError: (400) unless C{body} is a batch of good keys, each named once.
        @raise ValueTooLarge: (413) for more than L{MAX_KEYS} keys or a value over the limit.
        """
        shape = 'the body must be {"get": [K...], "put": {K: V...}, "delete": [K...]}'
        if not isinstance(body, dict) or set(body) - {"get", "put", "delete"}:
            raise ClientError(shape)
        get, put, delete = body.get("get", []), body.get("put", {}), body.get("delete", [])
        if not (isinstance(get, list) and isinstance(put, dict) and isinstance(delete, list)):
            raise ClientError(shape)
        if len(get) + len(put) + len(delete) > MAX_KEYS:
            raise ValueTooLarge(
                f"a batch names at most {MAX_KEYS} keys; this one names {len(get) + len(put) + len(delete)}"
            )
        seen: set[str] = set()
        for key in [*get, *put, *delete]:
            check_key(key)
            if key in seen:
                raise ClientError(f"a batch names each key once; {key!r} is named twice")
            seen.add(key)
        values: dict[str, str] = {}
        for key, value in put.items():
            # Text as a JSON string; bytes as {"value": BASE64, "encoding": "base64"}.
            values[key] = checked = text_value(value, repr(key))
            size = value_size(checked)
            if size > max_value_bytes:
                raise ValueTooLarge(f"the value of {key!r} is {size} bytes; the limit is {max_value_bytes}")
        return cls(get, values, delete)


def _status(failure: Failure) -> int:
    error = failure.value
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, AnswerTooLarge):
        return 413
    if isinstance(error, ClientError):
        return 400
    if isinstance(error, Unavailable):
        return 503
    return 500


def _versioned(body: dict[str, Any]) -> dict[str, Any]:
    if "~" in body["version"]:
        body["expires"] = expires(body["version"])
    return body


@define
class BatchRunner:
    """Runs batches through a gateway's coordinator."""

    coordinator: Coordinator
    nodes: NodeClients
    now: Callable[[], float]
    #: Bytes of values a batch's gets may answer with; one value always fits, whatever its size.
    answer_budget: int = ANSWER_BUDGET

    def run(self, batch: Batch) -> Deferred[dict[str, dict[str, Any]]]:
        """Every key's answer, keyed by key; never fails (each key's error is in its answer)."""
        started: list[tuple[str, Deferred[dict[str, Any]]]] = []
        coordinator = self.coordinator
        #: Bytes of values answered so far.
        spent = [0]
        self.nodes.cork()
        try:
            for key in batch.get:
                started.append((key, maybeDeferred(coordinator.read, key).addCallback(self._read, key, spent)))
            for key, value in batch.put.items():
                written = maybeDeferred(coordinator.write, key, value)
                started.append((key, written.addCallback(self._written, key, value)))
            for key in batch.delete:
                started.append((key, maybeDeferred(coordinator.write, key, None).addCallback(self._deleted, key)))
        finally:
            self.nodes.uncork()
        for key, d in started:
            d.addErrback(self._failed, key)

        def collected(results: list[tuple[bool, Any]]) -> dict[str, dict[str, Any]]:
            return {key: result for (key, _), (_, result) in zip(started, results, strict=True)}

        return DeferredList([d for _, d in started]).addCallback(collected)

    def _read(self, entry: Entry | None, key: str, spent: list[int]) -> dict[str, Any]:
        if entry is None or entry[0] is None or expired(entry[1], self.now()):
            raise NotFound("no such key")
        carried = typed_json(entry[0])
        # What the answer will carry: the JSON string's contents, escapes and base64 included
        # (ASCII-only encoding gives at least the UTF-8 length; its two quotes not counted, so
        # plain text counts its length); the raw length first, as a cheap lower bound that
        # refuses a value over the budget without encoding it.
        if spent[0] and spent[0] + len(carried["value"]) > self.answer_budget:
            raise AnswerTooLarge(OVER_BUDGET)
        size = len(json.dumps(carried["value"])) - 2
        if spent[0] and spent[0] + size > self.answer_budget:
            raise AnswerTooLarge(OVER_BUDGET)
        spent[0] += size
        return _versioned({"status": 200, "success": True, "key": key, **carried, "version": entry[1]})

    @staticmethod
    def _written(written: WriteOutcome, key: str, value: str) -> dict[str, Any]:
        body = {"status": 200, "success": True, "key": key, **typed_json(value), "version": written.version}
        return {**body, **written.receipt.to_json()}

    @staticmethod
    def _deleted(written: WriteOutcome, key: str) -> dict[str, Any]:
        if not written.live:
            raise NotFound("no such key")
        return {"status": 200, "success": True, "key": key, "version": written.version, **written.receipt.to_json()}

    @staticmethod
    def _failed(failure: Failure, key: str) -> dict[str, Any]:
        status = _status(failure)
        if status == 500:
            _log.failure("unexpected error in a batch, answering {key!r}", failure, key=key)
            error = "internal error; see the server log"
        else:
            error = str(failure.value)
        body: dict[str, Any] = {"status": status, "success": False, "key": key, "error": error}
        quorum = failure.value
        if isinstance(quorum, QuorumFailed):
            # As the single-key answer: how many answered, and a write's receipt.
            body["answered"], body["needed"] = quorum.answered, quorum.needed
            if quorum.receipt is not None:
                body.update(quorum.receipt.to_json(), partial=quorum.receipt.partial)
        return body
