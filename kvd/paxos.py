"""
A node's Paxos acceptor for conditional writes: per key, the highest ballot it promised and
the proposal (ballot, value, version) it accepted last. See docs/consistency.md.

A promise or an acceptance is durable before it is answered. At a node (L{Acceptor.in_store})
each change is a record of the store's journal (L{kvd.journal.encode_paxos}), in the store's
group commits, so a batch's promises, acceptances and commits are one write + fsync; the
store's recovery rebuilds the state, its compaction keeps what the rules below keep (in the
snapshot), and a C{paxos.jsonl} of before is carried into the journal (L{Acceptor.migrate}).
The rest of this describes L{Acceptor.open}, the acceptor with a file of its own (tests, tools,
and the format such a file has): each change is a JSON line in
C{paxos.jsonl} in the node's data dir, and changes made while one write + fsync is under way
go out together in the next (group commit; at a node on the store's journal thread).
Memory changes at once; an answer waits for the write that holds it. A promise of a key whose
accepted proposal its store holds durably forgets the proposal (as compaction would, below),
so its record does not carry the key's last value again.

The file is compacted when it grows: a key whose accepted proposal is committed I{durably}
in the node's store (or that has none) needs no entry any more; what it promised is folded
into one I{floor}, a ballot below which nothing is promised or accepted again, for any key.
As ballots are clock-based, the floor costs a proposer at most one more round. The store's
memory holds a commit before its journal record is durable, so a key the store still has
a record queued or being written for (L{Store.unsettled}) keeps its entry: otherwise a crash
after the compacted file is durable and before that record lost both the proposal and the
commit. Given the node's clock, keys promised in the last L{KEEP_RECENT} seconds stay too,
out of the floor: the rounds under way have ballots minted just before the newest promise.

A node with no conditional-write traffic never opens the file. Start-up reads it: a torn
last line (a crash mid-write) is dropped; any other damage stops start-up with one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.codec import wire_json, wire_loads
from kvd.journal import (
    CorruptStore,
    PaxosState,
    StoreError,
    encode_floor,
    encode_paxos,
    fsync_dir,
    open_append,
    write_all,
)
from kvd.keys import check_key
from kvd.store import Runner, Store, synchronous
from kvd.versions import is_version

FILE = "paxos.jsonl"
FILE_TMP = "paxos.jsonl.tmp"
#: The file is compacted once it is this big and twice what its live entries take (as the
#: store's journal: each compaction holds the acceptor's writes for a rewrite and two fsyncs).
COMPACT_MIN_BYTES = 4 * 1024 * 1024
#: Given a clock, compaction forgets a key only once its promise is this many seconds old:
#: folded into the floor, a promise made just now would refuse the rounds under way whose
#: ballots were minted a moment before it (each a lost round, a pause and a retry).
KEEP_RECENT = 2.0
#: In a store, the acceptor's memory is trimmed (L{Acceptor.trim}) once it holds this many
#: states, and twice what the last trim kept: each trim walks them on the reactor thread, in
#: the prepare or accept that passes the mark. At 40,000 that prepare stalled the reactor
#: 41-47 ms (conditional writes over 100,000 keys, busy machine); at 4,000, 2-3 ms: the same
#: walking in all, in smaller pieces (the journal keeps every record until a snapshot anyway).
TRIM_MIN = 4_000

_log = Logger()

T = TypeVar("T")


def committed_in(store: Store) -> Callable[[str, str], bool]:
    """What an acceptor asks of its node's store: does it hold this version of this key, or a newer one?"""

    def committed(key: str, version: str) -> bool:
        entry = store.entry(key)
        return entry is not None and entry[1] >= version

    return committed


@frozen
class Proposal:
    """An accepted proposal: the ballot it was accepted in, and the entry it would write."""

    ballot: str
    value: str | None
    version: str

    def to_json(self) -> list[str | None]:
        return [self.ballot, self.value, self.version]


@frozen
class Promise:
    """An acceptor's answer to a prepare."""

    #: Whether it promised this ballot.
    promised: bool
    #: The highest ballot it has promised (this one, when it promised).
    ballot: str
    #: Its accepted proposal that its store does not hold yet, if any.
    accepted: Proposal | None


@define
class _State:
    promised: str = ""
    accepted: Proposal | None = None


