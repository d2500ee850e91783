"""
A node's durable key-value store: memory first, a JSON-lines journal behind it.

Layout of a data dir::

    LOCK                   held (flock) by the one process that owns the dir
    snapshot.json          {"kvd": 1, "generation": G, "data": {key: value, ...}}
    journal-G.jsonl        one JSON record a line, written after the snapshot of generation G:
                           ["p", key, value]  put
                           ["d", key]         delete

Writes change the in-memory dict at once and queue their record. One write + fsync at a time
goes to the journal off the reactor thread; records queued meanwhile go out together in the
next one (group commit), and each write's Deferred fires once its record is durable.

When the journal outgrows the snapshot, new records go to journal-(G+1) and a copy of the
state is written as the snapshot of generation G+1 (temp file, fsync, rename, fsync dir);
only then are older journals removed. Start-up loads the snapshot and replays every journal
of its generation or later, so a crash at any step of that sequence recovers to the same
state. Because compaction happens when the journal is as large as the snapshot, its cost is
amortised to a constant per written byte, whatever the number of keys.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.ring import key_point
from kvd.versions import HybridClock

T = TypeVar("T")

#: Runs a blocking function somewhere (a thread pool, in production) and gives its result.
Runner = Callable[[Callable[[], T]], "Deferred[T]"]

SNAPSHOT = "snapshot.json"
INCARNATION = "incarnation"
SNAPSHOT_TMP = "snapshot.json.tmp"
LOCK = "LOCK"
FORMAT = 2
#: The version of data written before versions existed: older than every real one.
NO_VERSION = ""
#: Anti-entropy compares digests of this many key ranges.
BUCKETS = 256
#: A key's value (None for a tombstone: a deletion replicas must learn of) and version.
Entry = tuple["str | None", str]
#: In memory and in snapshots an entry is one string, its version then SEP then its value
#: (a tombstone is its version alone): a tuple and a second string object per key would
#: double the memory a key takes, and slow loading a snapshot. Versions never hold SEP.
SEP = "\x1f"


def pack(value: str | None, version: str) -> str:
    return version if value is None else version + SEP + value


def unpack(packed: str) -> Entry:
    cut = packed.find(SEP)
    return (None, packed) if cut < 0 else (packed[cut + 1 :], packed[:cut])


def _version(packed: str) -> str:
    cut = packed.find(SEP)
    return packed if cut < 0 else packed[:cut]


_JOURNAL = re.compile(r"^journal-(\d+)\.jsonl$")
#: Journals smaller than this are never compacted, so a small store does not rewrite its
#: snapshot every few writes.
COMPACT_MIN_BYTES = 4 * 1024 * 1024
#: Items per slice when serialising a snapshot: between slices the GIL can go back to the
#: reactor thread, so compaction of a large store does not stall request handling.
SNAPSHOT_SLICE = 20_000

_log = Logger()


class StoreError(Exception):
    """The store cannot be opened or written; the message is one readable line."""


class CorruptStore(StoreError):
    """The data dir holds something recovery must not guess about."""


class StoreLocked(StoreError):
    """Another process owns the data dir."""


class StoreFailed(StoreError):
    """An earlier journal write failed; the store accepts no more writes."""


class StoreClosed(StoreError):
    """The store is closing (the node is shutting down) and accepts no more writes."""


def synchronous(f: Callable[[], T]) -> Deferred[T]:
    """A L{Runner} that runs C{f} at once, for tests and tools."""
    try:
        return succeed(f())
    except Exception:
        return fail()


def journal_name(generation: int) -> str:
    return f"journal-{generation}.jsonl"


def _record(*fields: str) -> bytes:
    return (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def encode_entry(key: str, value: str | None, version: str) -> bytes:
    """A put (value) or a tombstone (None), with its version."""
    return _record("p", key, value, version) if value is not None else _record("d", key, version)


def encode_drop(key: str) -> bytes:
    return _record("x", key)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _snapshot_chunks(generation: int, items: list[tuple[str, str]]) -> Iterator[bytes]:
    yield b'{"kvd":%d,"generation":%d,"data":{' % (FORMAT, generation)
    for start in range(0, len(items), SNAPSHOT_SLICE):
        body = json.dumps(dict(items[start : start + SNAPSHOT_SLICE]), ensure_ascii=False)
        if start:
            yield b","
        yield body[1:-1].encode()
    yield b"}}\n"


def write_snapshot(
    directory: str,
    generation: int,
    items: list[tuple[str, str]],
    step: Callable[[str], None] = lambda name: None,
) -> int:
    """
    Make C{items} the snapshot of C{generation}, atomically, and return its size in bytes.

    C{step} is called after each step that leaves the disk in a new state; tests make it
    raise to leave the dir as a crash at that point would.
    """
    tmp = os.path.join(directory, SNAPSHOT_TMP)
    size = 0
    with open(tmp, "wb") as f:
        for chunk in _snapshot_chunks(generation, items):
            f.write(chunk)
            size += len(chunk)
        step("written")
        f.flush()
        os.fsync(f.fileno())
    step("synced")
    os.replace(tmp, os.path.join(directory, SNAPSHOT))
    step("renamed")
    _fsync_dir(directory)
    step("dir-synced")
    return size


def _decode_records(path: str, data: bytes, last: bool) -> tuple[list[list[Any]], int]:
    """
    Parse a journal's bytes into records; return them and the length of the good prefix.

    A final line without its newline, or a final line that does not parse, is a record torn
    by a crash while it was being appended; it is left out (and the caller cuts it off).
    Anything else that does not parse is corruption.
    """
    end = data.rfind(b"\n") + 1
    body, tail = data[:end], data[end:]
    lines = body.split(b"\n")[:-1]
    try:
        records = json.loads(b"[" + b",".join(lines) + b"]") if lines else []
        bad: int | None = None
    except ValueError:
        records, bad = [], None
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                bad = number
                break
    if bad is not None:
        if last and bad == len(lines) - 1 and not tail:
            end -= len(lines[bad]) + 1
        else:
            raise CorruptStore(f"{path}: record {bad + 1} is not valid JSON; refusing to start")
    if tail and not last:
        raise CorruptStore(f"{path}: ends in a partial record but is not the newest journal")
    return records, end


def _apply(path: str, data: dict[str, str], records: list[Any]) -> None:
    for number, record in enumerate(records, 1):
        if not isinstance(record, list) or not record or not all(isinstance(f, str) for f in record[1:]):
            raise CorruptStore(f"{path}: record {number} is not a kvd record; refusing to start")
        kind, size = record[0], len(record)
        if kind == "p" and size == 4:
            data[record[1]] = record[3] + SEP + record[2]
        elif kind == "d" and size == 3:
            data[record[1]] = record[2]
        elif kind == "x" and size == 2:
            data.pop(record[1], None)
        elif kind == "p" and size == 3:  # format 1: no version
            data[record[1]] = NO_VERSION + SEP + record[2]
        elif kind == "d" and size == 2:  # format 1: deletes left no tombstone
            data.pop(record[1], None)
        else:
            raise CorruptStore(f"{path}: record {number} is not a put, delete or drop; refusing to start")


def _entries(path: str, format: int, data: dict[str, Any]) -> dict[str, str]:
    """A snapshot's data as packed entries; format 1 held bare values, with no versions."""
    if not all(type(v) is str for v in data.values()):
        raise CorruptStore(f"{path}: holds an entry that is not a string; refusing to start")
    if format == 1:
        return {k: NO_VERSION + SEP + v for k, v in data.items()}
    return data


