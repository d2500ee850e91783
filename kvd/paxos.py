"""
A node's Paxos acceptor for conditional writes: per key, the highest ballot it promised and
the proposal (ballot, value, version) it accepted last. See docs/consistency.md.

A promise or an acceptance is durable before it is answered: each change is a record of the
node's store journal (L{kvd.journal.encode_paxos}), in the store's group commits, so a
batch's promises, acceptances and commits are one write + fsync. Memory changes at once; an
answer waits for the group commit that holds it. A promise of a key whose accepted proposal
its store holds forgets the proposal, so its record does not carry the key's last value
again: the commit's record is ahead of it in the same journal.

The store's recovery rebuilds the state; its compaction keeps what the acceptor gives at the
switch to a new journal (L{Acceptor.snapshot_state}): a key whose accepted proposal the store
holds (or that has none) needs no entry any more; what it promised is folded into one
I{floor}, a ballot below which nothing is promised or accepted again, for any key. As ballots
are clock-based, the floor costs a proposer at most one more round. Given the node's clock,
keys promised in the last L{KEEP_RECENT} seconds stay too, out of the floor: the rounds under
way have ballots minted just before the newest promise. Memory forgets the same between
compactions (L{Acceptor.trim}).

A C{paxos.jsonl} in the data dir (the acceptor's own file, in a kvd of before) is carried into
the journal at start-up (L{Acceptor.migrate}): one JSON line per change (L{_parse}); a torn
last line (a crash mid-write) is dropped; any other damage stops start-up with one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from attrs import define, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.codec import wire_loads
from kvd.journal import (
    CorruptStore,
    PaxosState,
    StoreError,
    encode_floor,
    encode_paxos,
    fsync_dir,
)
from kvd.keys import check_key
from kvd.store import Store
from kvd.versions import is_version

#: The acceptor's own file in a kvd of before, carried into the journal at start-up.
FILE = "paxos.jsonl"
#: What that kvd's compaction of the file left if cut short: removed at the migration.
FILE_TMP = "paxos.jsonl.tmp"
#: Given a clock, compaction forgets a key only once its promise is this many seconds old:
#: folded into the floor, a promise made just now would refuse the rounds under way whose
#: ballots were minted a moment before it (each a lost round, a pause and a retry).
KEEP_RECENT = 2.0
#: The acceptor's memory is trimmed (L{Acceptor.trim}) once it holds this many states, and
#: twice what the last trim kept: each trim walks them on the reactor thread, in the prepare
#: or accept that passes the mark. At 40,000 that prepare stalled the reactor 41-47 ms
#: (conditional writes over 100,000 keys, busy machine); at 4,000, 2-3 ms: the same walking
#: in all, in smaller pieces (the journal keeps every record until a snapshot anyway).
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


def _journal_record(key: str, state: _State) -> bytes:
    """The state of a key as a record of the store's journal (L{kvd.journal.encode_paxos})."""
    accepted = state.accepted
    if accepted is None:
        return encode_paxos(key, state.promised, None)
    return encode_paxos(key, state.promised, (accepted.ballot, accepted.value, accepted.version))


def _from_recovered(promised: str, accepted: tuple[str, str | None, str] | None) -> _State:
    return _State(promised, None if accepted is None else Proposal(*accepted))


