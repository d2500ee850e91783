"""
Export and import (C{GET /export?at=T}, C{POST /import}): a cluster's data as NDJSON lines
of C{{"key", "value", "version"}}, out and back in with each entry's own version.

B{The cut.} Nodes keep only the newest version of a key, so an export cannot give a key's
value as it was at T once it has been overwritten since. The export at T is therefore
I{the entries written no later than T that are still current}: a key whose newest version
is no later than T is exported with it; a key written (or deleted) after T is left out,
whatever it held at T; tombstones and expired entries are left out. T is a version (the
form every answer carries: an entry is in when its version, without its expiry, is at most
T) or Unix seconds (an entry is in when it was written in a millisecond no later than T).
Without T the cut is this gateway's clock as the export starts (a fresh version), so writes
made while the export runs are not in it.

B{The read.} Pages come from the listing (L{kvd.gateway.listing}), which asks every member
and keeps each key's newest version among all that answered: more than the read quorum asks
(it fails, rather than skip keys, once as many members as there are replicas are
unreachable). Each page goes to the client before the next is asked for, and not before the
client has taken the last (L{Valve}), so the gateway holds one page whatever the data's size.

B{The import.} Each line is written with its own version through
L{kvd.gateway.coordinator.Coordinator.write_version}; a replica keeps the newer of what it
holds and what arrives, so importing twice, or into a cluster with newer writes, changes
nothing newer. At most L{IN_FLIGHT} writes are in flight; the coordinator's per-node queues
batch them into internal requests of up to 512 items.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, maybeDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kvd.gateway.coordinator import Coordinator
from kvd.gateway.listing import Lister
from kvd.keys import ClientError, Unavailable, ValueTooLarge, check_key, text_value, typed_json, value_size
from kvd.ttl import MARK, expired, expiry_ms
from kvd.versions import encode, is_version, milliseconds

_log = Logger()

#: Keys asked of each node per export page.
PAGE = 1000
#: Import writes in flight at once, counted until every replica asked has answered (each
#: node's queue holds 8 * 512 items: this stays under).
IN_FLIGHT = 512
#: How far past the gateway's clock an imported version may be (seconds): further, and it
#: would outrank every write made after it for that long.
MAX_AHEAD = 3600.0
#: Line errors listed in an import's answer (all are counted).
MAX_ERRORS = 100


class ExportStopped(Exception):
    """The client went away in the middle of an export."""


@frozen
class Cut:
    """Which versions an export at T takes (see the module docstring)."""

    #: What T was: a version, or Unix seconds as given.
    text: str
    #: The bound compared against a version without its expiry.
    bound: str
    #: Whether the bound is a whole millisecond (T in seconds) rather than one version.
    whole_ms: bool

    @classmethod
    def parse(cls, text: str | None, coordinator: Coordinator) -> Cut:
        """
        @raise ClientError: unless C{text} is None (now), a version or Unix seconds.
        """
        if text is None:
            now = coordinator.clock.next()
            return cls(now, now, False)
        if is_version(text):
            return cls(text, text.split(MARK, 1)[0], False)
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and 0 <= seconds < 2**47 / 1000):
            raise ClientError(f"at must be a version or Unix seconds, not {text[:40]!r}")
        return cls(text, encode(math.floor(seconds * 1000), 0, ""), True)

    def admits(self, version: str) -> bool:
        base = version.split(MARK, 1)[0]
        if self.whole_ms:
            return base[:12] <= self.bound[:12]
        return base <= self.bound


def line(key: str, value: str, version: str) -> bytes:
    """
    One export line: a value as JSON answers carry it (bytes as base64 with C{"encoding"}), with
    its C{"content_type"} when it has one, so an import restores the type.
    """
    body = {"key": key, **typed_json(value), "version": version}
    return json.dumps(body, ensure_ascii=False).encode() + b"\n"


@implementer(IPushProducer)
@define
class Valve:
    """
    A push producer for the response an export writes to: the transport pauses it when its
    buffer is full and resumes it once drained; L{drained} waits for that.
    """

    paused: bool = False
    stopped: bool = False
    _waiting: Deferred[None] | None = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._release()

    def stopProducing(self) -> None:
        self.stopped = True
        self._release()

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    async def drained(self) -> None:
        """Return once the consumer takes more. @raise ExportStopped: when it went away."""
        while self.paused and not self.stopped:
            if self._waiting is None:
                self._waiting = Deferred()
            await self._waiting
        if self.stopped:
            raise ExportStopped()


@define
class Exporter:
    """The export's body, a page of lines at a time."""

    lister: Lister
    cut: Cut
    page_size: int = PAGE
    exported: int = 0
    #: Live keys left out because their newest version is after the cut.
    newer: int = 0

    async def chunks(self, valve: Valve) -> AsyncIterator[bytes]:
        """
        Each page's lines (possibly none), after the consumer took the last.

        @raise Unavailable: when a page cannot be listed (see L{Lister.page}).
        @raise ExportStopped: when the consumer went away.
        """
        after: str | None = None
        while True:
            page = await self.lister.page("", after, self.page_size, True)
            lines = []
            for key, value, version in page.items:
                if self.cut.admits(version):
                    lines.append(line(key, value, version))
                else:
                    self.newer += 1
            self.exported += len(lines)
            yield b"".join(lines)
            if page.next is None:
                return
            after = page.next
            await valve.drained()


