"""
A node's acceptor whose records are in its store's journal (L{Acceptor.in_store}): one write
for a batch's promises, acceptances and commits, recovery, compaction, crashes and the
migration of a paxos.jsonl of before.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_paxos import node, restart, result
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kvd.journal import SNAPSHOT, CorruptStore, journal_name
from kvd.keys import typed_value
from kvd.paxos import FILE, Acceptor, Proposal, recover
from kvd.store import Store, synchronous
from kvd.testing.paxos_jsonl import paxos_jsonl, write_paxos_jsonl
from kvd.testing.runners import ManualRunner
from kvd.versions import HybridClock

B1, B2, B3, B4 = (f"018f0000000000000{i}.gw{i % 2 + 1}" for i in range(1, 5))
CRASH_STEPS = ["before-snapshot", "written", "synced", "renamed", "dir-synced"]


class SimulatedCrash(Exception):
    pass


def test_a_batch_of_promises_acceptances_and_commits_is_one_journal_write(tmp_path: Path, opened: list[Store]) -> None:
    clock, journal = Clock(), ManualRunner()
    store, acceptor = node(opened, tmp_path, later=clock.callLater, write=journal)
    # As the node's /internal/paxos handler does: the commits, then the acceptor's items.
    committed = store.apply_batch([["done", "v", B1]])
    answers = acceptor.batch([("k", B2), ("k", Proposal(B2, "w", B2)), ("j", B3)])
    clock.advance(0)
    assert len(journal.jobs) == 1, "one write + fsync for the commits and the acceptor's records"
    assert not committed.called and not answers.called, "nothing answered before it is durable"
    journal.run_one()
    assert result(committed).applied == 1
    promised, accepted, other = result(answers)
    assert promised.promised and accepted == (True, B2) and other.promised
    assert not (tmp_path / FILE).exists(), "no paxos.jsonl: the journal holds it all"
    store, acceptor = restart(opened, store)
    assert acceptor.state("k") == (B2, Proposal(B2, "w", B2)) and acceptor.state("j") == (B3, None)
    assert store.entry("done") == ("v", B1)


def test_a_restart_recovers_promises_acceptances_and_deletions_from_the_journal(
    tmp_path: Path, opened: list[Store]
) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.prepare("a", B1))
    result(acceptor.accept("b", Proposal(B2, "é\x00 \U0001f600", B2)))
    result(acceptor.accept("gone", Proposal(B2, None, B2)))  # a conditional DELETE
    result(acceptor.prepare("a", B3))
    assert not result(acceptor.prepare("a", B2)).promised
    store, again = restart(opened, store)
    assert again.state("a") == (B3, None)
    assert again.state("b") == (B2, Proposal(B2, "é\x00 \U0001f600", B2))
    assert again.state("gone") == (B2, Proposal(B2, None, B2))
    assert not result(again.prepare("a", B3)).promised, "the recovered promise refuses its own ballot"


def _scenario(
    store: Store, acceptor: Acceptor, clock: Clock, sizes: list[int], checks: list[Callable[[Store, Acceptor], bool]]
) -> None:
    """Answered steps, each one group commit; after each, the journal's size and what must survive it."""
    path = os.path.join(store.directory, journal_name(0))

    def result(d: Deferred[Any]) -> Any:
        clock.advance(0)  # the end of the turn: the group commit
        return globals()["result"](d)

    def answered(check: Callable[[Store, Acceptor], bool]) -> None:
        sizes.append(os.path.getsize(path))
        checks.append(check)

    def holds(key: str, ballot: str) -> Callable[[Store, Acceptor], bool]:
        return lambda s, a: max(a.state(key)[0], a.floor) >= ballot

    def kept(key: str, proposal: Proposal) -> Callable[[Store, Acceptor], bool]:
        def check(s: Store, a: Acceptor) -> bool:
            accepted = a.state(key)[1]
            entry = s.entry(key)
            return (accepted is not None and accepted.ballot >= proposal.ballot) or (
                entry is not None and entry[1] >= proposal.version
            )

        return check

    assert result(acceptor.prepare("k", B1)).promised
    answered(holds("k", B1))
    assert result(acceptor.accept("k", Proposal(B1, "v" * 50, B1))) == (True, B1)
    answered(kept("k", Proposal(B1, "v", B1)))
    # The commit and the next round's prepare in one group: the promise's record forgets
    # the proposal (the store holds it), so only the order within the group keeps it.
    commit = store.apply_batch([["k", "v" * 50, B1]])
    promise = acceptor.batch([("k", B2), ("j", B2)])
    clock.advance(0)
    assert len(sizes) == 2 and os.path.getsize(path) > sizes[-1]
    result(commit)
    answer = result(promise)[0]
    assert answer.promised and answer.accepted is None
    assert acceptor.state("k") == (B2, None), "forgot the committed proposal at once"
    answered(lambda s, a: kept("k", Proposal(B1, "v", B1))(s, a) and holds("k", B2)(s, a) and holds("j", B2)(s, a))
    assert result(acceptor.batch([("j", Proposal(B2, None, B2)), ("k", Proposal(B2, "w", B2))])) == [(True, B2)] * 2
    answered(lambda s, a: kept("j", Proposal(B2, None, B2))(s, a) and kept("k", Proposal(B2, "w", B2))(s, a))


