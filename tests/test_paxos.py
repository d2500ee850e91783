"""
The Paxos acceptor's rules, at a node (L{Acceptor.in_store}: its records in its store's journal):
what it promises, refuses and accepts, what its floor refuses, that nothing is answered before
it is durable, and what survives a restart and a compaction.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from kvd.journal import journal_name
from kvd.paxos import FILE, Acceptor, Proposal
from kvd.store import Store
from kvd.testing.runners import ManualRunner
from kvd.versions import HybridClock, encode, milliseconds

B1, B2, B3 = "018f00000000000000.gw1", "018f00000000000001.gw2", "018f00000000000002.gw1"


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def node(
    opened: list[Store], directory: Path, now: Callable[[], float] | None = None, **kwargs: Any
) -> tuple[Store, Acceptor]:
    """A node's store and acceptor on C{directory}, as a (re)started node makes them."""
    store = Store.open(str(directory), clock=HybridClock(lambda: 1_700_000_000.0, "n"), **kwargs)
    opened.append(store)
    return store, Acceptor.in_store(store, now=now)


def restart(opened: list[Store], store: Store, **kwargs: Any) -> tuple[Store, Acceptor]:
    """The node dies (nothing more is written) and starts again on the same dir."""
    if not store._closed:
        store.abandon()
    return node(opened, Path(store.directory), **kwargs)


def journal_lines(directory: Path) -> list[bytes]:
    return (directory / journal_name(0)).read_bytes().splitlines()


def test_promises_only_higher_ballots(tmp_path: Path, opened: list[Store]) -> None:
    store, acceptor = node(opened, tmp_path)
    assert result(acceptor.prepare("k", B2)).promised
    refused = result(acceptor.prepare("k", B1))
    assert (refused.promised, refused.ballot) == (False, B2)
    assert not result(acceptor.prepare("k", B2)).promised, "the same ballot twice is refused"
    assert result(acceptor.prepare("other", B1)).promised, "promises are per key"


def test_accepts_only_ballots_at_least_the_promised_one(tmp_path: Path, opened: list[Store]) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.prepare("k", B2))
    assert result(acceptor.accept("k", Proposal(B1, "old", B1))) == (False, B2)
    assert result(acceptor.accept("k", Proposal(B2, "v", B2))) == (True, B2)
    assert result(acceptor.prepare("k", B3)).accepted == Proposal(B2, "v", B2)


def test_a_committed_proposal_is_not_reported(tmp_path: Path, opened: list[Store]) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.accept("k", Proposal(B1, "v", B1)))
    assert result(acceptor.prepare("k", B1)).accepted == Proposal(B1, "v", B1), "not committed yet: reported"
    result(store.apply_batch([["k", "v", B1]]))
    assert result(acceptor.prepare("k", B2)).accepted is None


def test_nothing_is_answered_before_it_is_durable(tmp_path: Path, opened: list[Store]) -> None:
    journal = ManualRunner()
    store, acceptor = node(opened, tmp_path, write=journal)
    before = journal_lines(tmp_path)
    first = acceptor.prepare("k", B1)
    second = acceptor.accept("j", Proposal(B2, "v", B2))
    third = acceptor.prepare("x", B1)
    assert not first.called and not second.called
    assert journal_lines(tmp_path) == before
    journal.run_one()
    assert first.called and not second.called and not third.called
    assert len(journal.jobs) == 1, "the records queued meanwhile go in one write"
    journal.run_one()
    assert second.called and third.called
    assert len(journal_lines(tmp_path)) == len(before) + 3


def test_a_node_without_conditional_writes_writes_nothing_for_its_acceptor(tmp_path: Path, opened: list[Store]) -> None:
    store = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"))
    opened.append(store)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    acceptor = Acceptor.in_store(store)
    assert not result(acceptor.batch([("k", "")]))[0].promised, "a refusal writes nothing either"
    result(store.close())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert not (tmp_path / FILE).exists()


def test_state_survives_a_restart_and_a_torn_last_record_is_dropped(tmp_path: Path, opened: list[Store]) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.prepare("k", B1))
    result(acceptor.accept("k", Proposal(B2, None, B2)))
    result(acceptor.prepare("j", B3))
    store.abandon()
    with open(tmp_path / journal_name(0), "ab") as f:
        f.write(b'["P","k","018f0000')
    store, again = node(opened, tmp_path)
    assert again.state("k") == (B2, Proposal(B2, None, B2))
    assert again.state("j") == (B3, None)
    assert not result(again.prepare("k", B1)).promised
    assert (tmp_path / journal_name(0)).read_bytes().endswith(b"]\n")


