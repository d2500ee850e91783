"""
A node's live store: memory first, the journal (L{kvd.journal}) behind it.

Writes change the in-memory dict at once and queue a pending record. One write + fsync at a
time goes to the journal off the reactor thread; records queued meanwhile go out together in
the next one (group commit), and each write's Deferred fires once its record is durable.

A journal write starts at the end of the reactor turn in which its first record was queued
(when the store is given a C{later}, as a node's is): every request read in one poll round
shares one write + fsync.

When the journal outgrows the snapshot, new records go to journal-(G+1) and the state as
of that switch is written as the snapshot of generation G+1 (temp file, fsync, rename,
fsync dir); only then are older journals removed. The state is not copied for that (a copy
of 1M keys held the reactor for 100 ms): the dict itself is frozen and read by the
snapshot's thread, while changes made meanwhile go to a small overlay (L{_Overlay}) that
reads consult first; once the snapshot is durable the overlay is folded back into the
dict, in slices. Start-up loads the snapshot and replays every journal
of its generation or later, so a crash at any step of that sequence recovers to the same
state. Because compaction happens when the journal is as large as the snapshot, its cost is
amortised to a constant per written byte, whatever the number of keys.

Versions of local writes (the node's own client API) come from an injected
L{HybridClock} whose origin is the node's id, so two nodes never mint the same version.
Every read also takes the time from that clock: an entry whose expiry (L{kvd.ttl}) has come
reads as a tombstone of the same version.

A sorted index of every key held (tombstones too; a C{SortedList}) serves listings in key
order (L{Store.listing}) at O(log n + page) a page; each change keeps it up to date at
O(log n). It is made by the first listing (about 0.8 s for 1M keys, once), not at start-up,
so a restart costs what it did and a node nobody lists keeps no index. Python orders
strings by code point, which is also the order of their UTF-8 bytes, so this is the byte
order clients are promised.
"""

from __future__ import annotations

import heapq
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from itertools import islice
from operator import itemgetter
from typing import Any, TypeVar

from attrs import define, field, frozen
from sortedcontainers import SortedList
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.digests import BUCKETS, Digests, bucket_of, mark
from kvd.incarnation import next_incarnation, read_incarnation
from kvd.journal import (
    BIN,
    SEP,
    SNAPSHOT_TMP,
    CorruptStore,
    Entry,
    PaxosState,
    StoreError,
    StoreLocked,
    encode_drop,
    encode_entry,
    fsync_dir,
    is_live,
    journal_name,
    lock,
    open_append,
    pack,
    recover,
    unpack,
    version_of,
    write_all,
    write_snapshot,
)
from kvd.keys import BATCH_VALUE_BUDGET, MAX_KEY_BYTES, BadKey, BadValue, check_key, check_value
from kvd.ttl import MARK, expired, expiry_ms, with_expiry
from kvd.versions import HybridClock, is_version

#: Also named here: what other modules imported from kvd.store before it was split.
__all__ = [
    "BUCKETS",
    "COMPACT_MIN_BYTES",
    "Applied",
    "BadBatch",
    "CorruptStore",
    "Entry",
    "Listed",
    "Runner",
    "Store",
    "StoreClosed",
    "StoreError",
    "StoreFailed",
    "StoreLocked",
    "next_incarnation",
    "synchronous",
]

T = TypeVar("T")

#: Runs a blocking function somewhere (a thread pool, in production) and gives its result.
Runner = Callable[[Callable[[], T]], "Deferred[T]"]

#: Schedules a call after some seconds (C{reactor.callLater}, or a test's C{Clock.callLater}).
Later = Callable[[float, Callable[[], None]], IDelayedCall]

#: Keys moved from the overlay back into the dict per reactor turn after a snapshot: about
#: 1 ms of work on a busy machine (10,000 took 29 ms).
FOLD_SLICE = 2_000

#: Journals smaller than this are never compacted, so a small store does not rewrite its
#: snapshot every few writes.
COMPACT_MIN_BYTES = 4 * 1024 * 1024

_log = Logger()


class StoreFailed(StoreError):
    """An earlier journal write failed; the store accepts no more writes."""


class StoreClosed(StoreError):
    """The store is closing (the node is shutting down) and accepts no more writes."""


class BadBatch(ValueError):
    """A batch holds an item that is not a valid write or drop; nothing of it was applied."""