@define
class Recovered:
    """What recovery found in a data dir."""

    data: dict[str, str]
    generation: int
    snapshot_bytes: int
    journal_generation: int
    journal_bytes: int
    torn_bytes: int
    stale: list[str]


def recover(directory: str) -> Recovered:
    """
    Read a data dir's state without changing any file.

    @raise CorruptStore: for anything but a torn final record.
    """
    names = os.listdir(directory)
    generation, data, snapshot_bytes = 0, {}, 0
    snapshot = os.path.join(directory, SNAPSHOT)
    if SNAPSHOT in names:
        with open(snapshot, "rb") as f:
            raw = f.read()
        snapshot_bytes = len(raw)
        try:
            loaded = json.loads(raw)
        except ValueError as e:
            raise CorruptStore(f"{snapshot}: not valid JSON ({e}); refusing to start") from None
        if (
            not isinstance(loaded, dict)
            or loaded.get("kvd") not in (1, FORMAT)
            or not isinstance(loaded.get("generation"), int)
            or not isinstance(loaded.get("data"), dict)
        ):
            raise CorruptStore(f"{snapshot}: not a kvd snapshot of format 1 or {FORMAT}; refusing to start")
        generation, data = loaded["generation"], _entries(snapshot, loaded["kvd"], loaded["data"])

    if INCARNATION in names:
        read_incarnation(directory)
    journals = sorted((int(m.group(1)), name) for name in names if (m := _JOURNAL.match(name)))
    stale = [name for number, name in journals if number < generation]
    live = [(number, name) for number, name in journals if number >= generation]
    if live and live[0][0] != generation:
        raise CorruptStore(
            f"{directory}: {live[0][1]} found but the snapshot is of generation {generation}"
            " (missing snapshot or journal); refusing to start"
        )
    for (a, name), (b, _) in zip(live, live[1:], strict=False):
        if b != a + 1:
            raise CorruptStore(f"{directory}: journals are not consecutive after {name}; refusing to start")

    journal_generation, journal_bytes, torn = generation, 0, 0
    for position, (number, name) in enumerate(live):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            raw = f.read()
        last = position == len(live) - 1
        records, good = _decode_records(path, raw, last)
        _apply(path, data, records)
        journal_generation, journal_bytes, torn = number, good, len(raw) - good
    return Recovered(data, generation, snapshot_bytes, journal_generation, journal_bytes, torn, stale)