def test_compaction_forgets_committed_keys_and_keeps_their_promises_as_a_floor(
    tmp_path: Path, opened: list[Store]
) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.accept("done", Proposal(B2, "v", B2)))
    result(acceptor.accept("open", Proposal(B1, "w", B1)))
    result(store.apply_batch([["done", "v", B2]]))
    result(store.compact())
    assert acceptor.state("done") == ("", None)
    assert acceptor.state("open") == (B1, Proposal(B1, "w", B1))
    assert acceptor.floor == B2
    assert not result(acceptor.prepare("done", B1)).promised, "nothing below the floor is promised"
    store, again = restart(opened, store)
    assert (again.floor, again.state("open")) == (B2, (B1, Proposal(B1, "w", B1)))
    assert len(again) == 1


def test_compaction_forgets_a_proposal_whose_commit_is_only_in_the_stores_memory_as_the_snapshot_holds_it(
    tmp_path: Path, opened: list[Store]
) -> None:
    """
    The snapshot holds the store's memory as of the switch, commits not durable yet included:
    a crash before the snapshot is durable finds the proposal in the old journal, one after
    it finds the commit in the snapshot, the commit's own journal record never written.
    """
    clock, journal, threads = Clock(), ManualRunner(), ManualRunner()
    live = tmp_path / "live"
    store, acceptor = node(opened, live, later=clock.callLater, write=journal, run=threads)
    accepted = acceptor.accept("k", Proposal(B1, "v", B1))
    clock.advance(0)
    journal.run_one()
    assert result(accepted) == (True, B1)
    committing = store.apply_batch([["k", "v", B1]])
    assert store.entry("k") == ("v", B1) and not committing.called, "in memory; its journal write is queued"
    store.compact()
    threads.run_one()  # the switch to the next journal: the acceptor's state taken, the snapshot queued
    assert acceptor.state("k") == ("", None) and acceptor.floor == B1, "its commit is in the snapshot to be"
    assert not committing.called and len(journal.jobs) == 1, "the commit's record goes to the new journal"

    def crash_image(name: str) -> Path:
        image = tmp_path / name
        shutil.copytree(live, image, ignore=shutil.ignore_patterns("LOCK"))
        return image

    before_snapshot = crash_image("before-snapshot")
    threads.run_one()  # the snapshot is durable, the old journal removed
    assert not (live / journal_name(0)).exists()
    after_snapshot = crash_image("after-snapshot")
    s, a = node(opened, before_snapshot)
    assert a.state("k") == (B1, Proposal(B1, "v", B1)) and s.entry("k") is None, "the old journal's proposal"
    s, a = node(opened, after_snapshot)
    assert s.entry("k") == ("v", B1) and a.floor == B1 and a.state("k") == ("", None), "the snapshot's commit"
    journal.run_one()
    assert result(committing).applied == 1


def test_compaction_leaves_keys_promised_in_the_last_seconds_out_of_the_floor(
    tmp_path: Path, opened: list[Store]
) -> None:
    old = encode(milliseconds(B1) - 10_000, 0, "gw1")  # ten seconds before B1 and B2
    now = milliseconds(B2) / 1000 + 1.0  # B2 was promised a second ago
    store, acceptor = node(opened, tmp_path, now=lambda: now)
    result(acceptor.accept("old", Proposal(old, "v", old)))
    result(acceptor.accept("recent", Proposal(B2, "w", B2)))
    result(store.apply_batch([["old", "v", old], ["recent", "w", B2]]))  # both committed
    result(store.compact())
    assert acceptor.state("old") == ("", None) and acceptor.floor == old, "long committed: forgotten, in the floor"
    assert acceptor.state("recent") == (B2, Proposal(B2, "w", B2)), "promised a second ago: kept"
    # A round whose ballot was minted just before B2's (under way at another node, say) is not refused.
    assert result(acceptor.prepare("other", B1)).promised
    store, again = restart(opened, store, now=lambda: now)
    assert again.floor == old and again.state("recent") == (B2, Proposal(B2, "w", B2)), "so the snapshot holds"


def test_a_batch_of_promises_and_acceptances_is_one_write_answered_only_once_durable(
    tmp_path: Path, opened: list[Store]
) -> None:
    journal = ManualRunner()
    store, acceptor = node(opened, tmp_path, write=journal)
    before = len(journal_lines(tmp_path))
    promises = acceptor.batch([(f"k{i}", B2) for i in range(50)] + [("k0", B1)])
    assert len(journal.jobs) == 1 and not promises.called, "one write for the whole batch, not yet answered"
    journal.run_one()
    answers = result(promises)
    assert [p.promised for p in answers] == [True] * 50 + [False]
    assert answers[-1].ballot == B2, "a later item of the batch sees what an earlier one promised"
    accepted = acceptor.batch(
        [(f"k{i}", Proposal(B2, f"v{i}", B2)) for i in range(50)] + [("k1", Proposal(B1, "x", B1))]
    )
    assert len(journal.jobs) == 1 and not accepted.called
    journal.run_one()
    assert result(accepted) == [(True, B2)] * 50 + [(False, B2)]
    assert not journal.jobs, "two batches, two writes"
    assert len(journal_lines(tmp_path)) == before + 100