def _record(key: str, state: _State) -> bytes:
    accepted = state.accepted
    if accepted is None:
        return wire_json({"k": key, "p": state.promised}) + b"\n"
    return wire_json({"k": key, "p": state.promised, "a": [accepted.ballot, accepted.value, accepted.version]}) + b"\n"


def _journal_record(key: str, state: _State) -> bytes:
    """The state of a key as a record of the store's journal (L{kvd.journal.encode_paxos})."""
    accepted = state.accepted
    if accepted is None:
        return encode_paxos(key, state.promised, None)
    return encode_paxos(key, state.promised, (accepted.ballot, accepted.value, accepted.version))


def _from_recovered(promised: str, accepted: tuple[str, str | None, str] | None) -> _State:
    return _State(promised, None if accepted is None else Proposal(*accepted))


def _nothing_unsettled() -> Collection[str]:
    return ()


def _floor_record(floor: str) -> bytes:
    return wire_json({"floor": floor}) + b"\n"


def _parse(line: bytes) -> tuple[str, _State] | str:
    """A line's (key, state), or the floor it sets; ValueError when it is neither."""
    obj = wire_loads(line)
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    if "floor" in obj:
        floor = obj["floor"]
        if not isinstance(floor, str):
            raise ValueError("floor")
        return floor
    key, promised, accepted = check_key(obj["k"]), obj["p"], obj.get("a")
    if not isinstance(promised, str):
        raise ValueError("promised")
    proposal = None
    if accepted is not None:
        ballot, value, version = accepted
        if not (isinstance(ballot, str) and (value is None or isinstance(value, str)) and is_version(version)):
            raise ValueError("accepted")
        proposal = Proposal(ballot, value, version)
    return key, _State(promised, proposal)