def synchronous(f: Callable[[], T]) -> Deferred[T]:
    """A L{Runner} that runs C{f} at once, for tests and tools."""
    try:
        return succeed(f())
    except Exception:
        return fail()


@frozen
class Applied:
    """What a batch of replicated writes did."""

    #: How many items were written (the others were already there, or older).
    applied: int
    #: For each item, whether its key was live just before it.
    live: list[bool]
    #: For each item, the version its key holds after it: its own, or a newer one held already.
    held: list[str]


@frozen
class Listed:
    """A page of a node's sorted keys (L{Store.listing})."""

    #: (key, value or None for a tombstone or an expired entry, version), in key order.
    entries: list[tuple[str, str | None, str]]
    #: Whether keys under the prefix may follow the last one (the scan stopped at a bound).
    more: bool


@frozen
class _Pending:
    """A queued write: its journal bytes, who waits for them, and how to undo it in memory."""

    records: bytes
    done: Deferred[None]
    #: (key, packed entry before) of each change it made, in the order made.
    undo: tuple[tuple[str, str | None], ...]


def _write_items(items: Sequence[object]) -> list[tuple[str, str | None, str]]:
    """
    Each of a replicated batch's items as (key, value or None, version), all of them checked
    before any is applied. One pass with the usual item (an ASCII key and value) checked
    inline: a node checks every item of every batch (about 14 a request); an unusual one
    goes through the checks the client API uses, which say what is wrong.

    @raise BadBatch: for the first item that is not [key, value or null, version].
    """
    writes = []
    for item in items:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise BadBatch("each item is [key, value or null, version]")
        key, value, version = item
        if not (value is None or isinstance(value, str)):
            raise BadBatch("each item is [key, value or null, version]")
        if not (type(key) is str and key.isascii() and key.isprintable() and 0 < len(key) <= MAX_KEY_BYTES):
            try:
                check_key(key)
            except BadKey as e:
                raise BadBatch(str(e)) from None
        if not is_version(version) or BIN in version:
            raise BadBatch(f"not a version: {version!r}")
        if value is not None and not value.isascii():
            try:
                check_value(value)
            except BadValue as e:
                raise BadBatch(str(e)) from None
        writes.append((key, value, version))
    return writes


def _drop_item(item: object) -> tuple[str, str]:
    # Any string is accepted as the version: data written before versions existed is at
    # NO_VERSION, and must be droppable too.
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], str)):
        raise BadBatch("each item is [key, version]")
    try:
        return check_key(item[0]), item[1]
    except BadKey as e:
        raise BadBatch(str(e)) from None


class _Overlay(MutableMapping[str, str]):
    """
    A dict frozen while another thread writes it as a snapshot, and the changes made since
    (C{None}: removed), which reads consult first. Only the store's reactor thread uses it.
    """

    __slots__ = ("base", "delta")

    def __init__(self, base: dict[str, str]) -> None:
        self.base = base
        self.delta: dict[str, str | None] = {}

    def get(self, key: str, default: Any = None) -> Any:
        delta = self.delta
        if key in delta:
            packed = delta[key]
            return default if packed is None else packed
        return self.base.get(key, default)

    def __getitem__(self, key: str) -> str:
        packed = self.get(key)
        if packed is None:
            raise KeyError(key)
        return packed  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __setitem__(self, key: str, packed: str) -> None:
        self.delta[key] = packed

    def __delitem__(self, key: str) -> None:
        if self.pop(key, None) is None:
            raise KeyError(key)

    def pop(self, key: str, default: Any = None) -> Any:
        packed = self.get(key)
        if packed is None:
            return default
        if key in self.base:
            self.delta[key] = None
        else:
            del self.delta[key]
        return packed

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self.items())

    def items(self) -> Iterator[tuple[str, str]]:  # type: ignore[override]
        delta = self.delta
        for key, packed in self.base.items():
            if key not in delta:
                yield key, packed
        for key, changed in delta.items():
            if changed is not None:
                yield key, changed

    def values(self) -> Iterator[str]:  # type: ignore[override]
        return (packed for _, packed in self.items())

    def __len__(self) -> int:
        base = self.base
        return len(base) + sum((packed is not None) - (key in base) for key, packed in self.delta.items())

    def fold(self, limit: int) -> bool:
        """Move up to C{limit} changes into the dict; whether none are left."""
        base, delta = self.base, self.delta
        for _ in range(min(limit, len(delta))):
            key, packed = delta.popitem()
            if packed is None:
                base.pop(key, None)
            else:
                base[key] = packed
        return not delta