def test_a_crash_at_any_byte_loses_nothing_that_was_answered(tmp_path: Path, opened: list[Store]) -> None:
    live = tmp_path / "live"
    clock = Clock()
    store, acceptor = node(opened, live, later=clock.callLater)
    sizes: list[int] = []
    checks: list[Callable[[Store, Acceptor], bool]] = []
    _scenario(store, acceptor, clock, sizes, checks)
    store.abandon()
    whole = (live / journal_name(0)).read_bytes()
    assert len(whole) == sizes[-1]
    for cut in range(len(whole) + 1):
        directory = tmp_path / f"cut{cut}"
        shutil.copytree(live, directory)
        (directory / journal_name(0)).write_bytes(whole[:cut])
        s, a = node(opened, directory)
        for number, (size, check) in enumerate(zip(sizes, checks, strict=True)):
            if size <= cut:
                assert check(s, a), f"answered step {number} lost by a crash at byte {cut}"
        s.abandon()
        shutil.rmtree(directory)


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_a_crash_at_any_compaction_step_keeps_the_acceptor_state_still_needed(
    tmp_path: Path, opened: list[Store], step: str
) -> None:
    runner = ManualRunner()
    store, acceptor = node(opened, tmp_path, run=runner, write=synchronous)
    result(acceptor.accept("open", Proposal(B1, "o", B1)))  # accepted, never committed here
    result(acceptor.accept("done", Proposal(B2, "d", B2)))
    result(store.apply_batch([["done", "d", B2]]))

    def crash_at(name: str) -> None:
        if name == step:
            raise SimulatedCrash(name)

    store._step = crash_at
    store.compact()
    runner.run_one()  # the new journal is created, the acceptor's state taken; the snapshot job is queued
    assert acceptor.state("done") == ("", None) and acceptor.floor == B2, "committed: forgotten, in the floor"
    assert acceptor.state("open") == (B1, Proposal(B1, "o", B1))
    # Changes during the compaction go to the new journal.
    result(acceptor.prepare("new", B3))
    result(acceptor.accept("open", Proposal(B4, "o2", B4)))
    snapshot_job = runner.jobs.pop(0)
    if step != "before-snapshot":
        with pytest.raises(SimulatedCrash):
            snapshot_job[0]()
    store, again = restart(opened, store)
    assert again.state("open") == (B4, Proposal(B4, "o2", B4))
    assert again.state("new") == (B3, None)
    assert max(again.state("done")[0], again.floor) >= B2, "its promise holds, in the floor or its own"
    assert store.entry("done") == ("d", B2)
    if step in ("renamed", "dir-synced"):  # the new snapshot is in place: its floor
        assert again.floor == B2 and again.state("done") == ("", None)