@define
class Store:
    """
    The live store of one node. Make one with L{Store.open}.

    @ivar fsync: whether each group commit is fsynced (the default); without it a power
        failure can lose acknowledged writes, so it is only for benchmarks.
    """

    directory: str
    _data: dict[str, str]
    _run: Runner[Any]
    fsync: bool
    _lock_fd: int
    _journal_fd: int
    _generation: int
    _journal_generation: int
    _journal_bytes: int
    _snapshot_bytes: int
    compact_min_bytes: int = COMPACT_MIN_BYTES
    _queue: list[bytes] = field(factory=list)
    _waiters: list[Deferred[None]] = field(factory=list)
    #: (key, value before the write) for each queued and each in-flight write, to undo them
    #: in memory if their journal write fails.
    _undo: list[tuple[str, str | None]] = field(factory=list)
    _in_flight_undo: list[tuple[str, str | None]] = field(factory=list)
    #: Versions for writes made here rather than replicated (the node's own client API).
    clock: HybridClock = field(factory=lambda: HybridClock(time.time, "local"))
    _live: int = -1
    #: Per key range, the XOR of a hash of each (key, version): equal digests, equal ranges.
    #: Computed on first use, then kept up to date by every change.
    _digests: list[int] | None = None
    _writing: bool = False
    _compacting: bool = False
    _failed: StoreError | None = None
    _idle: list[Deferred[None]] = field(factory=list)
    _closed: bool = False
    #: Called with a step name during compaction; see L{write_snapshot}.
    _step: Callable[[str], None] = lambda name: None
    #: Called after each group commit with its duration (write + fsync) and its write count.
    observe_commit: Callable[[float, int], None] | None = None

    @classmethod
    def open(
        cls,
        directory: str,
        run: Runner[Any] = synchronous,
        fsync: bool = True,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
    ) -> Store:
        """
        Take the data dir (creating it if needed), recover its state and make it writable.

        @raise StoreError: with a one-line message, having changed no file, when the dir
            cannot be created or locked or its contents are corrupt.
        """
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise StoreError(f"data dir {directory} exists and is not a directory")
        try:
            os.makedirs(directory, exist_ok=True)
            lock_fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"cannot use data dir {directory}: {e.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise StoreLocked(f"data dir {directory} is in use by another kvd process") from None
        try:
            found = recover(directory)
            journal = os.path.join(directory, journal_name(found.journal_generation))
            if found.torn_bytes:
                _log.warn(
                    "{journal}: dropped a torn final record ({torn} bytes) left by a crash",
                    journal=journal,
                    torn=found.torn_bytes,
                )
                os.truncate(journal, found.journal_bytes)
            journal_fd = _open_append(journal)
            _fsync_dir(directory)
            leftover = [os.path.join(directory, name) for name in found.stale]
            if os.path.exists(os.path.join(directory, SNAPSHOT_TMP)):
                leftover.append(os.path.join(directory, SNAPSHOT_TMP))
            for path in leftover:
                os.remove(path)
        except OSError as e:
            os.close(lock_fd)
            raise StoreError(f"cannot use data dir {directory}: {e}") from None
        except StoreError:
            os.close(lock_fd)
            raise
        return cls(
            directory=directory,
            data=found.data,
            run=run,
            fsync=fsync,
            lock_fd=lock_fd,
            journal_fd=journal_fd,
            generation=found.generation,
            journal_generation=found.journal_generation,
            journal_bytes=found.journal_bytes,
            snapshot_bytes=found.snapshot_bytes,
            compact_min_bytes=compact_min_bytes,
        )

    # Reads: memory only.

    def get(self, key: str) -> str | None:
        """The key's live value; None when absent or deleted."""
        packed = self._data.get(key)
        if packed is None:
            return None
        cut = packed.find(SEP)
        return None if cut < 0 else packed[cut + 1 :]

    def entry(self, key: str) -> Entry | None:
        """The key's value (None for a tombstone) and version, if the store knows the key at all."""
        packed = self._data.get(key)
        return None if packed is None else unpack(packed)

    def __len__(self) -> int:
        """Live keys: tombstones do not count."""
        if self._live < 0:
            self._live = sum(1 for packed in self._data.values() if SEP in packed)
        return self._live

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def items(self) -> Iterable[tuple[str, str]]:
        """(key, value) of every live key."""
        return ((k, v) for k, (v, _) in self.entries() if v is not None)

    def entries(self) -> Iterable[tuple[str, Entry]]:
        """(key, (value or None, version)) of every key, tombstones included."""
        return ((k, unpack(packed)) for k, packed in self._data.items())

    def digests(self) -> list[int]:
        """The digest of each of the L{BUCKETS} key ranges."""
        if self._digests is None:
            digests = [0] * BUCKETS
            for key, packed in self._data.items():
                digests[bucket_of(key)] ^= _mark(key, _version(packed))
            self._digests = digests
        return list(self._digests)

    def versions_in(self, buckets: set[int]) -> tuple[dict[str, str], list[str]]:
        """key -> version for every key in the given ranges, and which of them are tombstones."""
        versions, tombstones = {}, []
        for key, packed in self._data.items():
            if bucket_of(key) in buckets:
                value, versions[key] = unpack(packed)
                if value is None:
                    tombstones.append(key)
        return versions, tombstones

    @property
    def journal_bytes(self) -> int:
        return self._journal_bytes

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def failed(self) -> StoreError | None:
        """Why the store takes no more writes, if it has failed."""
        return self._failed

    @property
    def snapshot_bytes(self) -> int:
        return self._snapshot_bytes

    # Writes: memory at once, durable when the returned Deferred fires.

    def _refusal(self) -> StoreError | None:
        if self._failed is not None:
            return self._failed
        if self._closed:
            return StoreClosed(f"the store in {self.directory} is closing; no more writes")
        return None

    def _local_version(self, key: str) -> str:
        current = self._data.get(key)
        if current is not None:
            self.clock.observe(_version(current))
        return self.clock.next()

    def put(self, key: str, value: str) -> Deferred[str]:
        """Set C{key} with a new local version; fires with that version once durable."""
        version = self._local_version(key)
        d = self.apply(key, value, version)
        assert d is not None
        return d.addCallback(lambda _: version)

    def delete(self, key: str) -> Deferred[bool] | None:
        """
        Delete C{key} (leaving a tombstone); C{None} when it is not live (nothing is written),
        else a Deferred that fires with C{True} once the deletion is durable.
        """
        if self.get(key) is None:
            return None
        d = self.apply(key, None, self._local_version(key))
        assert d is not None
        return d.addCallback(lambda _: True)

    def apply(self, key: str, value: str | None, version: str) -> Deferred[None] | None:
        """
        Take a replicated write (C{value} None: a deletion) unless the store already holds
        this version or a newer one. C{None} when nothing was written; else a Deferred that
        fires once the write is durable.
        """
        current = self._data.get(key)
        if current is not None and _version(current) >= version:
            return None
        refusal = self._refusal()
        if refusal is not None:
            return _failed(refusal)
        self._set(key, pack(value, version))
        return self._append(encode_entry(key, value, version), key, current)

    def drop(self, key: str, version: str) -> Deferred[None] | None:
        """
        Forget C{key} entirely (no tombstone) if it still holds C{version}: for keys this node
        no longer owns, once their owners have them. C{None} when nothing was done.
        """
        current = self._data.get(key)
        if current is None or _version(current) != version:
            return None
        refusal = self._refusal()
        if refusal is not None:
            return _failed(refusal)
        self._set(key, None)
        return self._append(encode_drop(key), key, current)

    def _set(self, key: str, packed: str | None) -> None:
        """Change memory, keeping the live count and the digests in step."""
        old = self._data.get(key)
        if packed is None:
            self._data.pop(key, None)
        else:
            self._data[key] = packed
        if self._live >= 0:
            self._live += (packed is not None and SEP in packed) - (old is not None and SEP in old)
        if self._digests is not None:
            bucket = bucket_of(key)
            if old is not None:
                self._digests[bucket] ^= _mark(key, _version(old))
            if packed is not None:
                self._digests[bucket] ^= _mark(key, _version(packed))

    def _append(self, record: bytes, key: str, previous: str | None) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._queue.append(record)
        self._waiters.append(d)
        self._undo.append((key, previous))
        if not self._writing:
            self._flush()
        return d

    def _flush(self) -> None:
        records, waiters = self._queue, self._waiters
        self._queue, self._waiters = [], []
        self._in_flight_undo, self._undo = self._undo, []
        data = b"".join(records)
        fd, fsync = self._journal_fd, self.fsync

        def write() -> float:
            started = time.perf_counter()
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
            return time.perf_counter() - started

        self._writing = True
        self._run(write).addBoth(self._flushed, waiters, len(data))

    def _flushed(self, result: object, waiters: list[Deferred[None]], size: int) -> None:
        self._writing = False
        if isinstance(result, Failure):
            _log.failure("journal write failed; refusing further writes", result)
            self._failed = StoreFailed(f"journal write failed in {self.directory}: {result.getErrorMessage()}")
            # Nothing that failed may stay readable: put memory back as it was, newest first.
            for key, previous in reversed(self._in_flight_undo + self._undo):
                self._set(key, previous)
            failed = waiters + self._waiters
            self._queue, self._waiters, self._undo, self._in_flight_undo = [], [], [], []
            for d in failed:
                d.errback(self._failed)
            self._check_idle()
            return
        self._in_flight_undo = []
        self._journal_bytes += size
        if self.observe_commit is not None:
            assert isinstance(result, float)
            self.observe_commit(result, len(waiters))
        # Start what comes next before telling the writers: their callbacks may write again
        # (a pipelined request, say), and must find the next journal write under way, not
        # start a second one beside it.
        if self._should_compact():
            self._start_compaction()
        elif self._queue:
            self._flush()
        for d in waiters:
            d.callback(None)
        self._check_idle()

    # Compaction.

    def _should_compact(self) -> bool:
        return (
            not self._compacting
            and not self._closed
            and self._journal_bytes > max(self._snapshot_bytes, self.compact_min_bytes)
        )

    def compact(self) -> Deferred[None]:
        """Write a snapshot now (unless one is being written) and wait until it is done."""
        d = self.when_idle()
        if not self._compacting and not self._writing and self._failed is None:
            self._start_compaction()
            d = self.when_idle()
        return d

    def _start_compaction(self) -> None:
        """
        Switch new records to the next journal, then snapshot the state as of the switch.

        Called only while no journal write is in flight, so the old journal is complete.
        """
        self._compacting = True
        self._writing = True
        generation = self._journal_generation + 1
        path = os.path.join(self.directory, journal_name(generation))
        directory = self.directory

        def create() -> int:
            fd = _open_append(path)
            _fsync_dir(directory)
            return fd

        def created(fd: int) -> None:
            old_fd, self._journal_fd = self._journal_fd, fd
            os.close(old_fd)
            self._journal_generation, self._journal_bytes = generation, 0
            items = list(self._data.items())
            self._run(lambda: write_snapshot(directory, generation, items, self._step)).addBoth(
                self._snapshotted, generation
            )
            self._writing = False
            if self._queue:
                self._flush()
            else:
                self._check_idle()

        def failed(failure: Failure) -> None:
            self._writing = False
            self._compacting = False
            _log.failure("could not start a new journal in {directory}", failure, directory=directory)
            if self._queue:
                self._flush()
            self._check_idle()

        self._run(create).addCallbacks(created, failed)

    def _snapshotted(self, result: object, generation: int) -> None:
        self._compacting = False
        if isinstance(result, Failure):
            # The old journals are still there, so nothing is lost: start-up replays them.
            _log.failure("snapshot of generation {generation} failed", result, generation=generation)
        else:
            assert isinstance(result, int)
            self._snapshot_bytes = result
            old, self._generation = self._generation, generation
            for number in range(old, generation):
                try:
                    os.remove(os.path.join(self.directory, journal_name(number)))
                except FileNotFoundError:
                    pass
        self._check_idle()

    # Shutdown.

    def when_idle(self) -> Deferred[None]:
        """A Deferred that fires once every queued write is durable and no snapshot is running."""
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if self._writing or self._compacting or self._queue:
            return
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)

    def close(self) -> Deferred[None]:
        """Let pending writes become durable, then release the data dir."""
        self._closed = True

        def release(_: None) -> None:
            os.close(self._journal_fd)
            os.close(self._lock_fd)

        return self.when_idle().addCallback(release)

    def abandon(self) -> None:
        """Drop the store as a crash would: no flush; only file descriptors are closed."""
        self._closed = True
        os.close(self._journal_fd)
        os.close(self._lock_fd)


def bucket_of(key: str) -> int:
    """The key range a key belongs to, for anti-entropy: the top byte of its ring point."""
    return key_point(key) >> 56


def _mark(key: str, version: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{version}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _failed(error: Exception) -> Deferred[Any]:
    return fail(error)


def read_incarnation(directory: str) -> int:
    """The data dir's start count (0 before the first start)."""
    path = os.path.join(directory, INCARNATION)
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"0")
    except FileNotFoundError:
        return 0
    except ValueError:
        raise CorruptStore(f"{path}: not a whole number; refusing to start") from None


def next_incarnation(directory: str) -> int:
    """
    Count one more start of the node that owns C{directory} and return the count.

    The registry orders a node's registrations by it, so it must grow across restarts
    whatever the wall clock does; it is kept (atomically, durably) in the data dir. Call it
    only while holding the dir's lock.
    """
    path = os.path.join(directory, INCARNATION)
    current = read_incarnation(directory)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"%d\n" % (current + 1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    return current + 1