@define
class Store:
    """
    The live store of one node. Make one with L{Store.open}.

    @ivar clock: versions for writes made here rather than replicated (the node's own
        client API); its origin is the node's id.
    @ivar fsync: whether each group commit is fsynced (the default); without it a power
        failure can lose acknowledged writes, so it is only for benchmarks.
    """

    directory: str
    clock: HybridClock
    #: key -> packed entry: a dict, or while a snapshot is being written an L{_Overlay}.
    _data: MutableMapping[str, str]
    _run: Runner[Any]
    fsync: bool
    _lock_fd: int
    _journal_fd: int
    _generation: int
    _journal_generation: int
    _journal_bytes: int
    _snapshot_bytes: int
    compact_min_bytes: int = COMPACT_MIN_BYTES
    #: Schedules the journal write at the end of the turn, and the overlay's folding; without
    #: it (tools, most tests) a write starts at once and the overlay is folded in one go.
    _later: Later | None = None
    #: Runs journal writes, if not C{_run}: at a node, one long-lived thread.
    _write: Runner[Any] | None = None
    #: The journal write scheduled for the end of this turn, if any.
    _scheduled: IDelayedCall | None = None
    #: Writes waiting for the next journal write, and those in the one under way.
    _queue: list[_Pending] = field(factory=list)
    _in_flight: list[_Pending] = field(factory=list)
    _live: int = -1
    #: Per key range, the digest of its (key, version)s; computed on first use, then kept
    #: up to date by every change.
    _digests: Digests | None = None
    _writing: bool = False
    _compacting: bool = False
    _failed: StoreError | None = None
    _idle: list[Deferred[None]] = field(factory=list)
    _closed: bool = False
    #: Called with a step name during compaction; see L{write_snapshot}.
    _step: Callable[[str], None] = lambda name: None
    #: Called after each group commit with its duration (write + fsync) and its write count.
    observe_commit: Callable[[float, int], None] | None = None
    #: Every key held, tombstones included, in order; made by the first listing, then kept
    #: up to date by every change.
    _index: SortedList[str] | None = None
    #: The keys held in each key range (tombstones too); made by the first L{versions_in}
    #: (a repair sweep's question), then kept up to date as keys come and go, so a sweep's
    #: question costs the keys of the ranges it names rather than a hash of every key held.
    #: Each range's keys are a dict's keys (values None), not a set: a dict of strings only is
    #: untracked by the garbage collector, while sets of 1M keys made each full collection
    #: walk them all (bench/node_apply.py).
    _buckets: list[dict[str, None]] | None = None
    #: (expiry in ms, key) of live entries that carry an expiry, soonest first; made by the
    #: first L{expire}, then kept up to date by every change. Stale items are skipped.
    _expiring: list[tuple[int, str]] | None = None
    #: Called with (key, whether the store still holds it) after every change in memory:
    #: the write order index (L{kvd.changes}) follows the store through it.
    on_change: Callable[[str, bool], None] | None = None
    #: The Paxos acceptor's floor and states, as recovery found them in the snapshot and
    #: journals (L{kvd.paxos} takes them over, with its records, through L{append_records}).
    paxos_recovered: tuple[str, dict[str, PaxosState]] = ("", {})
    #: Called at a compaction's switch to the next journal (on the reactor thread, nothing in
    #: flight): the acceptor's floor and the states the snapshot must keep. Without it (no
    #: acceptor on this store: a tool) the snapshot keeps what recovery found.
    snapshot_paxos: Callable[[], tuple[str, dict[str, PaxosState]]] | None = None

    @classmethod
    def open(
        cls,
        directory: str,
        *,
        clock: HybridClock,
        run: Runner[Any] = synchronous,
        fsync: bool = True,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        later: Later | None = None,
        write: Runner[Any] | None = None,
    ) -> Store:
        """
        Take the data dir (creating it if needed), recover its state and make it writable.

        @param clock: versions local writes; at a node, C{HybridClock(reactor.seconds, node_id)}.
        @param later: at a node, C{reactor.callLater}: journal writes then start at the end
            of a reactor turn, not at its first write, so more writes share each fsync.
        @param write: runs journal writes (else C{run} does); snapshots and the rest go to
            C{run}, so a journal write never waits behind a snapshot.
        @raise StoreError: with a one-line message, having changed no file, when the dir
            cannot be created or locked or its contents are corrupt.
        """
        lock_fd = lock(directory)
        try:
            read_incarnation(directory)
            found = recover(directory)
            journal = os.path.join(directory, journal_name(found.journal_generation))
            if found.torn_bytes:
                _log.warn(
                    "{journal}: dropped a torn final record ({torn} bytes) left by a crash",
                    journal=journal,
                    torn=found.torn_bytes,
                )
                os.truncate(journal, found.journal_bytes)
            journal_fd = open_append(journal)
            fsync_dir(directory)
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
            clock=clock,
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
            later=later,
            write=write,
            paxos_recovered=(found.paxos_floor, found.paxos),
        )

    # Reads: memory only.

    def _now(self) -> float:
        return self.clock.now()

    def get(self, key: str) -> str | None:
        """The key's live value; None when absent, deleted or expired."""
        packed = self._data.get(key)
        if packed is None:
            return None
        cut = packed.find(SEP)
        if cut < 0:
            return None
        if BIN in packed[:cut]:
            value, version = unpack(packed)
            return None if expired(version, self._now()) else value
        if MARK in packed[:cut] and expired(packed[:cut], self._now()):
            return None
        return packed[cut + 1 :]

    def entry(self, key: str) -> Entry | None:
        """
        The key's value (None for a tombstone, or an entry that has expired) and version, if
        the store knows the key at all.
        """
        packed = self._data.get(key)
        return None if packed is None else self._unexpired(packed)

    def _unexpired(self, packed: str) -> Entry:
        value, version = unpack(packed)
        if value is not None and MARK in version and expired(version, self._now()):
            return None, version
        return value, version

    def __len__(self) -> int:
        """Live keys: tombstones do not count."""
        if self._live < 0:
            self._live = sum(1 for packed in self._data.values() if is_live(packed))
        return self._live

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def items(self) -> Iterable[tuple[str, str]]:
        """(key, value) of every live key."""
        return ((k, v) for k, (v, _) in self.entries() if v is not None)

    def entries(self) -> Iterable[tuple[str, Entry]]:
        """(key, (value or None, version)) of every key, tombstones (and expired entries) included."""
        return ((k, self._unexpired(packed)) for k, packed in self._data.items())

    def expire(self) -> Deferred[int]:
        """
        Turn every entry whose expiry has come into a tombstone of the same version (reads
        already treat it as one: this frees its value and makes it count as gone); fires with
        how many once that is durable. The first call scans every key, later ones only the
        entries due. A node calls it every second.
        """
        data, now = self._data, self._now()
        heap = self._expiring
        if heap is None:
            heap = self._expiring = []
            for key, packed in data.items():
                cut = packed.find(SEP)
                if cut >= 0 and MARK in packed[:cut]:
                    ms = expiry_ms(version_of(packed))
                    if ms is not None:
                        heap.append((ms, key))
            heapq.heapify(heap)
        records, undo = [], []
        refusal = self._refusal()
        while heap and now >= heap[0][0] / 1000:  # the same test as expired()
            ms, key = heapq.heappop(heap)
            current = data.get(key)
            if current is None or not is_live(current):
                continue
            version = version_of(current)
            if expiry_ms(version) != ms or not expired(version, now):
                continue  # written again since; its own item (if any) is in the heap
            if refusal is not None:
                heapq.heappush(heap, (ms, key))
                break
            self._set(key, version)
            records.append(encode_entry(key, None, version))
            undo.append((key, current))
        if not records:
            return succeed(0)
        return self._append(b"".join(records), tuple(undo)).addCallback(lambda _: len(records))

    def listing(
        self,
        prefix: str = "",
        after: str | None = None,
        limit: int = 100,
        values: bool = False,
        max_chars: int = BATCH_VALUE_BUDGET,
    ) -> Listed:
        """
        The next keys under C{prefix} after C{after} in key order, tombstones and expired
        entries included (as tombstones, so that whoever merges replicas can drop a key
        deleted on some of them): at most C{limit} of them, and with C{values} none past
        the one whose value passes C{max_chars}. O(log n + limit), whatever lies around.

        Without C{values}, a live entry's value is given as C{""}: only live or not matters.
        """
        index, data, now = self._index, self._data, self._now()
        if index is None:
            index = self._index = SortedList(data)
        if after is not None and after >= prefix:
            keys = list(islice(index.irange(minimum=after, inclusive=(False, True)), limit + 1))
        else:
            keys = list(islice(index.irange(minimum=prefix), limit + 1))
        if keys and not keys[-1].startswith(prefix):
            # The prefix's keys are the front of these, the rest past it.
            keys = keys[: bisect_left(keys, True, key=lambda key: not key.startswith(prefix))]
        if not keys:
            return Listed([], False)
        # One C-level call for every entry: at a million keys each lookup is a cache miss
        # (a page of them was a third of a node's page), and one call lets them overlap.
        entries = itemgetter(*keys)(data) if len(keys) > 1 else (data[keys[0]],)
        found: list[tuple[str, str | None, str]] = []
        budget = max_chars
        for key, packed in zip(keys, entries, strict=True):
            if len(found) >= limit or budget < 0:
                return Listed(found, True)
            cut = packed.find(SEP)
            if cut < 0:
                found.append((key, None, packed))
                continue
            version = packed[:cut]
            if BIN in version:
                version = version_of(packed)
            if MARK in version and expired(version, now):
                found.append((key, None, version))
            elif values:
                value = unpack(packed)[0] if len(version) < cut else packed[cut + 1 :]
                assert value is not None
                budget -= len(value)
                found.append((key, value, version))
            else:
                found.append((key, "", version))
        return Listed(found, False)  # fewer than limit + 1 keys: none follows under the prefix

    def index_ranges(self) -> None:
        """
        Work out each key range's digest and keys now, not at the first repair question: one
        pass over every key (about a second at 1M keys), which a node does at start-up rather
        than on its event loop while it serves.
        """
        if self._digests is None and self._buckets is None:
            sums = [0] * BUCKETS
            buckets: list[dict[str, None]] = [{} for _ in range(BUCKETS)]
            for key, packed in self._data.items():
                bucket = bucket_of(key)
                sums[bucket] ^= mark(key, version_of(packed))
                buckets[bucket][key] = None
            self._digests, self._buckets = Digests(sums), buckets

    def digests(self) -> list[int]:
        """The digest of each of the L{BUCKETS} key ranges."""
        if self._digests is None:
            self._digests = Digests.of(self._data)
        return self._digests.values()

    def versions_in(self, buckets: Iterable[int]) -> tuple[dict[str, str], list[str]]:
        """key -> version for every key in the given ranges, and which of them are tombstones (or expired)."""
        if self._buckets is None:
            self._buckets = [{} for _ in range(BUCKETS)]
            for key in self._data:
                self._buckets[bucket_of(key)][key] = None
        data, by_bucket = self._data, self._buckets
        versions, tombstones = {}, []
        for bucket in set(buckets):
            for key in by_bucket[bucket]:
                value, versions[key] = unpack(data[key])
                if value is None:
                    tombstones.append(key)
        now = self._now()
        dead = set(tombstones)
        tombstones.extend(
            key for key, version in versions.items() if MARK in version and key not in dead and expired(version, now)
        )
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
            self.clock.observe(version_of(current))
        return self.clock.next()

    def put(self, key: str, value: str, ttl: float | None = None) -> Deferred[str]:
        """
        Set C{key} with a new local version (carrying its expiry C{ttl} seconds from now, if
        given); fires with that version once durable.
        """
        version = self._local_version(key)
        if ttl is not None:
            version = with_expiry(version, self.clock.now() + ttl)
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
        if current is not None and version_of(current) >= version:
            return None
        refusal = self._refusal()
        if refusal is not None:
            return fail(refusal)
        self._set(key, pack(value, version))
        return self._append(encode_entry(key, value, version), ((key, current),))

    def drop(self, key: str, version: str) -> Deferred[None] | None:
        """
        Forget C{key} entirely (no tombstone) if it still holds C{version}: for keys this node
        no longer owns, once their owners have them. C{None} when nothing was done.
        """
        current = self._data.get(key)
        if current is None or version_of(current) != version:
            return None
        refusal = self._refusal()
        if refusal is not None:
            return fail(refusal)
        self._set(key, None)
        return self._append(encode_drop(key), ((key, current),))

    def apply_batch(self, items: Sequence[object]) -> Deferred[Applied]:
        """
        Take replicated writes, each C{[key, value or None, version]}, in order, as L{apply}
        does; fires once all of them are durable, in one journal group.

        @raise BadBatch: (before anything is applied) when any item is not such a write.
        """
        writes = _write_items(items)
        data, live, held = self._data, [], []
        records, undo = [], []
        refusal = self._refusal()
        now = self._now()
        replace = self._replace
        for key, value, version in writes:
            current = data.get(key)
            if current is None:
                live.append(False)
                held_version = ""
            else:
                held_version = version_of(current)
                # Most versions carry no expiry: L{expired}'s call only for those that do.
                live.append(SEP in current and not (MARK in held_version and expired(held_version, now)))
                if held_version >= version:
                    held.append(held_version)
                    continue
            held.append(version)
            if refusal is not None:
                return fail(refusal)
            replace(key, pack(value, version), version, value is not None, current, held_version)
            records.append(encode_entry(key, value, version))
            undo.append((key, current))
        if not records:
            return succeed(Applied(0, live, held))
        return self._append(b"".join(records), tuple(undo)).addCallback(lambda _: Applied(len(records), live, held))

    def drop_batch(self, items: Sequence[object]) -> Deferred[int]:
        """
        Forget keys, each C{[key, version]}, as L{drop} does; fires with how many were dropped
        once all of that is durable, in one journal group.

        @raise BadBatch: (before anything is dropped) when any item is not such a drop.
        """
        drops = [_drop_item(item) for item in items]
        data = self._data
        records, undo = [], []
        refusal = self._refusal()
        for key, version in drops:
            current = data.get(key)
            if current is None or version_of(current) != version:
                continue
            if refusal is not None:
                return fail(refusal)
            self._set(key, None)
            records.append(encode_drop(key))
            undo.append((key, current))
        if not records:
            return succeed(0)
        return self._append(b"".join(records), tuple(undo)).addCallback(lambda _: len(records))

    def _set(self, key: str, packed: str | None) -> None:
        """Change memory, keeping the live count and the digests in step."""
        old = self._data.get(key)
        if packed is not None:
            self._replace(key, packed, version_of(packed), is_live(packed), old, "" if old is None else version_of(old))
            return
        if old is None:
            if self.on_change is not None:
                self.on_change(key, False)  # as before the split: told even when nothing was there
            return
        del self._data[key]
        if self._index is not None:
            self._index.remove(key)
        if self._buckets is not None:
            self._buckets[bucket_of(key)].pop(key, None)
        if self._live >= 0:
            self._live -= is_live(old)
        if self._digests is not None:
            self._digests.change(key, old, None)
        if self.on_change is not None:
            self.on_change(key, False)

    def _replace(self, key: str, packed: str, version: str, live: bool, old: str | None, old_version: str) -> None:
        """
        Write an entry (C{packed}: C{version}, and a value if C{live}) over C{old} (None:
        absent; else of C{old_version}), keeping the index, ranges, live count, digests and
        expiry heap in step: L{_set} works the versions out, a batch's loop (a replicated
        write's hot path) has them already.
        """
        self._data[key] = packed
        expiring = self._expiring
        if expiring is not None and live and MARK in version:
            ms = expiry_ms(version)
            if ms is not None:
                heapq.heappush(expiring, (ms, key))
        bucket = -1
        if old is None:
            if self._index is not None:
                self._index.add(key)
            if self._buckets is not None:
                bucket = bucket_of(key)
                self._buckets[bucket][key] = None
        if self._live >= 0:
            self._live += live - (old is not None and SEP in old)
        if self._digests is not None:
            self._digests.replace(
                key, bucket_of(key) if bucket < 0 else bucket, None if old is None else old_version, version
            )
        if self.on_change is not None:
            self.on_change(key, True)

    def append_records(self, records: bytes) -> Deferred[None]:
        """
        Append records that are not the store's own (the Paxos acceptor's) to the journal, in
        the same group commit as the writes queued with them; fires once they are durable.
        """
        refusal = self._refusal()
        if refusal is not None:
            return fail(refusal)
        return self._append(records, ())

    def _append(self, records: bytes, undo: tuple[tuple[str, str | None], ...]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._queue.append(_Pending(records, d, undo))
        if not self._writing:
            self._flush_soon()
        return d

    def _flush_soon(self) -> None:
        """Start a journal write of the queue now, or (given C{later}) at the end of this turn."""
        if self._later is None:
            self._flush()
        elif self._scheduled is None:
            self._scheduled = self._later(0, self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        self._scheduled = None
        if not self._writing and self._queue:
            self._flush()

    def _flush(self) -> None:
        self._in_flight, self._queue = self._queue, []
        data = b"".join(pending.records for pending in self._in_flight)
        fd, fsync = self._journal_fd, self.fsync

        def write() -> float:
            started = time.perf_counter()
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
            return time.perf_counter() - started

        self._writing = True
        (self._write or self._run)(write).addBoth(self._flushed, len(data))

    def _flushed(self, result: object, size: int) -> None:
        self._writing = False
        done, self._in_flight = self._in_flight, []
        if isinstance(result, Failure):
            _log.failure("journal write failed; refusing further writes", result)
            error = self._failed = StoreFailed(f"journal write failed in {self.directory}: {result.getErrorMessage()}")
            failed, self._queue = done + self._queue, []
            # Nothing that failed may stay readable: put memory back as it was, newest first.
            for pending in reversed(failed):
                for key, previous in reversed(pending.undo):
                    self._set(key, previous)
            for pending in failed:
                pending.done.errback(error)
            self._check_idle()
            return
        self._journal_bytes += size
        if self.observe_commit is not None:
            assert isinstance(result, float)
            self.observe_commit(result, sum(len(pending.undo) for pending in done))
        # Start what comes next before telling the writers: their callbacks may write again
        # (a pipelined request, say), and must find the next journal write under way, not
        # start a second one beside it.
        if self._should_compact():
            self._start_compaction()
        elif self._queue:
            self._flush_soon()
        for pending in done:
            pending.done.callback(None)
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
            fd = open_append(path)
            fsync_dir(directory)
            return fd

        def created(fd: int) -> None:
            old_fd, self._journal_fd = self._journal_fd, fd
            os.close(old_fd)
            self._journal_generation, self._journal_bytes = generation, 0
            # Freeze the state as of the switch for the snapshot's thread; changes from now
            # on go to the overlay (journal N+1 holds them), never into the frozen dict.
            frozen = self._data
            assert isinstance(frozen, dict), "a compaction starts only once the last overlay is folded"
            self._data = _Overlay(frozen)
            older = range(self._generation, generation)
            # The acceptor's state as of the switch: its records queued from now on go to the new journal.
            paxos = self.paxos_recovered if self.snapshot_paxos is None else self.snapshot_paxos()

            def snapshot() -> int:
                size = write_snapshot(directory, generation, frozen.items(), self._step, paxos)
                # Durable: the journals before it are not needed. Removed here, not on the
                # reactor: unlinking a journal as large as the snapshot takes a while.
                for number in older:
                    try:
                        os.remove(os.path.join(directory, journal_name(number)))
                    except FileNotFoundError:
                        pass
                return size

            self._run(snapshot).addBoth(self._snapshotted, generation)
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
        if isinstance(result, Failure):
            # The old journals are still there, so nothing is lost: start-up replays them.
            _log.failure("snapshot of generation {generation} failed", result, generation=generation)
        else:
            assert isinstance(result, int)
            self._snapshot_bytes, self._generation = result, generation
        # The snapshot's thread no longer reads the frozen dict: fold the overlay back into
        # it; the compaction ends (and another may freeze the state again) once that is done.
        self._fold()

    def _fold(self) -> None:
        """Fold the overlay into its dict, a slice a turn (given C{later}); then the compaction is over."""
        overlay = self._data
        assert isinstance(overlay, _Overlay)
        if self._later is not None and len(overlay.delta) > FOLD_SLICE:
            if not overlay.fold(FOLD_SLICE):
                self._later(0, self._fold)
                return
        overlay.fold(len(overlay.delta))
        self._data = overlay.base
        self._compacting = False
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
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        os.close(self._journal_fd)
        os.close(self._lock_fd)