def test_a_completed_compaction_writes_the_floor_and_kept_states_into_the_snapshot(
    tmp_path: Path, opened: list[Store]
) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.accept("open", Proposal(B1, "o", B1)))
    result(acceptor.accept("done", Proposal(B2, "d", B2)))
    result(store.apply_batch([["done", "d", B2]]))
    result(store.compact())
    assert not (tmp_path / journal_name(0)).exists(), "the old journal, with every acceptor record, is gone"
    assert b'"paxos":{"floor":"' + B2.encode() in (tmp_path / SNAPSHOT).read_bytes()
    store, again = restart(opened, store)
    assert again.floor == B2 and len(again) == 1
    assert again.state("open") == (B1, Proposal(B1, "o", B1))
    assert not result(again.prepare("done", B2)).promised, "the floor refuses what was promised before"


def test_a_store_opened_without_an_acceptor_keeps_its_state_through_a_compaction(
    tmp_path: Path, opened: list[Store]
) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.accept("open", Proposal(B1, "o", B1)))
    result(store.close())
    tool = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))  # kvd export, say
    opened.append(tool)
    result(tool.compact())
    store, again = restart(opened, tool)
    assert again.state("open") == (B1, Proposal(B1, "o", B1))


def test_a_torn_final_acceptor_record_is_dropped(tmp_path: Path, opened: list[Store]) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.prepare("k", B1))
    store.abandon()
    with open(tmp_path / journal_name(0), "ab") as f:
        f.write(b'["A","k","' + B2.encode() + b'","' + B2.encode())
    store, again = node(opened, tmp_path)
    assert again.state("k") == (B1, None)
    assert (tmp_path / journal_name(0)).read_bytes().endswith(b"]\n")


def test_a_damaged_acceptor_record_before_the_last_stops_start_up(tmp_path: Path, opened: list[Store]) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.prepare("k", B1))
    store.abandon()
    with open(tmp_path / journal_name(0), "ab") as f:
        f.write(b'["A","k","' + B2.encode() + b'"]\n["P","j","' + B1.encode() + b'"]\n')
    with pytest.raises(CorruptStore, match="refusing to start"):
        Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))


def _old_file(directory: Path) -> bytes:
    """
    A paxos.jsonl as a node before the change left it: a floor (a compaction folded "done",
    accepted and committed at B1, into it), an open proposal, a promise.
    """
    return write_paxos_jsonl(str(directory), [("open", B2, Proposal(B2, "o", B2)), ("promised", B3, None)], floor=B1)


def test_the_old_file_helper_writes_the_format_a_kvd_of_before_wrote_and_recover_reads_it(tmp_path: Path) -> None:
    """The migration tests' paxos.jsonl is byte for byte what a kvd of before wrote, and what L{recover} reads."""
    binary = typed_value(bytes(range(256)), "application/octet-stream")
    states = [
        ("open", B2, Proposal(B2, "o", B2)),
        ("promised", B3, None),
        ("gone", B3, Proposal(B3, None, B3)),  # a conditional DELETE
        ("bin", B1, Proposal(B1, binary, B1)),
        ("promised", B4, None),  # a later line of a key is its newer state
    ]
    data = write_paxos_jsonl(str(tmp_path), states, floor=B1)
    assert data == (tmp_path / FILE).read_bytes()
    lines = data.split(b"\n")
    assert lines[:4] == [
        b'{"floor":"' + B1.encode() + b'"}',
        b'{"k":"open","p":"' + B2.encode() + b'","a":["' + B2.encode() + b'","o","' + B2.encode() + b'"]}',
        b'{"k":"promised","p":"' + B3.encode() + b'"}',
        b'{"k":"gone","p":"' + B3.encode() + b'","a":["' + B3.encode() + b'",null,"' + B3.encode() + b'"]}',
    ], "the lines a kvd of before wrote (its _record and _floor_record, through wire_json)"
    assert lines[-1] == b"" and len(lines) == 7, "one line per state and the floor, each ending in a newline"
    recovered, floor, good, torn = recover(str(tmp_path / FILE))
    assert (floor, good, torn) == (B1, len(data), 0)
    assert {key: (state.promised, state.accepted) for key, state in recovered.items()} == {
        "open": (B2, Proposal(B2, "o", B2)),
        "promised": (B4, None),
        "gone": (B3, Proposal(B3, None, B3)),
        "bin": (B1, Proposal(B1, binary, B1)),
    }
    assert paxos_jsonl(states[1:2]) == lines[2] + b"\n", "no floor: no floor line"