def parse_line(raw: bytes, max_value_bytes: int) -> tuple[str, str, str]:
    """
    One import line's key, value and version.

    @raise ClientError: unless it is a JSON object with a good key, a string value within
        the limit and a version.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ClientError("not JSON") from None
    if not isinstance(body, dict):
        raise ClientError('not {"key": K, "value": V, "version": VERSION}')
    key, version = check_key(body.get("key")), body.get("version")
    given = body.get("value")
    if "encoding" in body or "content_type" in body:
        given = {k: body[k] for k in ("value", "encoding", "content_type") if k in body}
    value = text_value(given, repr(key))
    if value_size(value) > max_value_bytes:
        raise ValueTooLarge(f"the value is over the limit of {max_value_bytes} bytes")
    base = version.split(MARK, 1)[0] if isinstance(version, str) else None
    if not (isinstance(version, str) and is_version(base) and (MARK not in version or expiry_ms(version) is not None)):
        raise ClientError("the version must be a kvd version (as export gives it)")
    return key, value, version


@define
class Imported:
    """What an import did (see L{Importer.run})."""

    #: Entries the cluster now holds at their version (written, or held already).
    imported: int = 0
    #: Entries superseded by a newer version the cluster holds, or expired already.
    skipped: int = 0
    #: Lines not imported: bad lines and writes the cluster could not take.
    failed: int = 0
    #: Whether any failure was the cluster's (a write without its quorum), not the line's.
    unavailable: bool = False
    errors: list[dict[str, Any]] = field(factory=list)

    def error(self, number: int, message: str) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"line": number, "error": message})

    def to_json(self) -> dict[str, Any]:
        return {"imported": self.imported, "skipped": self.skipped, "failed": self.failed, "errors": self.errors}


#: Seconds before each retry of an import write the cluster could not take.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)


@define
class Importer:
    """Writes NDJSON lines into the cluster, each with its own version."""

    coordinator: Coordinator
    max_value_bytes: int
    now: Callable[[], float]
    in_flight: int = IN_FLIGHT
    #: With a clock, a write the cluster could not take (a node stalled past its deadline,
    #: say) goes again after RETRY_DELAYS before its line is reported.
    clock: IReactorTime | None = None

    async def run(self, lines: Iterable[bytes]) -> Imported:
        """
        Every line's entry written; never fails. A bad line, or a write the cluster could
        not take, is counted and listed by line number (1 is the first), and the rest go on.
        """
        done = Imported()
        slots = DeferredSemaphore(self.in_flight)
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                key, value, version = parse_line(raw, self.max_value_bytes)
            except ClientError as e:
                done.error(number, str(e))
                continue
            now = self.now()
            if milliseconds(version) > (now + MAX_AHEAD) * 1000:
                done.error(number, f"the version is more than {MAX_AHEAD:.0f} s ahead of this gateway's clock")
                continue
            if expired(version, now):
                done.skipped += 1
                continue
            await slots.acquire()
            asked: list[Deferred[None]] = []
            written = Deferred.fromCoroutine(self._write(key, value, version, asked))
            written.addCallbacks(self._written, self._failed, callbackArgs=(done,), errbackArgs=(done, number))
            # The slot is free once every replica asked has answered (or failed), not just W:
            # a replica slower than the quorum must not have its queue grow without bound.
            written.addBoth(self._free, slots, asked)
        for _ in range(self.in_flight):
            await slots.acquire()
        return done

    async def _write(self, key: str, value: str, version: str, asked: list[Deferred[None]]) -> bool:
        delays = RETRY_DELAYS if self.clock is not None else ()
        for delay in delays:
            try:
                current: bool = await maybeDeferred(self.coordinator.write_version, key, value, version, asked)
            except Unavailable:
                assert self.clock is not None
                await deferLater(self.clock, delay, lambda: None)
            else:
                return current
        result: bool = await maybeDeferred(self.coordinator.write_version, key, value, version, asked)
        return result

    @staticmethod
    def _free(_: object, slots: DeferredSemaphore, asked: list[Deferred[None]]) -> None:
        DeferredList(asked).addBoth(lambda _: slots.release())

    @staticmethod
    def _written(current: bool, done: Imported) -> None:
        if current:
            done.imported += 1
        else:
            done.skipped += 1

    @staticmethod
    def _failed(failure: Failure, done: Imported, number: int) -> None:
        if failure.check(Unavailable):
            done.unavailable = True
            done.error(number, str(failure.value))
            return
        _log.failure("unexpected error importing line {number}", failure, number=number)
        done.unavailable = True
        done.error(number, "internal error; see the server log")
