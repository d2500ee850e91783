"""The Paxos acceptor's rules, its durability and its recovery from paxos.jsonl."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from kvd.journal import CorruptStore
from kvd.paxos import FILE, Acceptor, Proposal, committed_in
from kvd.store import Store
from kvd.testing.runners import ManualRunner
from kvd.versions import HybridClock, encode, milliseconds

B1, B2, B3 = "018f00000000000000.gw1", "018f00000000000001.gw2", "018f00000000000002.gw1"


def never(key: str, version: str) -> bool:
    return False


def result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    return out[0]


def test_promises_only_higher_ballots(tmp_path: Path) -> None:
    acceptor = Acceptor.open(str(tmp_path), never)
    assert result(acceptor.prepare("k", B2)).promised
    refused = result(acceptor.prepare("k", B1))
    assert (refused.promised, refused.ballot) == (False, B2)
    assert not result(acceptor.prepare("k", B2)).promised, "the same ballot twice is refused"
    assert result(acceptor.prepare("other", B1)).promised, "promises are per key"


def test_accepts_only_ballots_at_least_the_promised_one(tmp_path: Path) -> None:
    acceptor = Acceptor.open(str(tmp_path), never)
    result(acceptor.prepare("k", B2))
    assert result(acceptor.accept("k", Proposal(B1, "old", B1))) == (False, B2)
    assert result(acceptor.accept("k", Proposal(B2, "v", B2))) == (True, B2)
    assert result(acceptor.prepare("k", B3)).accepted == Proposal(B2, "v", B2)


def test_a_committed_proposal_is_not_reported(tmp_path: Path) -> None:
    committed: set[str] = set()
    acceptor = Acceptor.open(str(tmp_path), lambda key, version: version in committed)
    result(acceptor.accept("k", Proposal(B1, "v", B1)))
    committed.add(B1)
    assert result(acceptor.prepare("k", B2)).accepted is None


def test_nothing_is_answered_before_it_is_durable(tmp_path: Path) -> None:
    runner = ManualRunner()
    acceptor = Acceptor.open(str(tmp_path), never, run=runner)
    first = acceptor.prepare("k", B1)
    second = acceptor.accept("j", Proposal(B2, "v", B2))
    third = acceptor.prepare("x", B1)
    assert not first.called and not second.called
    assert not os.path.exists(tmp_path / FILE)
    runner.run_one()
    assert first.called and not second.called and not third.called
    assert len(runner.jobs) == 1, "the records queued meanwhile go in one write"
    runner.run_one()
    assert second.called and third.called
    assert len((tmp_path / FILE).read_bytes().splitlines()) == 3


def test_a_node_without_conditional_writes_writes_no_file(tmp_path: Path) -> None:
    Acceptor.open(str(tmp_path), never)
    assert os.listdir(tmp_path) == []


def test_state_survives_a_restart_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    acceptor = Acceptor.open(str(tmp_path), never)
    result(acceptor.prepare("k", B1))
    result(acceptor.accept("k", Proposal(B2, None, B2)))
    result(acceptor.prepare("j", B3))
    acceptor.close()
    with open(tmp_path / FILE, "ab") as f:
        f.write(b'{"k": "k", "p": "018f0000')
    again = Acceptor.open(str(tmp_path), never)
    assert again.state("k") == (B2, Proposal(B2, None, B2))
    assert again.state("j") == (B3, None)
    assert not result(again.prepare("k", B1)).promised
    assert (tmp_path / FILE).read_bytes().endswith(b"}\n")


def test_other_corruption_stops_start_up_with_one_line(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b'{"k": "k", "p": "x"}\nnot json\n{"k": "j", "p": "y"}\n')
    with pytest.raises(CorruptStore) as raised:
        Acceptor.open(str(tmp_path), never)
    assert "byte 21" in str(raised.value) and "\n" not in str(raised.value)


def test_compaction_forgets_committed_keys_and_keeps_their_promises_as_a_floor(tmp_path: Path) -> None:
    committed: set[str] = set()
    acceptor = Acceptor.open(str(tmp_path), lambda key, version: version in committed)
    result(acceptor.accept("done", Proposal(B2, "v", B2)))
    result(acceptor.accept("open", Proposal(B1, "w", B1)))
    committed.add(B2)
    acceptor.compact_min_bytes = 0
    result(acceptor.prepare("new", B1))  # the write that compacts
    assert len((tmp_path / FILE).read_bytes().splitlines()) == 2, "the floor and the open proposal"
    assert acceptor.state("done") == ("", None)
    assert acceptor.state("open") == (B1, Proposal(B1, "w", B1))
    assert acceptor.floor == B2
    assert not result(acceptor.prepare("done", B1)).promised, "nothing below the floor is promised"
    acceptor.close()
    again = Acceptor.open(str(tmp_path), never)
    assert (again.floor, again.state("open")) == (B2, (B1, Proposal(B1, "w", B1)))
    assert len(again) == 1


def test_compaction_keeps_a_proposal_whose_commit_is_only_in_the_stores_memory(tmp_path: Path) -> None:
    journal = ManualRunner()
    store = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"), write=journal)
    acceptor = Acceptor.open(str(tmp_path), committed_in(store), unsettled=store.unsettled)
    result(acceptor.accept("k", Proposal(B1, "v", B1)))
    committing = store.apply_batch([["k", "v", B1]])
    assert store.entry("k") == ("v", B1) and not committing.called, "in memory; its journal write is under way"
    acceptor.compact_min_bytes = 0
    result(acceptor.prepare("other", B2))  # the write that compacts, durable now
    assert acceptor.state("k") == (B1, Proposal(B1, "v", B1)), "its commit is not durable: the proposal stays"
    # Were the node to die here, before the store's journal write, the proposal is on disk.
    assert Acceptor.open(str(tmp_path), never).state("k") == (B1, Proposal(B1, "v", B1))
    # Once the commit is durable, the next compaction forgets the key.
    journal.run_one()
    assert committing.called and not store.unsettled()
    acceptor.compact_min_bytes = 0
    result(acceptor.prepare("more", B3))
    assert acceptor.state("k") == ("", None) and acceptor.floor == B3
    acceptor.close()
    store.abandon()


def test_compaction_leaves_keys_promised_in_the_last_seconds_out_of_the_floor(tmp_path: Path) -> None:
    old = encode(milliseconds(B1) - 10_000, 0, "gw1")  # ten seconds before B1 and B2
    committed = {old, B2}
    now = milliseconds(B2) / 1000 + 1.0  # B2 was promised a second ago
    acceptor = Acceptor.open(str(tmp_path), lambda key, version: version in committed, now=lambda: now)
    result(acceptor.accept("old", Proposal(old, "v", old)))
    result(acceptor.accept("recent", Proposal(B2, "w", B2)))
    acceptor.compact_min_bytes = 0
    result(acceptor.prepare("new", B3))  # the write that compacts
    assert acceptor.state("old") == ("", None) and acceptor.floor == old, "long committed: forgotten, in the floor"
    assert acceptor.state("recent") == (B2, Proposal(B2, "w", B2)), "promised a second ago: kept"
    # A round whose ballot was minted just before B2's (under way at another node, say) is not refused.
    assert result(acceptor.prepare("other", B1)).promised
    acceptor.close()


def test_a_batch_of_promises_and_acceptances_is_one_write_answered_only_once_durable(tmp_path: Path) -> None:
    runner = ManualRunner()
    acceptor = Acceptor.open(str(tmp_path), never, run=runner)
    promises = acceptor.batch([(f"k{i}", B2) for i in range(50)] + [("k0", B1)])
    assert len(runner.jobs) == 1 and not promises.called, "one write for the whole batch, not yet answered"
    runner.run_one()
    answers = result(promises)
    assert [p.promised for p in answers] == [True] * 50 + [False]
    assert answers[-1].ballot == B2, "a later item of the batch sees what an earlier one promised"
    accepted = acceptor.batch(
        [(f"k{i}", Proposal(B2, f"v{i}", B2)) for i in range(50)] + [("k1", Proposal(B1, "x", B1))]
    )
    assert len(runner.jobs) == 1 and not accepted.called
    runner.run_one()
    assert result(accepted) == [(True, B2)] * 50 + [(False, B2)]
    assert not runner.jobs, "two batches, two writes"
    assert len((tmp_path / FILE).read_bytes().splitlines()) == 100


def test_a_batch_only_of_refusals_answers_at_once_and_writes_nothing(tmp_path: Path) -> None:
    runner = ManualRunner()
    acceptor = Acceptor.open(str(tmp_path), never, run=runner)
    first = acceptor.batch([("k", B2)])
    refused = acceptor.batch([("k", B1), ("k", B2)])
    assert [p.promised for p in result(refused)] == [False, False], "refusing needs nothing durable"
    assert len(runner.jobs) == 1 and not first.called
    runner.run_one()
    assert result(first)[0].promised


def test_a_crash_before_a_batch_is_durable_loses_the_whole_batch_and_nothing_was_answered(tmp_path: Path) -> None:
    result(Acceptor.open(str(tmp_path), never).batch([("k", B1)]))
    runner = ManualRunner()
    acceptor = Acceptor.open(str(tmp_path), never, run=runner)
    promises = acceptor.batch([("k", B2), ("j", B2)])
    accepted = acceptor.batch([("k", Proposal(B2, "v", B2))])
    assert not promises.called and not accepted.called
    # The process dies here: the jobs never run. What recovers is what was durable.
    again = Acceptor.open(str(tmp_path), never)
    assert again.state("k") == (B1, None) and again.state("j") == ("", None)
    # A batch that was answered recovers whole.
    assert all(p.promised for p in result(again.batch([("k", B3), ("j", B3)])))
    assert result(again.batch([("k", Proposal(B3, "w", B3))])) == [(True, B3)]
    again.close()
    last = Acceptor.open(str(tmp_path), never)
    assert last.state("k") == (B3, Proposal(B3, "w", B3)) and last.state("j") == (B3, None)


def test_prepares_and_accepts_mixed_in_one_batch_are_one_write_taken_in_order(tmp_path: Path) -> None:
    runner = ManualRunner()
    acceptor = Acceptor.open(str(tmp_path), never, run=runner)
    answers = acceptor.batch([("k", B1), ("k", Proposal(B1, "v", B1)), ("k", B2), ("k", Proposal(B1, "late", B1))])
    assert len(runner.jobs) == 1 and not answers.called
    runner.run_one()
    first, accepted, second, refused = result(answers)
    assert first.promised and accepted == (True, B1) and refused == (False, B2)
    assert second.promised and second.accepted == Proposal(B1, "v", B1)
    acceptor.close()
    assert Acceptor.open(str(tmp_path), never).state("k") == (B2, Proposal(B1, "v", B1))


def test_a_promise_forgets_a_proposal_its_store_holds_durably_and_keeps_one_it_holds_only_in_memory(
    tmp_path: Path,
) -> None:
    # Else every prepare of a key would write its last value again to paxos.jsonl.
    journal = ManualRunner()
    store = Store.open(str(tmp_path), clock=HybridClock(lambda: 1_700_000_000.0, "n"), write=journal)
    acceptor = Acceptor.open(str(tmp_path), committed_in(store), unsettled=store.unsettled)
    result(acceptor.accept("k", Proposal(B1, "v" * 1000, B1)))
    committing = store.apply_batch([["k", "v" * 1000, B1]])
    assert not committing.called, "in memory; its journal write is under way"
    size = (tmp_path / FILE).stat().st_size
    result(acceptor.prepare("k", B2))
    assert acceptor.state("k") == (B2, Proposal(B1, "v" * 1000, B1)), "its commit is not durable: the proposal stays"
    assert (tmp_path / FILE).stat().st_size > 2 * size - 100, "the promise's record holds it too"
    assert Acceptor.open(str(tmp_path), never).state("k") == (B2, Proposal(B1, "v" * 1000, B1))
    journal.run_one()
    assert committing.called and not store.unsettled()
    size = (tmp_path / FILE).stat().st_size
    promise = result(acceptor.batch([("k", B3)]))[0]
    assert promise.promised and promise.accepted is None
    assert acceptor.state("k") == (B3, None)
    assert (tmp_path / FILE).stat().st_size - size < 100, "the record holds the promise only"
    assert Acceptor.open(str(tmp_path), never).state("k") == (B3, None)
    acceptor.close()
    store.abandon()


def test_the_old_file_helper_writes_what_acceptor_open_writes(tmp_path: Path) -> None:
    """While both exist: kvd.testing.paxos_jsonl writes the bytes the acceptor's own file held."""
    from kvd.testing.paxos_jsonl import paxos_jsonl

    B4 = "018f00000000000004.gw1"
    # test_paxos_journal._old_file: a compaction folded "done" into the floor.
    committed = {B1}
    (tmp_path / "a").mkdir()
    old = Acceptor.open(str(tmp_path / "a"), lambda key, version: version in committed)
    result(old.accept("done", Proposal(B1, "d", B1)))
    old.compact_min_bytes = 0
    result(old.accept("open", Proposal(B2, "o", B2)))
    old.compact_min_bytes = 1 << 30
    result(old.prepare("promised", B3))
    old.close()
    assert (tmp_path / "a" / FILE).read_bytes() == paxos_jsonl(
        [("open", B2, Proposal(B2, "o", B2)), ("promised", B3, None)], floor=B1
    )
    # A promise, an acceptance over it, a deletion, a typed value, a later promise.
    from kvd.keys import typed_value

    binary = typed_value(bytes(range(256)), "application/octet-stream")
    (tmp_path / "b").mkdir()
    old = Acceptor.open(str(tmp_path / "b"), never)
    result(old.prepare("j", B2))
    result(old.accept("k", Proposal(B2, "v", B2)))
    result(old.accept("gone", Proposal(B3, None, B3)))
    result(old.accept("bin", Proposal(B1, binary, B1)))
    result(old.prepare("j", B4))
    old.close()
    assert (tmp_path / "b" / FILE).read_bytes() == paxos_jsonl(
        [
            ("j", B2, None),
            ("k", B2, Proposal(B2, "v", B2)),
            ("gone", B3, Proposal(B3, None, B3)),
            ("bin", B1, Proposal(B1, binary, B1)),
            ("j", B4, None),
        ]
    )