def test_a_paxos_jsonl_of_before_is_carried_into_the_journal_then_removed(tmp_path: Path, opened: list[Store]) -> None:
    _old_file(tmp_path)
    journal = ManualRunner()
    store, acceptor = node(opened, tmp_path, write=journal)
    assert acceptor.floor == B1 and acceptor.state("open") == (B2, Proposal(B2, "o", B2))
    assert acceptor.state("promised") == (B3, None)
    assert (tmp_path / FILE).exists(), "kept until the journal holds its state durably"
    # A crash before that: the next start carries it over again.
    store, acceptor = restart(opened, store, write=journal)
    journal.jobs.clear()
    store, acceptor = restart(opened, store)
    assert not (tmp_path / FILE).exists()
    store, again = restart(opened, store)
    assert again.floor == B1 and again.state("open") == (B2, Proposal(B2, "o", B2))
    assert again.state("promised") == (B3, None)
    assert not result(again.prepare("done", B1)).promised


def test_a_paxos_jsonl_of_before_with_a_torn_last_line_is_carried_over_without_it(
    tmp_path: Path, opened: list[Store]
) -> None:
    write_paxos_jsonl(str(tmp_path), [("k", B1, None), ("k", B2, Proposal(B2, None, B2)), ("j", B3, None)])
    with open(tmp_path / FILE, "ab") as f:
        f.write(b'{"k": "k", "p": "018f0000')  # a crash mid-write
    store, acceptor = node(opened, tmp_path)
    assert acceptor.state("k") == (B2, Proposal(B2, None, B2)) and acceptor.state("j") == (B3, None)
    assert not result(acceptor.prepare("k", B1)).promised
    assert not (tmp_path / FILE).exists()
    store, again = restart(opened, store)
    assert again.state("k") == (B2, Proposal(B2, None, B2)) and again.state("j") == (B3, None)


def test_a_crash_after_the_migration_before_the_removal_keeps_the_journals_newer_state(
    tmp_path: Path, opened: list[Store]
) -> None:
    old = _old_file(tmp_path)
    store, acceptor = node(opened, tmp_path)
    assert not (tmp_path / FILE).exists()
    result(acceptor.accept("open", Proposal(B4, "newer", B4)))
    (tmp_path / FILE).write_bytes(old)  # as if the node died before the removal
    store, again = restart(opened, store)
    assert again.state("open") == (B4, Proposal(B4, "newer", B4)), "the journal's state wins over the old file's"
    assert again.state("promised") == (B3, None) and again.floor == B1
    assert not (tmp_path / FILE).exists()


def test_a_corrupt_paxos_jsonl_of_before_stops_start_up(tmp_path: Path, opened: list[Store]) -> None:
    (tmp_path / FILE).write_bytes(b'{"k": "k", "p": "x"}\nnot json\n{"k": "j", "p": "y"}\n')
    store = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))
    opened.append(store)
    with pytest.raises(CorruptStore) as raised:
        Acceptor.in_store(store)
    assert "byte 21" in str(raised.value) and "\n" not in str(raised.value), "one line, naming the record"
    assert (tmp_path / FILE).exists(), "nothing is removed"


def test_a_corrupt_paxos_jsonl_of_before_stops_start_up_and_leaves_its_temp_file_too(
    tmp_path: Path, opened: list[Store]
) -> None:
    (tmp_path / FILE).write_bytes(b'{"k": "k", "p": "x"}\nnot json\n{"k": "j", "p": "y"}\n')
    (tmp_path / "paxos.jsonl.tmp").write_bytes(b'{"k": "k", "p": "x"}\n')  # a compaction of before, cut short
    store = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))
    opened.append(store)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CorruptStore):
        Acceptor.in_store(store)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, "corruption touches nothing"