def test_a_batch_only_of_refusals_answers_at_once_and_writes_nothing(tmp_path: Path, opened: list[Store]) -> None:
    journal = ManualRunner()
    store, acceptor = node(opened, tmp_path, write=journal)
    first = acceptor.batch([("k", B2)])
    refused = acceptor.batch([("k", B1), ("k", B2)])
    assert [p.promised for p in result(refused)] == [False, False], "refusing needs nothing durable"
    assert len(journal.jobs) == 1 and not first.called
    journal.run_one()
    assert result(first)[0].promised


def test_a_crash_before_a_batch_is_durable_loses_the_whole_batch_and_nothing_was_answered(
    tmp_path: Path, opened: list[Store]
) -> None:
    store, acceptor = node(opened, tmp_path)
    result(acceptor.batch([("k", B1)]))
    journal = ManualRunner()
    store, acceptor = restart(opened, store, write=journal)
    promises = acceptor.batch([("k", B2), ("j", B2)])
    accepted = acceptor.batch([("k", Proposal(B2, "v", B2))])
    assert not promises.called and not accepted.called
    # The process dies here: the jobs never run. What recovers is what was durable.
    store, again = restart(opened, store)
    assert again.state("k") == (B1, None) and again.state("j") == ("", None)
    # A batch that was answered recovers whole.
    assert all(p.promised for p in result(again.batch([("k", B3), ("j", B3)])))
    assert result(again.batch([("k", Proposal(B3, "w", B3))])) == [(True, B3)]
    result(store.close())
    store, last = restart(opened, store)
    assert last.state("k") == (B3, Proposal(B3, "w", B3)) and last.state("j") == (B3, None)


def test_prepares_and_accepts_mixed_in_one_batch_are_one_write_taken_in_order(
    tmp_path: Path, opened: list[Store]
) -> None:
    journal = ManualRunner()
    store, acceptor = node(opened, tmp_path, write=journal)
    answers = acceptor.batch([("k", B1), ("k", Proposal(B1, "v", B1)), ("k", B2), ("k", Proposal(B1, "late", B1))])
    assert len(journal.jobs) == 1 and not answers.called
    journal.run_one()
    first, accepted, second, refused = result(answers)
    assert first.promised and accepted == (True, B1) and refused == (False, B2)
    assert second.promised and second.accepted == Proposal(B1, "v", B1)
    result(store.close())
    store, again = restart(opened, store)
    assert again.state("k") == (B2, Proposal(B1, "v", B1))


def test_a_promise_forgets_a_proposal_its_store_holds_even_only_in_memory_and_its_record_carries_no_value(
    tmp_path: Path, opened: list[Store]
) -> None:
    """
    Else every prepare of a key would write its last value again. The commit's record is
    ahead of the promise's in the one journal, so a crash that keeps the promise keeps the
    commit (tests/test_paxos_journal.py cuts the journal at every byte of such a group).
    """
    clock, journal = Clock(), ManualRunner()
    store, acceptor = node(opened, tmp_path, later=clock.callLater, write=journal)
    accepted = acceptor.accept("k", Proposal(B1, "v" * 1000, B1))
    clock.advance(0)
    journal.run_one()
    assert result(accepted) == (True, B1)
    committing = store.apply_batch([["k", "v" * 1000, B1]])
    promise = acceptor.prepare("k", B2)
    assert not committing.called, "in memory; its journal write is queued"
    assert acceptor.state("k") == (B2, None), "forgotten at once: the store holds it"
    size = (tmp_path / journal_name(0)).stat().st_size
    clock.advance(0)
    assert len(journal.jobs) == 1, "the commit and the promise: one write"
    journal.run_one()
    answer = result(promise)
    assert answer.promised and answer.accepted is None and result(committing).applied == 1
    written = journal_lines(tmp_path)
    assert written[-1] == b'["P","k","' + B2.encode() + b'"]', "the promise's record holds the promise only"
    assert (tmp_path / journal_name(0)).stat().st_size - size < 1100, "the value once, in the commit's record"
    promise = acceptor.batch([("k", B3)])  # the commit durable now
    clock.advance(0)
    journal.run_one()
    answer = result(promise)[0]
    assert answer.promised and answer.accepted is None
    assert journal_lines(tmp_path)[-1] == b'["P","k","' + B3.encode() + b'"]'
    store, again = restart(opened, store)
    assert again.state("k") == (B3, None) and store.entry("k") == ("v" * 1000, B1)