def recover(path: str) -> tuple[dict[str, _State], str, int, int]:
    """
    The states and floor a file holds, its good length and how many torn bytes end it.

    @raise CorruptStore: when a line other than a torn last one is not a record.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return {}, "", 0, 0
    states: dict[str, _State] = {}
    floor, offset = "", 0
    while offset < len(data):
        end = data.find(b"\n", offset)
        if end < 0:
            return states, floor, offset, len(data) - offset
        try:
            parsed = _parse(data[offset:end])
        except (ValueError, TypeError, KeyError, RecursionError) as e:
            raise CorruptStore(f"{path}: record at byte {offset} is corrupt ({e}); not starting") from None
        if isinstance(parsed, str):
            floor = max(floor, parsed)
        else:
            states[parsed[0]] = parsed[1]
        offset = end + 1
    return states, floor, offset, 0


@define
class Acceptor:
    """
    The acceptor of one node. Make one with L{Acceptor.open}.

    @ivar committed: whether the node's store holds this version of this key or a newer one,
        i.e. whether an accepted proposal is committed here.
    @ivar unsettled: the keys whose latest change in the store is not durable yet (in
        memory only): compaction keeps their entries, whatever C{committed} says.
    """

    directory: str
    committed: Callable[[str, str], bool]
    _states: dict[str, _State]
    floor: str
    _run: Runner[Any]
    fsync: bool = True
    _bytes: int = 0
    compact_min_bytes: int = COMPACT_MIN_BYTES
    _fd: int = -1
    _queue: list[tuple[bytes, Deferred[None]]] = field(factory=list)
    _compact_next: bool = False
    _writing: bool = False
    _failed: StoreError | None = None
    unsettled: Callable[[], Collection[str]] = _nothing_unsettled
    #: The node's clock (seconds): compaction then keeps keys promised in the last
    #: L{KEEP_RECENT} seconds by their ballots' clocks. Without it, it forgets them too.
    now: Callable[[], float] | None = None
    #: At a node (L{Acceptor.in_store}): the store whose journal holds this acceptor's
    #: records, in its group commits; None: the acceptor's own C{paxos.jsonl}.
    _store: Store | None = None
    #: In a store: memory is trimmed (L{trim}) once it holds more states than this.
    _trim_at: int = 0
    #: How a key's state is written: a line of paxos.jsonl, or (in a store) a journal record.
    _encode: Callable[[str, _State], bytes] = _record

    @classmethod
    def open(
        cls,
        directory: str,
        committed: Callable[[str, str], bool],
        *,
        run: Runner[Any] = synchronous,
        fsync: bool = True,
        compact_min_bytes: int = COMPACT_MIN_BYTES,
        unsettled: Callable[[], Collection[str]] = _nothing_unsettled,
        now: Callable[[], float] | None = None,
    ) -> Acceptor:
        """
        Recover the acceptor's state from C{directory} (the node's data dir, already locked by its store).
        At a node, C{committed} is L{committed_in} its store and C{unsettled} the store's L{Store.unsettled}.

        @raise StoreError: with a one-line message when the file is corrupt or unreadable.
        """
        path = os.path.join(directory, FILE)
        try:
            states, floor, good, torn = recover(path)
            if torn:
                _log.warn("{path}: dropped a torn final record ({torn} bytes) left by a crash", path=path, torn=torn)
                os.truncate(path, good)
            tmp = os.path.join(directory, FILE_TMP)
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e}") from None
        return cls(
            directory,
            committed,
            states,
            floor,
            run,
            fsync,
            good,
            compact_min_bytes,
            unsettled=unsettled,
            now=now,
        )

    @classmethod
    def in_store(cls, store: Store, *, now: Callable[[], float] | None = None) -> Acceptor:
        """
        The acceptor of a node whose records go to C{store}'s journal: its state as the
        store's recovery found it, and a C{paxos.jsonl} of before carried over (L{migrate}).

        Its records join the store's group commits, so a batch's promises, acceptances and
        commits are one write + fsync. A promise then forgets an accepted proposal its store
        holds even when the commit is not durable yet: the commit's record precedes the
        promise's in the one journal, and a crash keeps a prefix of it. Compaction is the
        store's: at each switch to a new journal, L{snapshot_state} gives what the snapshot
        keeps.

        @raise StoreError: with a one-line message when a C{paxos.jsonl} is corrupt or unreadable.
        """
        floor, recovered = store.paxos_recovered
        states = {key: _from_recovered(promised, accepted) for key, (promised, accepted) in recovered.items()}
        store.paxos_recovered = ("", {})  # the acceptor holds it now
        acceptor = cls(
            store.directory, committed_in(store), states, floor, synchronous, store.fsync, now=now, store=store
        )
        acceptor._encode = _journal_record
        store.snapshot_paxos = acceptor.snapshot_state
        acceptor.migrate()
        # The journal may hold many keys' states that memory had trimmed before the restart:
        # trimmed again now (after the migration, which asks what the journal holds), else they
        # stayed until the states doubled, each compaction's switch walking them all.
        if len(acceptor._states) > TRIM_MIN:
            acceptor.trim()
        else:
            acceptor._trim_at = TRIM_MIN
        return acceptor

    def migrate(self) -> Deferred[None]:
        """
        Carry a C{paxos.jsonl} (the acceptor's own file, before its records went to the store's
        journal) into the journal, then remove the file once that is durable; fires then.

        The journal's state of a key wins over the file's: it holds a key only once a
        migration carried it over, or a later change. A crash before the removal migrates
        the file again at the next start, which changes nothing. So does a file whose removal
        failed, after a compaction forgot some of the keys it carried over: each such key's
        promise is at most the journal's floor (the first migration finds no floor in the
        journal: the version before wrote none), so the file's state of a key the journal
        lacks with a promise at most that floor is not carried over again.
        """
        assert self._store is not None
        path, tmp = self.path, os.path.join(self.directory, FILE_TMP)
        try:
            states, floor, _, torn = recover(path)
            # Only once the file reads well: a corrupt one stops start-up touching nothing.
            if os.path.exists(tmp):
                os.remove(tmp)
            exists = os.path.exists(path)
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e}") from None
        if not exists:
            return succeed(None)
        if torn:
            _log.warn("{path}: dropped a torn final record ({torn} bytes) left by a crash", path=path, torn=torn)
        records: list[bytes] = []
        # A key the journal lacks whose promise is at most the journal's floor was carried
        # over before and forgotten since by a compaction (its proposal, if any, committed):
        # a file whose removal failed must not bring its old proposal back.
        journal_floor = self.floor
        for key, state in states.items():
            if key not in self._states and not (journal_floor and state.promised <= journal_floor):
                self._states[key] = state
                records.append(_journal_record(key, state))
        if floor:
            self.floor = max(self.floor, floor)
            records.append(encode_floor(floor))
        directory = self.directory

        def remove(_: None) -> None:
            os.remove(path)
            fsync_dir(directory)
            _log.info("{path}: carried into the journal ({count} keys) and removed", path=path, count=len(records))

        def failed(failure: Failure) -> None:
            _log.warn(
                "{path}: not removed ({why}); the next start carries it over again",
                path=path,
                why=failure.getErrorMessage(),
            )

        written = self._store.append_records(b"".join(records)) if records else succeed(None)
        return written.addCallback(remove).addErrback(failed)

    def trim(self) -> None:
        """
        In a store: forget in memory what compaction would forget (the store's journal, until
        its next snapshot, still holds it all). Memory may refuse more than the disk would:
        a key folded into the floor refuses ballots between its promise and the floor, which
        its records do not; refusing promises nothing. A store's compaction comes only when
        its journal outgrows its snapshot: without this, the acceptor would keep every key
        it saw until then, and L{snapshot_state} would walk them all on the reactor thread.
        Done when the states pass twice what the last trim kept (at least L{TRIM_MIN}).
        """
        self._compacted(())
        self._trim_at = max(TRIM_MIN, 2 * len(self._states))

    def snapshot_state(self) -> tuple[str, dict[str, PaxosState]]:
        """
        What a snapshot of the store, taken now, keeps of the acceptor: its floor, and the
        states compaction keeps (it forgets the others here, as L{_live_records} does). The
        store calls it at its switch to a new journal; the snapshot holds the store's memory
        as of then, commits not yet durable included, so the commits it holds are as good
        as durable, and nothing is unsettled.
        """
        floor, kept = self._compacted(())
        return floor, {
            key: (state.promised, None if (a := state.accepted) is None else (a.ballot, a.value, a.version))
            for key, state in kept
        }

    @property
    def path(self) -> str:
        return os.path.join(self.directory, FILE)

    def state(self, key: str) -> tuple[str, Proposal | None]:
        """What the acceptor holds for C{key}: the ballot promised ("" for none) and the accepted proposal."""
        state = self._states.get(key)
        return ("", None) if state is None else (state.promised, state.accepted)

    def __len__(self) -> int:
        return len(self._states)

    def prepare(self, key: str, ballot: str) -> Deferred[Promise]:
        """
        Promise C{ballot} unless a ballot as high or higher was promised; fires once the
        promise is durable, with the accepted proposal not yet committed here, if any.
        """
        records: list[bytes] = []
        return self._answer(records, self._prepare(key, ballot, records, []))

    def accept(self, key: str, proposal: Proposal) -> Deferred[tuple[bool, str]]:
        """
        Accept C{proposal} unless a higher ballot than its own was promised; fires once the
        acceptance is durable with (accepted, the ballot promised).
        """
        records: list[bytes] = []
        return self._answer(records, self._accept(key, proposal, records))

    def batch(self, items: list[tuple[str, str | Proposal]]) -> Deferred[list[Promise | tuple[bool, str]]]:
        """
        Prepares (key, ballot) and accepts (key, proposal) mixed, each in turn; fires once
        all the changes are durable (one write for the batch), with each one's answer.
        """
        records: list[bytes] = []
        unsettled: list[Collection[str]] = []
        answers: list[Promise | tuple[bool, str]] = [
            self._prepare(key, asked, records, unsettled)
            if isinstance(asked, str)
            else self._accept(key, asked, records)
            for key, asked in items
        ]
        return self._answer(records, answers)

    def _prepare(self, key: str, ballot: str, records: list[bytes], unsettled: list[Collection[str]]) -> Promise:
        """
        A promise's record holds the accepted proposal only while it is not committed durably
        in the store (as compaction keeps it): else every prepare of a key would write its
        last value again. C{unsettled} memoises L{Acceptor.unsettled} for a batch.
        """
        state = self._states.get(key)
        floor = self.floor
        if state is None:
            if ballot <= floor:
                return Promise(False, floor, None)
            state = self._states[key] = _State(ballot)
            records.append(self._encode(key, state))
            return Promise(True, ballot, None)
        promised = state.promised if state.promised > floor else floor
        accepted = state.accepted
        # The accepted proposal, unless the store holds it (or newer): then it is no news.
        pending = None if accepted is None or self.committed(key, accepted.version) else accepted
        if ballot <= promised:
            return Promise(False, promised, pending)
        state.promised = ballot
        if accepted is not None and pending is None:
            if not unsettled:
                unsettled.append(self.unsettled())
            if key not in unsettled[0]:
                state.accepted = None
        records.append(self._encode(key, state))
        return Promise(True, ballot, pending)

    def _accept(self, key: str, proposal: Proposal, records: list[bytes]) -> tuple[bool, str]:
        state = self._states.get(key)
        floor = self.floor
        promised = floor if state is None or state.promised < floor else state.promised
        if proposal.ballot < promised:
            return False, promised
        if state is None:
            state = self._states[key] = _State()
        state.promised, state.accepted = proposal.ballot, proposal
        records.append(self._encode(key, state))
        return True, proposal.ballot

    def _answer(self, records: list[bytes], answers: T) -> Deferred[T]:
        """C{answers}, once C{records} are durable (at once when there are none: a refusal promises nothing)."""
        if not records:
            return succeed(answers)
        return self._append(b"".join(records)).addCallback(lambda _: answers)

    # Durability.

    def _append(self, record: bytes) -> Deferred[None]:
        if self._store is not None:
            if len(self._states) > self._trim_at:
                self.trim()
            return self._store.append_records(record)
        if self._failed is not None:
            return fail(self._failed)
        d: Deferred[None] = Deferred()
        self._queue.append((record, d))
        if not self._writing:
            self._flush()
        return d

    def _live_records(self) -> bytes:
        """
        The file's contents as compaction leaves them; forgets what is durably committed
        (changes memory). A commit the store holds only in memory so far does not count.
        """
        floor, kept = self._compacted(self.unsettled())
        return (_floor_record(floor) if floor else b"") + b"".join(_record(key, state) for key, state in kept)

    def _compacted(self, unsettled: Collection[str]) -> tuple[str, list[tuple[str, _State]]]:
        """Forget what compaction forgets (changes memory); the floor and the states kept."""
        floor = self.floor
        kept: list[tuple[str, _State]] = []
        # Ballots are versions: 12 hex digits of milliseconds first, so this prefix is
        # above every ballot minted over KEEP_RECENT seconds ago, below every later one.
        recent = None if self.now is None else f"{max(0, int((self.now() - KEEP_RECENT) * 1000)):012x}"
        for key, state in list(self._states.items()):
            accepted = state.accepted
            if recent is not None and state.promised >= recent:
                kept.append((key, state))
            elif accepted is None or (key not in unsettled and self.committed(key, accepted.version)):
                floor = max(floor, state.promised)
                del self._states[key]
            else:
                kept.append((key, state))
        self.floor = floor
        return floor, kept

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        directory, path, fsync = self.directory, self.path, self.fsync
        if self._bytes > self.compact_min_bytes:
            # Memory already holds every queued change: the compacted file replaces their records.
            data, compact = self._live_records(), True
        else:
            data, compact = b"".join(record for record, _ in batch), False
        fd = self._fd

        def write() -> int:
            nonlocal fd
            if compact:
                tmp = os.path.join(directory, FILE_TMP)
                new = open_append(tmp)
                write_all(new, data)
                os.fsync(new)
                os.rename(tmp, path)
                fsync_dir(directory)
                if fd >= 0:
                    os.close(fd)
                fd = new
                return fd
            if fd < 0:
                fd = open_append(path)
                fsync_dir(directory)
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
            return fd

        self._writing = True
        self._run(write).addBoth(self._flushed, batch, len(data), compact)

    def _flushed(self, result: object, batch: list[tuple[bytes, Deferred[None]]], size: int, compact: bool) -> None:
        self._writing = False
        if isinstance(result, Failure):
            _log.failure("paxos state write failed; refusing further promises", result)
            self._failed = StoreError(f"paxos state write failed in {self.directory}: {result.getErrorMessage()}")
            waiting, self._queue = batch + self._queue, []
            for _, d in waiting:
                d.errback(self._failed)
            return
        assert isinstance(result, int)
        self._fd = result
        self._bytes = size if compact else self._bytes + size
        if compact:
            # Compact again only once the file has doubled past what it keeps.
            self.compact_min_bytes = max(self.compact_min_bytes, 2 * size)
        if self._queue:
            self._flush()
        for _, d in batch:
            d.callback(None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