def test_memory_forgets_committed_keys_between_snapshots_and_the_journal_keeps_them(
    tmp_path: Path, opened: list[Store]
) -> None:
    store, acceptor = node(opened, tmp_path)
    acceptor._trim_at = 3
    for i in range(3):
        result(acceptor.accept(f"done{i}", Proposal(B1, "d", B1)))
        result(store.apply_batch([[f"done{i}", "d", B1]]))
    result(acceptor.accept("open", Proposal(B2, "o", B2)))  # past 3 states: trims first
    assert len(acceptor) == 1 and acceptor.floor == B1, "memory: the open proposal, the others in the floor"
    assert acceptor._trim_at >= 3 and acceptor.state("open") == (B2, Proposal(B2, "o", B2))
    assert not result(acceptor.prepare("done0", B1)).promised
    store, again = restart(opened, store)
    assert again.state("done0") == (B1, Proposal(B1, "d", B1)), "no snapshot yet: the journal still has it"
    assert again.floor == "" and again.state("open") == (B2, Proposal(B2, "o", B2))


def test_a_typed_value_s_proposal_survives_the_journal_a_snapshot_and_a_migration(
    tmp_path: Path, opened: list[Store]
) -> None:
    binary = typed_value(bytes(range(256)), "application/octet-stream")
    text = typed_value("héllo", "text/plain")
    store, acceptor = node(opened, tmp_path)
    result(acceptor.accept("bin", Proposal(B1, binary, B1)))
    result(acceptor.accept("text", Proposal(B1, text, B1)))
    store, again = restart(opened, store)
    assert again.state("bin") == (B1, Proposal(B1, binary, B1)) and again.state("text")[1] == Proposal(B1, text, B1)
    result(store.compact())
    store, again = restart(opened, store)
    assert again.state("bin") == (B1, Proposal(B1, binary, B1)) and again.state("text")[1] == Proposal(B1, text, B1)
    result(store.close())
    old = tmp_path / "old"
    old.mkdir()
    write_paxos_jsonl(str(old), [("bin", B2, Proposal(B2, binary, B2))])  # an acceptance of before
    store, migrated = node(opened, old)
    store, again = restart(opened, store)
    assert again.state("bin") == (B2, Proposal(B2, binary, B2)) and not (old / FILE).exists()


def _obligations_hold(
    store: Store, acceptor: Acceptor, promised: list[tuple[str, str]], accepted: list[tuple[str, Proposal]]
) -> str | None:
    """What an acceptor must never forget: each answered promise, each answered acceptance (or its commit)."""
    for key, ballot in promised:
        if max(acceptor.state(key)[0], acceptor.floor) < ballot:
            return f"forgot the promise of {ballot} for {key}"
    for key, proposal in accepted:
        held = acceptor.state(key)[1]
        entry = store.entry(key)
        if not ((held is not None and held.ballot >= proposal.ballot) or (entry and entry[1] >= proposal.version)):
            return f"forgot the acceptance of {proposal} for {key} (holds {held}, store {entry})"
        if max(acceptor.state(key)[0], acceptor.floor) < proposal.ballot:
            return f"forgot the promise of the acceptance {proposal} for {key}"
    return None