def _parse(line: bytes) -> tuple[str, _State] | str:
    """
    A line of a C{paxos.jsonl}'s (key, state), or the floor it sets; ValueError when it is
    neither. A line is C{{"k": KEY, "p": PROMISED}}, C{{"k": KEY, "p": PROMISED, "a": [BALLOT,
    VALUE or null, VERSION]}} or C{{"floor": BALLOT}} (L{kvd.testing.paxos_jsonl} writes them).
    """
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
    The states and floor a C{paxos.jsonl} holds, its good length and how many torn bytes end it.

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
    The acceptor of one node, its records in the node's store's journal. Make one with
    L{Acceptor.in_store}.

    @ivar committed: whether the node's store holds this version of this key or a newer one,
        i.e. whether an accepted proposal is committed here.
    """

    directory: str
    committed: Callable[[str, str], bool]
    _states: dict[str, _State]
    floor: str
    #: The store whose journal holds this acceptor's records, in its group commits.
    _store: Store
    #: The node's clock (seconds): compaction then keeps keys promised in the last
    #: L{KEEP_RECENT} seconds by their ballots' clocks. Without it, it forgets them too.
    now: Callable[[], float] | None = None
    #: Memory is trimmed (L{trim}) once it holds more states than this.
    _trim_at: int = 0

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
        acceptor = cls(store.directory, committed_in(store), states, floor, store, now=now)
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
        Forget in memory what compaction would forget (the store's journal, until its next
        snapshot, still holds it all). Memory may refuse more than the disk would: a key
        folded into the floor refuses ballots between its promise and the floor, which its
        records do not; refusing promises nothing. A store's compaction comes only when its
        journal outgrows its snapshot: without this, the acceptor would keep every key it saw
        until then, and L{snapshot_state} would walk them all on the reactor thread. Done
        when the states pass twice what the last trim kept (at least L{TRIM_MIN}).
        """
        self._compacted()
        self._trim_at = max(TRIM_MIN, 2 * len(self._states))

    def snapshot_state(self) -> tuple[str, dict[str, PaxosState]]:
        """
        What a snapshot of the store, taken now, keeps of the acceptor: its floor, and the
        states compaction keeps (it forgets the others here, as L{trim} does). The store
        calls it at its switch to a new journal; the snapshot holds the store's memory as of
        then, commits not yet durable included, so the commits it holds are as good as
        durable.
        """
        floor, kept = self._compacted()
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
        return self._answer(records, self._prepare(key, ballot, records))

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
        answers: list[Promise | tuple[bool, str]] = [
            self._prepare(key, asked, records) if isinstance(asked, str) else self._accept(key, asked, records)
            for key, asked in items
        ]
        return self._answer(records, answers)

    def _prepare(self, key: str, ballot: str, records: list[bytes]) -> Promise:
        """
        A promise's record holds the accepted proposal only while the store does not hold it
        (as compaction keeps it): else every prepare of a key would write its last value
        again. The store's commit of it, durable or not, precedes the promise's record in
        the journal.
        """
        state = self._states.get(key)
        floor = self.floor
        if state is None:
            if ballot <= floor:
                return Promise(False, floor, None)
            state = self._states[key] = _State(ballot)
            records.append(_journal_record(key, state))
            return Promise(True, ballot, None)
        promised = state.promised if state.promised > floor else floor
        accepted = state.accepted
        # The accepted proposal, unless the store holds it (or newer): then it is no news.
        pending = None if accepted is None or self.committed(key, accepted.version) else accepted
        if ballot <= promised:
            return Promise(False, promised, pending)
        state.promised = ballot
        if accepted is not None and pending is None:
            state.accepted = None
        records.append(_journal_record(key, state))
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
        records.append(_journal_record(key, state))
        return True, proposal.ballot

    def _answer(self, records: list[bytes], answers: T) -> Deferred[T]:
        """C{answers}, once C{records} are durable (at once when there are none: a refusal promises nothing)."""
        if not records:
            return succeed(answers)
        return self._append(b"".join(records)).addCallback(lambda _: answers)

    # Durability.

    def _append(self, record: bytes) -> Deferred[None]:
        if len(self._states) > self._trim_at:
            self.trim()
        return self._store.append_records(record)

    def _compacted(self) -> tuple[str, list[tuple[str, _State]]]:
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
            elif accepted is None or self.committed(key, accepted.version):
                floor = max(floor, state.promised)
                del self._states[key]
            else:
                kept.append((key, state))
        self.floor = floor
        return floor, kept