@pytest.mark.parametrize("seed", range(40))
def test_random_traffic_compactions_and_trims_with_a_crash_anywhere_lose_nothing_answered(
    tmp_path: Path, opened: list[Store], seed: int
) -> None:
    """
    Prepares, accepts, their commits (also in one turn with the next prepare), plain writes,
    compactions (small journals: many) and memory trims, with the journal's and the store's
    threads run in random order; a crash image of the data dir is taken between jobs and at
    every step of every snapshot (temp written, synced, renamed, dir synced: before the old
    journal is removed). Each image must recover every promise and acceptance answered
    before it, as must the live acceptor's memory throughout.
    """
    import random

    rng = random.Random(seed)
    clock, journal, threads = Clock(), ManualRunner(), ManualRunner()
    live = tmp_path / "live"
    store, acceptor = node(
        opened, live, later=clock.callLater, write=journal, run=threads, compact_min_bytes=rng.choice([300, 1000])
    )
    keys = ["a", "b", "c", "d"]
    promised: list[tuple[str, str]] = []
    accepted: list[tuple[str, Proposal]] = []
    issued: list[tuple[str, Proposal]] = []
    images: list[tuple[Path, int, int]] = []
    counter = iter(range(1, 1 << 20))

    def ballot() -> str:
        return f"018f{next(counter):010x}0000.gw{rng.randint(1, 3)}"

    def image(step: str = "") -> None:  # also the store's snapshot steps
        target = tmp_path / f"image{len(images)}"
        shutil.copytree(live, target, ignore=shutil.ignore_patterns("LOCK"))
        images.append((target, len(promised), len(accepted)))

    def on_prepare(key: str, b: str) -> Callable[[Any], None]:
        def done(answer: Any) -> None:
            if answer.promised:
                promised.append((key, b))

        return done

    def first(then: Callable[[Any], None]) -> Callable[[list[Any]], None]:
        return lambda answers: then(answers[0])

    def on_accept(key: str, proposal: Proposal) -> Callable[[Any], None]:
        def done(answer: Any) -> None:
            if answer[0]:
                accepted.append((key, proposal))

        return done

    store._step = image
    for _ in range(120):
        action = rng.random()
        key = rng.choice(keys)
        if action < 0.2:
            b = ballot()
            acceptor.prepare(key, b).addCallback(on_prepare(key, b))
        elif action < 0.4:
            proposal = Proposal(ballot(), rng.choice(["v", None, "w" * 30]), "")
            proposal = Proposal(proposal.ballot, proposal.value, proposal.ballot)
            issued.append((key, proposal))
            acceptor.accept(key, proposal).addCallback(on_accept(key, proposal))
        elif action < 0.5 and issued:
            # A commit, and at once (same turn, same group) the next round's prepare.
            k, proposal = rng.choice(issued)
            store.apply_batch([[k, proposal.value, proposal.version]])
            b = ballot()
            acceptor.batch([(k, b)]).addCallback(first(on_prepare(k, b)))
        elif action < 0.55:
            store.put(key, "plain")
        elif action < 0.6:
            store.compact()
        elif action < 0.63:
            acceptor.trim()
        elif action < 0.8 and journal.jobs:
            journal.run_one()
        elif action < 0.9 and threads.jobs:
            threads.run_one()
        elif action < 0.95:
            clock.advance(0)
        else:
            image()
        problem = _obligations_hold(store, acceptor, promised, accepted)
        assert problem is None, f"live memory: {problem}"
    image()
    store.abandon()
    assert images
    for directory, promises, acceptances in images:
        recovered, again = node(opened, directory)
        problem = _obligations_hold(recovered, again, promised[:promises], accepted[:acceptances])
        assert problem is None, f"{directory.name}: {problem}"
        recovered.abandon()


def test_a_failed_journal_write_answers_no_promise_and_the_failed_store_answers_none_after(
    tmp_path: Path, opened: list[Store]
) -> None:
    journal = ManualRunner()
    store, acceptor = node(opened, tmp_path, write=journal)
    first = acceptor.prepare("k", B1)
    _, d = journal.jobs.pop(0)

    def broken() -> None:
        raise OSError(28, "No space left on device")

    journal.jobs.insert(0, (broken, d))
    journal.run_one()
    assert isinstance(result(first).value, Exception), "the promise is not durable: no answer but an error"
    later = result(acceptor.batch([("k", B2), ("j", Proposal(B2, "v", B2))]))
    assert isinstance(later.value, Exception), "a failed store takes no more records: nothing is answered"
    assert not journal.jobs
    store, again = restart(opened, store)
    assert again.state("k") == ("", None) and again.state("j") == ("", None)
    assert result(again.prepare("k", B1)).promised, "nothing answered, nothing held"


def test_a_data_dir_of_before_with_a_format_3_snapshot_and_a_paxos_jsonl_keeps_both_through_compactions(
    tmp_path: Path, opened: list[Store]
) -> None:
    before = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))  # the store alone, as before
    opened.append(before)
    result(before.apply_batch([["done", "d", B1], ["x", "y", B2]]))
    result(before.compact())
    result(before.apply_batch([["after", "a", B2]]))
    result(before.close())
    assert (tmp_path / SNAPSHOT).read_bytes().startswith(b'{"kvd":3,'), "as the version before wrote it"
    _old_file(tmp_path)
    store, acceptor = node(opened, tmp_path)
    assert [store.entry(k) for k in ("done", "x", "after")] == [("d", B1), ("y", B2), ("a", B2)]
    assert acceptor.floor == B1 and acceptor.state("open") == (B2, Proposal(B2, "o", B2))
    assert not (tmp_path / FILE).exists()
    result(store.compact())
    assert (tmp_path / SNAPSHOT).read_bytes().startswith(b'{"kvd":4,')
    store, again = restart(opened, store)
    assert [store.entry(k) for k in ("done", "x", "after")] == [("d", B1), ("y", B2), ("a", B2)]
    assert again.floor >= B1 and again.state("open") == (B2, Proposal(B2, "o", B2))
    assert max(again.state("promised")[0], again.floor) >= B3
    assert not result(again.prepare("done", B1)).promised


def test_a_paxos_jsonl_whose_removal_failed_brings_back_no_proposal_a_compaction_forgot(
    tmp_path: Path, opened: list[Store]
) -> None:
    saved = write_paxos_jsonl(str(tmp_path), [("k", B1, Proposal(B1, "old", B1)), ("open", B2, None)])
    store, acceptor = node(opened, tmp_path)
    (tmp_path / FILE).write_bytes(saved)  # its removal failed: the file stays
    result(store.apply_batch([["k", "old", B1]]))
    result(store.compact())
    assert acceptor.state("k") == ("", None) and acceptor.floor == B2, "committed: forgotten, in the floor"
    result(store.drop("k", B1))  # the node no longer owns the key
    store, again = restart(opened, store)
    assert result(again.prepare("k", B4)).accepted is None, "the old proposal is not reported again"
    assert not result(again.prepare("open", B2)).promised


def test_a_restart_on_a_journal_of_many_committed_keys_starts_with_memory_trimmed(
    tmp_path: Path, opened: list[Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Else memory held every key the journal ever promised until it doubled, and a switch walked them all."""
    import kvd.paxos

    monkeypatch.setattr(kvd.paxos, "TRIM_MIN", 3)
    store, acceptor = node(opened, tmp_path)
    acceptor._trim_at = 1 << 30  # no trim before the restart
    for i in range(10):
        result(acceptor.accept(f"done{i}", Proposal(B1, "d", B1)))
        result(store.apply_batch([[f"done{i}", "d", B1]]))
    result(acceptor.accept("open", Proposal(B2, "o", B2)))
    assert len(acceptor) == 11
    store, again = restart(opened, store)
    assert len(again) == 1 and again.state("open") == (B2, Proposal(B2, "o", B2))
    assert again.floor == B1 and not result(again.prepare("done3", B1)).promised


@pytest.mark.parametrize(
    ("record", "named"),
    [
        (b'["P","k"]', "put, delete, drop or acceptor record"),
        (b'["P","k","b","c"]', "put, delete, drop or acceptor record"),
        (b'["A","k","b"]', "put, delete, drop or acceptor record"),
        (b'["F"]', "put, delete, drop or acceptor record"),
        (b'["A","k","b","b",5,"v"]', "kvd record"),
        (b'["F",1]', "kvd record"),
    ],
)
def test_a_malformed_acceptor_record_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, opened: list[Store], record: bytes, named: str
) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.prepare("k", B1))
    store.abandon()
    journal = tmp_path / journal_name(0)
    with open(journal, "ab") as f:
        f.write(record + b'\n["P","j","' + B1.encode() + b'"]\n')
    before = journal.read_bytes()
    with pytest.raises(CorruptStore) as raised:
        Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))
    message = str(raised.value)
    assert f"record 2 is not a {named}; refusing to start" in message and "\n" not in message, message
    assert journal.read_bytes() == before


def test_closing_the_store_lets_queued_promises_become_durable_and_answers_no_new_one(
    tmp_path: Path, opened: list[Store]
) -> None:
    clock = Clock()
    store, acceptor = node(opened, tmp_path, later=clock.callLater)
    queued = acceptor.batch([("k", B1), ("j", Proposal(B1, "v", B1))])
    closed = store.close()
    late = acceptor.prepare("k", B2)
    assert isinstance(result(late).value, Exception), "closing: no new promise is answered"
    assert not queued.called
    clock.advance(0)
    promise, acceptance = result(queued)
    assert promise.promised and acceptance == (True, B1)
    assert result(closed) is None
    store, again = node(opened, tmp_path)
    assert again.state("k") == (B1, None) and again.state("j") == (B1, Proposal(B1, "v", B1))
