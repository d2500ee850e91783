"""The node's store: durability, group commit, recovery and compaction, with no reactor."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kvd.digests import Digests
from kvd.incarnation import next_incarnation
from kvd.journal import SNAPSHOT, SNAPSHOT_TMP, journal_name, pack
from kvd.store import (
    BadBatch,
    CorruptStore,
    Store,
    StoreClosed,
    StoreError,
    StoreFailed,
    StoreLocked,
)
from kvd.testing.runners import ManualRunner
from kvd.versions import HybridClock, encode


def clock(origin: str = "n1") -> HybridClock:
    return HybridClock(time.time, origin)


class SimulatedCrash(Exception):
    pass


def fired(d: Deferred[Any]) -> bool:
    results: list[object] = []
    d.addBoth(lambda r: results.append(r) or r)
    return bool(results)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def open_store(opened: list[Store], directory: Path, **kwargs: Any) -> Store:
    kwargs.setdefault("clock", clock())
    store = Store.open(str(directory), **kwargs)
    opened.append(store)
    return store


def reopen(opened: list[Store], store: Store, **kwargs: Any) -> Store:
    """Reopen a store's dir as a process restarted after a crash would."""
    if not store._closed:
        store.abandon()
    return open_store(opened, Path(store.directory), **kwargs)


def test_acknowledged_writes_survive_a_crash(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    assert fired(store.put("a", "1"))
    assert fired(store.put("b", "2"))
    assert fired(store.put("a", "3"))
    deleted = store.delete("b")
    assert deleted is not None and fired(deleted)
    store = reopen(opened, store)
    assert dict(store.items()) == {"a": "3"}


def test_delete_of_an_absent_key_writes_nothing(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    assert store.delete("nope") is None
    assert (tmp_path / journal_name(0)).read_bytes() == b""


def test_a_write_is_acknowledged_only_once_durable(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    d = store.put("k", "v")
    assert store.get("k") == "v", "reads see the write at once"
    assert not fired(d)
    assert (tmp_path / journal_name(0)).read_bytes() == b""
    runner.run_all()
    assert fired(d)
    assert b'"k"' in (tmp_path / journal_name(0)).read_bytes()


def test_writes_arriving_during_a_commit_share_the_next_one(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    first = store.put("k0", "v")
    waiting = [store.put(f"k{i}", "v") for i in range(1, 33)]
    assert len(runner.jobs) == 1, "one write in flight; the rest wait"
    runner.run_one()
    assert fired(first) and not any(fired(d) for d in waiting)
    assert len(runner.jobs) == 1, "the 32 waiting writes go out in one write + fsync"
    runner.run_one()
    assert all(fired(d) for d in waiting)
    assert not runner.jobs


def test_torn_final_record_is_dropped_and_later_writes_are_kept(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    store.put("a", "1")
    store.abandon()
    with open(tmp_path / journal_name(0), "ab") as f:
        f.write(b'["p","b","tor')
    store = reopen(opened, store)
    assert dict(store.items()) == {"a": "1"}
    store.put("c", "3")
    store = reopen(opened, store)
    assert dict(store.items()) == {"a": "1", "c": "3"}


def test_unparseable_final_line_counts_as_torn(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    store.put("a", "1")
    store.abandon()
    with open(tmp_path / journal_name(0), "ab") as f:
        f.write(b"\x00\x00\x00\x00\n")
    store = reopen(opened, store)
    assert dict(store.items()) == {"a": "1"}


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: _insert_line(d / journal_name(0), 0, b"garbage"), id="journal-middle"),
        pytest.param(lambda d: _insert_line(d / journal_name(0), 1, b'["q","a"]'), id="journal-unknown-record"),
        pytest.param(lambda d: (d / SNAPSHOT).write_bytes(b'{"kvd": 1, "generation": 0, "da'), id="snapshot-cut"),
        pytest.param(lambda d: (d / SNAPSHOT).write_bytes(b'{"hello": "world"}'), id="snapshot-foreign"),
        pytest.param(lambda d: (d / journal_name(7)).write_bytes(b""), id="journal-gap"),
    ],
)
def test_corruption_stops_start_up_and_changes_no_file(
    tmp_path: Path, opened: list[Store], damage: Callable[[Path], None]
) -> None:
    store = open_store(opened, tmp_path)
    store.put("a", "1")
    store.put("b", "2")
    store.abandon()
    damage(tmp_path)
    before = files(tmp_path)
    with pytest.raises(CorruptStore) as e:
        Store.open(str(tmp_path), clock=clock())
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)
    assert files(tmp_path) == before


def _insert_line(path: Path, position: int, line: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines.insert(position, line)
    path.write_bytes(b"\n".join(lines))


def test_a_second_process_cannot_take_the_data_dir(tmp_path: Path, opened: list[Store]) -> None:
    open_store(opened, tmp_path)
    with pytest.raises(StoreLocked, match="in use"):
        Store.open(str(tmp_path), clock=clock())


def test_a_failed_journal_write_fails_the_put_and_every_later_write(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    store.put("kept", "old")
    runner.run_all()
    d = store.put("a", "1")
    store.put("kept", "new")
    store.delete("kept")
    os.close(store._journal_fd)
    store._journal_fd = os.open(os.devnull, os.O_RDONLY)  # writes now fail with EBADF
    runner.run_all()
    errors: list[Failure] = []
    d.addErrback(errors.append)
    assert errors and errors[0].check(StoreFailed)
    assert dict(store.items()) == {"kept": "old"}, "no write that failed stays readable"
    later: list[Failure] = []
    store.put("b", "2").addErrback(later.append)
    assert later and later[0].check(StoreFailed)


def test_compaction_writes_a_snapshot_and_drops_the_old_journal(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path, compact_min_bytes=200)
    for i in range(50):
        store.put(f"key{i}", "x" * 20)
    assert store.generation >= 1
    assert (tmp_path / SNAPSHOT).exists()
    journals = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("journal-"))
    assert journals == [journal_name(store.generation)]
    store = reopen(opened, store)
    assert dict(store.items()) == {f"key{i}": "x" * 20 for i in range(50)}


def test_journal_stays_bounded_by_the_snapshot_under_overwrites(tmp_path: Path, opened: list[Store]) -> None:
    """Cost per write stays flat: the journal never grows far past the snapshot."""
    store = open_store(opened, tmp_path, compact_min_bytes=1000)
    for i in range(5000):
        store.put(f"key{i % 100}", str(i))
    assert store.journal_bytes <= max(os.path.getsize(tmp_path / SNAPSHOT), 1000) + 100


CRASH_STEPS = ["before-snapshot", "written", "synced", "renamed", "dir-synced"]


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_a_crash_at_any_compaction_step_recovers_the_same_state(tmp_path: Path, opened: list[Store], step: str) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    expected: dict[str, str] = {}
    for i in range(20):
        store.put(f"k{i}", f"v{i}")
        expected[f"k{i}"] = f"v{i}"
    runner.run_all()

    def crash_at(name: str) -> None:
        if name == step:
            raise SimulatedCrash(name)

    store._step = crash_at
    store.compact()
    runner.run_one()  # the new journal is created; the snapshot job is queued
    # Writes during compaction land in the new journal.
    store.put("k0", "changed")
    store.delete("k1")
    expected["k0"] = "changed"
    del expected["k1"]
    snapshot_job = runner.jobs.pop(0)
    runner.run_all()
    if step != "before-snapshot":
        with pytest.raises(SimulatedCrash):
            snapshot_job[0]()
    store = reopen(opened, store)
    assert dict(store.items()) == expected
    assert not (tmp_path / SNAPSHOT_TMP).exists()
    store.put("after", "crash")
    store = reopen(opened, store)
    assert dict(store.items()) == {**expected, "after": "crash"}


def test_writes_after_close_are_refused_but_pending_ones_complete(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    pending = store.put("a", "1")
    store.close()
    refused: list[Failure] = []
    store.put("b", "2").addErrback(refused.append)
    assert refused and refused[0].check(StoreClosed)
    runner.run_all()
    assert fired(pending)
    store = open_store(opened, tmp_path)
    assert dict(store.items()) == {"a": "1"}


def test_close_waits_for_pending_writes(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    d = store.put("a", "1")
    closed = store.close()
    assert not fired(closed)
    runner.run_all()
    assert fired(d) and fired(closed)
    store = open_store(opened, tmp_path)
    assert store.get("a") == "1"


keys = st.sampled_from(["a", "b", "c", "ключ", "a b", "\U0001f511", 'q"uote'])
values = st.text(max_size=20)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), keys, values),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("compact")),
        st.tuples(st.just("reopen")),
    ),
    max_size=40,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(operations)
def test_any_history_reopened_equals_a_model_dict(tmp_path_factory: pytest.TempPathFactory, ops: list[Any]) -> None:
    directory = tmp_path_factory.mktemp("store")
    stores: list[Store] = []
    store = open_store(stores, directory, compact_min_bytes=64)
    model: dict[str, str] = {}
    try:
        for op in ops:
            if op[0] == "put":
                assert fired(store.put(op[1], op[2]))
                model[op[1]] = op[2]
            elif op[0] == "delete":
                d = store.delete(op[1])
                assert (d is None) == (op[1] not in model)
                model.pop(op[1], None)
            elif op[0] == "compact":
                assert fired(store.compact())
            else:
                store = reopen(stores, store)
            assert dict(store.items()) == model
        store = reopen(stores, store)
        assert dict(store.items()) == model
    finally:
        for s in stores:
            if not s._closed:
                s.abandon()


def test_a_corrupt_incarnation_file_stops_start_up_before_any_file_is_created(tmp_path: Path) -> None:
    (tmp_path / "incarnation").write_bytes(b"lots\n")
    with pytest.raises(CorruptStore, match="incarnation"):
        Store.open(str(tmp_path), clock=clock())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LOCK", "incarnation"]


def test_incarnations_count_up_across_starts(tmp_path: Path) -> None:
    assert [next_incarnation(str(tmp_path)) for _ in range(3)] == [1, 2, 3]


def test_a_data_dir_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store.open(str(tmp_path / "file"), clock=clock())


def test_replicated_writes_keep_the_highest_version_whatever_the_order(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    newer, older = "0000000000020000000.gw", "0000000000010000000.gw"
    assert store.apply("k", "new", newer) is not None
    assert store.apply("k", "old", older) is None, "an older write changes nothing"
    assert store.apply("k", "new", newer) is None, "the same write twice is written once"
    assert store.entry("k") == ("new", newer)
    store = reopen(opened, store)
    assert store.entry("k") == ("new", newer)


def test_a_delete_leaves_a_tombstone_that_survives_restarts_and_beats_older_writes(
    tmp_path: Path, opened: list[Store]
) -> None:
    store = open_store(opened, tmp_path)
    store.apply("k", "v", "0000000000010000000.gw")
    store.apply("k", None, "0000000000030000000.gw")
    assert store.get("k") is None and len(store) == 0
    assert store.apply("k", "late", "0000000000020000000.gw") is None
    store = reopen(opened, store)
    assert store.entry("k") == (None, "0000000000030000000.gw") and len(store) == 0
    store.compact()
    store = reopen(opened, store)
    assert store.entry("k") == (None, "0000000000030000000.gw")


def test_drop_forgets_a_key_only_at_the_version_it_was_told(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    store.apply("k", "v", "0000000000010000000.gw")
    assert store.drop("k", "0000000000000000000.gw") is None
    assert store.drop("k", "0000000000010000000.gw") is not None
    assert store.entry("k") is None
    store = reopen(opened, store)
    assert store.entry("k") is None


def test_digests_track_every_change_and_match_a_fresh_count(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    before = store.digests()
    store.apply("a", "1", "0000000000010000000.gw")
    store.apply("b", None, "0000000000010000000.gw")
    store.put("c", "3")
    store.drop("a", "0000000000010000000.gw")
    kept = store.digests()
    assert kept != before
    store = reopen(opened, store)
    assert store.digests() == kept, "recomputed from disk, the same"
    versions, tombstones = store.versions_in(set(range(256)))
    assert versions == {"b": "0000000000010000000.gw", "c": store.entry("c")[1]}  # type: ignore[index]
    assert tombstones == ["b"]


def test_data_written_before_versions_existed_still_loads(tmp_path: Path, opened: list[Store]) -> None:
    (tmp_path / "snapshot.json").write_text('{"kvd": 1, "generation": 0, "data": {"a": "1", "b": "2"}}')
    (tmp_path / journal_name(0)).write_text('["p","c","3"]\n["d","b"]\n')
    store = open_store(opened, tmp_path)
    assert dict(store.items()) == {"a": "1", "c": "3"}
    store.put("a", "new")
    assert store.get("a") == "new", "a local write beats an unversioned value"


def test_a_writer_that_writes_again_when_acknowledged_waits_its_turn(tmp_path: Path, opened: list[Store]) -> None:
    """A pipelined client writes as soon as its last write is answered: one journal write at a time."""
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    store.put("w", "0")
    store.put("x", "1").addCallback(lambda _: store.put("a", "3"))
    store.put("y", "1").addCallback(lambda _: store.put("a", "4"))
    runner.run_one()  # w is durable; x and y go out together
    runner.run_one()  # x and y are durable; their writers write a=3, then a=4
    assert len(runner.jobs) == 1, "one journal write in flight, never two"
    runner.run_all()
    assert store.get("a") == "4"
    store = reopen(opened, store)
    assert store.get("a") == "4", "the journal holds the writes in the order memory saw them"


def test_memory_holds_one_string_per_key(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    store.put("k", "v")
    store.apply("gone", None, "0000000000010000000.gw")
    assert all(type(packed) is str for packed in store._data.values())
    assert store.entry("k") == ("v", store.entry("k")[1]) and store.entry("gone") == (None, "0000000000010000000.gw")  # type: ignore[index]


def test_two_nodes_writing_in_the_same_millisecond_mint_different_versions(tmp_path: Path, opened: list[Store]) -> None:
    """The node id is the version's origin, so versions never tie for different values."""
    frozen = lambda: 1_700_000_000.0  # noqa: E731
    a = open_store(opened, tmp_path / "a", clock=HybridClock(frozen, "a"))
    b = open_store(opened, tmp_path / "b", clock=HybridClock(frozen, "b"))
    versions: list[str] = []
    a.put("k", "from a").addCallback(versions.append)
    b.put("k", "from b").addCallback(versions.append)
    assert len(versions) == 2 and versions[0] != versions[1]
    assert versions[0].endswith(".a") and versions[1].endswith(".b")


V1, V2, V3 = (encode(milliseconds, 0, "gw") for milliseconds in (1, 2, 3))


def result(d: Deferred[Any]) -> Any:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def test_a_batch_applies_in_order_and_tells_which_keys_were_live(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    store.apply("live", "v", V1)
    store.apply("dead", None, V1)
    store.apply("newer", "kept", V3)
    done = result(
        store.apply_batch(
            [
                ["live", "w", V2],
                ["dead", "back", V2],
                ["new", "x", V1],
                ["new", None, V2],
                ("newer", "stale", V2),
            ]
        )
    )
    assert (done.applied, done.live) == (4, [True, False, False, True, True])
    expected = {"live": ("w", V2), "dead": ("back", V2), "new": (None, V2), "newer": ("kept", V3)}
    assert {k: store.entry(k) for k in expected} == expected
    store = reopen(opened, store)
    assert {k: store.entry(k) for k in expected} == expected
    assert len(store) == 3


def test_a_batch_is_one_journal_write_and_fires_once_durable(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    commits: list[int] = []
    store.observe_commit = lambda seconds, writes: commits.append(writes)
    d = store.apply_batch([[f"k{i}", "v", V1] for i in range(500)])
    assert len(store) == 500, "reads see the batch at once"
    assert not fired(d) and len(runner.jobs) == 1
    assert (tmp_path / journal_name(0)).read_bytes() == b""
    runner.run_all()
    assert result(d).applied == 500 and commits == [500]
    assert (tmp_path / journal_name(0)).read_bytes().count(b"\n") == 500


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(["k", "v"], id="short"),
        pytest.param(["k", 1, V1], id="value-not-text"),
        pytest.param(["", "v", V1], id="empty-key"),
        pytest.param(["a\x00b", "v", V1], id="control-in-key"),
        pytest.param([7, "v", V1], id="key-not-text"),
        pytest.param(["k", "v", "yesterday"], id="not-a-version"),
        pytest.param("k", id="not-a-list"),
    ],
)
def test_a_batch_with_one_bad_item_applies_nothing(tmp_path: Path, opened: list[Store], bad: object) -> None:
    store = open_store(opened, tmp_path)
    store.apply("k0", "old", V1)
    journal = (tmp_path / journal_name(0)).read_bytes()
    with pytest.raises(BadBatch):
        store.apply_batch([["k0", "new", V2], ["k1", "v", V1], bad, ["k2", "v", V1]])
    assert dict(store.items()) == {"k0": "old"}
    assert (tmp_path / journal_name(0)).read_bytes() == journal


@pytest.mark.parametrize(
    ("key", "message"),
    [
        pytest.param("a\x85b", "no control characters", id="control-beyond-ascii"),
        pytest.param("\u00e9" * 257, "1 to 512 bytes", id="over-512-bytes-under-512-characters"),
        pytest.param("k" * 513, "1 to 512 bytes", id="over-512-ascii"),
        pytest.param("a\x7fb", "no control characters", id="delete-character"),
    ],
)
def test_a_batch_refuses_the_keys_the_client_api_refuses(
    tmp_path: Path, opened: list[Store], key: str, message: str
) -> None:
    """Batch items are checked by the same rules as keys on the client API, beyond ASCII too."""
    store = open_store(opened, tmp_path)
    with pytest.raises(BadBatch, match=message):
        store.apply_batch([["k", "v", V1], [key, "v", V1]])
    assert len(store) == 0


def test_a_batch_takes_keys_and_values_beyond_ascii(tmp_path: Path, opened: list[Store]) -> None:
    """A key of 512 bytes, and keys and values of any UTF-8 text, are written as sent."""
    store = open_store(opened, tmp_path)
    keys = ["k" * 512, "\u00e9" * 256, "\u043a\u043b\u044e\u0447", "a b"]
    result(store.apply_batch([[key, f"\u0437\u043d\u0430\u0447 {i}", V1] for i, key in enumerate(keys)]))
    assert [store.get(key) for key in keys] == [f"\u0437\u043d\u0430\u0447 {i}" for i in range(4)]


def test_a_batch_of_nothing_new_writes_nothing(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    store.apply("k", "v", V2)
    runner.run_all()
    done = result(store.apply_batch([["k", "older", V1], ["k", "v", V2]]))
    assert (done.applied, done.live) == (0, [True, True]) and not runner.jobs
    assert result(store.apply_batch([])).applied == 0


def test_a_batch_whose_journal_write_fails_leaves_nothing_readable(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    store.apply("k", "old", V1)
    runner.run_all()
    d = store.apply_batch([["k", "mid", V2], ["k", "new", V3], ["other", "x", V1]])
    dropped = store.drop_batch([["k", V3]])
    os.close(store._journal_fd)
    store._journal_fd = os.open(os.devnull, os.O_RDONLY)
    runner.run_all()
    with pytest.raises(StoreFailed):
        result(d)
    with pytest.raises(StoreFailed):
        result(dropped)
    assert {k: store.entry(k) for k in ("k", "other")} == {"k": ("old", V1), "other": None}
    with pytest.raises(StoreFailed):
        result(store.apply_batch([["k", "later", V3]]))
    assert result(store.apply_batch([["k", "old", V1]])).live == [True], "nothing to write: no refusal"


def test_a_batch_after_close_is_refused(tmp_path: Path, opened: list[Store]) -> None:
    store = open_store(opened, tmp_path)
    store.apply("k", "v", V1)
    store.close()
    with pytest.raises(StoreClosed):
        result(store.apply_batch([["k", "w", V2]]))
    with pytest.raises(StoreClosed):
        result(store.drop_batch([["k", V1]]))
    store = open_store(opened, tmp_path)
    assert store.entry("k") == ("v", V1)


def test_a_drop_batch_forgets_only_keys_still_at_the_version_given(tmp_path: Path, opened: list[Store]) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    for key in ("a", "b", "c"):
        store.apply(key, "v", V2)
    runner.run_all()
    d = store.drop_batch([["a", V2], ["b", V1], ["c", V2], ["c", V2], ["absent", V1]])
    assert store.entry("a") is None and store.entry("c") is None and store.entry("b") == ("v", V2)
    assert not fired(d) and len(runner.jobs) == 1
    runner.run_all()
    assert result(d) == 2
    store = reopen(opened, store)
    assert dict(store.items()) == {"b": "v"}


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(["a"], id="short"),
        pytest.param(["a", None], id="version-not-text"),
        pytest.param(["", V2], id="empty-key"),
    ],
)
def test_a_drop_batch_with_one_bad_item_drops_nothing(tmp_path: Path, opened: list[Store], bad: object) -> None:
    store = open_store(opened, tmp_path)
    store.apply("a", "v", V2)
    with pytest.raises(BadBatch):
        store.drop_batch([["a", V2], bad])
    assert dict(store.items()) == {"a": "v"}


def test_unversioned_data_can_be_dropped(tmp_path: Path, opened: list[Store]) -> None:
    (tmp_path / journal_name(0)).write_text('["p","old","1"]\n')
    store = open_store(opened, tmp_path)
    assert result(store.drop_batch([["old", ""]])) == 1 and store.entry("old") is None


def test_a_data_dir_written_before_the_split_loads(tmp_path: Path, opened: list[Store]) -> None:
    """Bytes as the store wrote them before it was split into modules (format 2)."""
    (tmp_path / "LOCK").write_bytes(b"")
    (tmp_path / "incarnation").write_bytes(b"3\n")
    (tmp_path / SNAPSHOT).write_bytes(
        b'{"kvd":2,"generation":1,"data":{"a":"0000000000010000000.gw\\u001f1","t":"0000000000010000000.gw"}}\n'
    )
    (tmp_path / journal_name(1)).write_bytes(
        b'["p","b","2","0000000000020000000.n1"]\n["d","a","0000000000030000000.n1"]\n["x","t"]\n'
    )
    store = open_store(opened, tmp_path)
    assert dict(store.entries()) == {"a": (None, "0000000000030000000.n1"), "b": ("2", "0000000000020000000.n1")}
    assert store.generation == 1


versions = st.sampled_from([encode(milliseconds, 0, origin) for milliseconds in (1, 2, 3) for origin in ("a", "b")])
batch_operations = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.lists(st.tuples(keys, st.none() | values, versions), max_size=6)),
        st.tuples(st.just("drop"), st.lists(st.tuples(keys, versions), max_size=4)),
        st.tuples(st.just("compact")),
        st.tuples(st.just("reopen")),
    ),
    max_size=30,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(batch_operations)
def test_any_history_of_batches_reopened_equals_a_model(
    tmp_path_factory: pytest.TempPathFactory, ops: list[Any]
) -> None:
    directory = tmp_path_factory.mktemp("store")
    stores: list[Store] = []
    store = open_store(stores, directory, compact_min_bytes=64)
    model: dict[str, tuple[str | None, str]] = {}

    def keep_everything(store: Store) -> Store:
        """Make every structure a node keeps beside the dict, so that each change must keep it up to date."""
        store.index_ranges()
        store.listing()
        len(store)
        result(store.expire())
        return store

    keep_everything(store)
    try:
        for op in ops:
            if op[0] == "apply":
                live, applied = [], 0
                for key, value, version in op[1]:
                    live.append(key in model and model[key][0] is not None)
                    if key not in model or model[key][1] < version:
                        model[key] = (value, version)
                        applied += 1
                done = result(store.apply_batch([list(item) for item in op[1]]))
                assert (done.applied, done.live) == (applied, live)
            elif op[0] == "drop":
                dropped = 0
                for key, version in op[1]:
                    if key in model and model[key][1] == version:
                        del model[key]
                        dropped += 1
                assert result(store.drop_batch([list(item) for item in op[1]])) == dropped
            elif op[0] == "compact":
                assert fired(store.compact())
            else:
                store = keep_everything(reopen(stores, store))
            assert dict(store.entries()) == model
            assert store.digests() == Digests.of({k: pack(*e) for k, e in model.items()}).values()
            # What the batch path keeps up to date beside the dict, against the model.
            assert len(store) == sum(value is not None for value, _ in model.values())
            assert [key for key, _, _ in store.listing(limit=1000).entries] == sorted(model)
            versions, tombstones = store.versions_in(range(256))
            assert versions == {k: version for k, (_, version) in model.items()}
            assert sorted(tombstones) == sorted(k for k, (value, _) in model.items() if value is None)
        store = reopen(stores, store)
        assert dict(store.entries()) == model
    finally:
        for s in stores:
            if not s._closed:
                s.abandon()


# Compaction without a copy: the dict is frozen for the snapshot's thread, changes overlaid.


def snapshot_data(directory: Path) -> dict[str, str]:
    loaded = json.loads((directory / SNAPSHOT).read_bytes())
    return dict(loaded["data"])


def test_reads_and_writes_during_a_compaction_see_every_change_and_the_snapshot_holds_the_switch(
    tmp_path: Path, opened: list[Store]
) -> None:
    """
    While the snapshot's thread is busy, writes, deletes, drops, TTL expiry, listing, the
    digests and the live count give the answers a store without compaction would; the
    snapshot holds exactly the state at the switch; the reopened store holds every change.
    """
    runner, now = ManualRunner(), [1000.0]
    store = open_store(opened, tmp_path, run=runner, clock=HybridClock(lambda: now[0], "n1"))
    for i in range(10):
        store.put(f"k{i}", f"v{i}")
    store.put("ttl", "soon", ttl=5)
    runner.run_all()
    at_switch = dict(store._data)
    compacted = store.compact()
    runner.run_one()  # the new journal is made; the snapshot job is queued, not run
    assert len(runner.jobs) == 1 and not fired(compacted)

    store.put("k0", "changed")
    store.put("new", "fresh")
    deleted = store.delete("k1")
    assert deleted is not None
    dropped = store.drop("k2", store.entry("k2")[1])  # type: ignore[index]
    assert dropped is not None
    store.put("k3", "again")
    store.drop("k3", store.entry("k3")[1])  # type: ignore[index]
    now[0] += 5
    expired = store.expire()
    # Journal writes go ahead while the snapshot job waits.
    snapshot_job = runner.jobs.pop(0)
    runner.run_all()
    assert fired(expired) and fired(deleted) and fired(dropped)

    expected_live = {f"k{i}": f"v{i}" for i in range(4, 10)} | {"k0": "changed", "new": "fresh"}
    assert dict(store.items()) == expected_live
    assert store.get("k0") == "changed" and store.get("k1") is None and store.get("k2") is None
    assert store.entry("k2") is None and store.entry("k1") is not None and store.entry("ttl") is not None
    assert store.get("ttl") is None and store.entry("ttl")[0] is None  # type: ignore[index]
    assert len(store) == len(expected_live)
    assert "k2" not in store and "new" in store
    listed = store.listing(prefix="k", values=True)
    assert [key for key, _, _ in listed.entries] == ["k0", "k1"] + [f"k{i}" for i in range(4, 10)]
    assert listed.entries[0][1] == "changed" and listed.entries[1][1] is None
    assert store.digests() == Digests.of(dict(store._data)).values()

    # The frozen dict is untouched: the snapshot is the state at the switch.
    runner.jobs.insert(0, snapshot_job)
    runner.run_all()
    assert fired(compacted)
    assert snapshot_data(tmp_path) == at_switch
    assert isinstance(store._data, dict), "the overlay is folded back once the snapshot is durable"
    assert dict(store.items()) == expected_live and "k2" not in store._data and "k3" not in store._data
    store = reopen(opened, store)
    assert dict(store.items()) == expected_live
    assert store.entry("k2") is None and store.entry("k1") is not None and store.entry("ttl")[0] is None  # type: ignore[index]


def test_a_journal_write_that_fails_during_a_compaction_undoes_its_changes_in_the_overlay(
    tmp_path: Path, opened: list[Store]
) -> None:
    runner = ManualRunner()
    store = open_store(opened, tmp_path, run=runner)
    store.put("kept", "old")
    runner.run_all()
    store.compact()
    runner.run_one()
    snapshot_job = runner.jobs.pop(0)
    store.put("kept", "new")
    store.put("added", "x")
    write_job = runner.jobs.pop(0)
    write_job[1].errback(Failure(OSError("disk full")))
    assert dict(store.items()) == {"kept": "old"}
    runner.jobs.insert(0, snapshot_job)
    runner.run_all()
    assert dict(store.items()) == {"kept": "old"} and isinstance(store._data, dict)


def test_the_overlay_is_folded_a_slice_a_turn_and_the_compaction_ends_after(
    tmp_path: Path, opened: list[Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvd.store.FOLD_SLICE", 3)
    runner, reactor = ManualRunner(), Clock()
    store = open_store(opened, tmp_path, run=runner, later=reactor.callLater)
    store.put("base", "1")
    reactor.advance(0)
    runner.run_all()
    compacted = store.compact()
    runner.run_one()
    snapshot_job = runner.jobs.pop(0)
    for i in range(10):
        store.put(f"k{i}", str(i))
    reactor.advance(0)
    runner.run_all()
    runner.jobs.insert(0, snapshot_job)
    runner.run_one()
    expected = {"base": "1"} | {f"k{i}": str(i) for i in range(10)}
    turns = 0
    while not fired(compacted):
        assert dict(store.items()) == expected, "reads are right at every step of the folding"
        assert len(reactor.calls) == 1
        reactor.calls.pop(0).func()  # one reactor turn (Clock.advance would run them all)
        turns += 1
    assert turns == 3, "10 changes, 3 a turn: one slice at once, then one each turn"
    assert isinstance(store._data, dict) and dict(store.items()) == expected


# Group commit at the end of the reactor turn.


def test_writes_of_one_turn_share_one_journal_write_started_at_the_end_of_the_turn(
    tmp_path: Path, opened: list[Store]
) -> None:
    runner, reactor = ManualRunner(), Clock()
    store = open_store(opened, tmp_path, run=runner, later=reactor.callLater)
    writes = [store.put(f"k{i}", "v") for i in range(5)]
    assert not runner.jobs, "no journal write starts before the turn ends"
    reactor.advance(0)
    assert len(runner.jobs) == 1, "one write + fsync for every write of the turn"
    assert not any(fired(d) for d in writes), "no write is acknowledged before it is durable"
    more = store.put("later", "v")
    reactor.advance(0)
    assert len(runner.jobs) == 1, "the next write waits for the one in flight"
    runner.run_one()
    assert all(fired(d) for d in writes) and not fired(more)
    assert not runner.jobs
    reactor.advance(0)
    runner.run_one()
    assert fired(more)
    store = reopen(opened, store)
    assert dict(store.items()) == {**{f"k{i}": "v" for i in range(5)}, "later": "v"}


def test_abandon_cancels_a_journal_write_not_yet_started(tmp_path: Path, opened: list[Store]) -> None:
    runner, reactor = ManualRunner(), Clock()
    store = open_store(opened, tmp_path, run=runner, later=reactor.callLater)
    store.put("lost", "v")
    store.abandon()
    reactor.advance(0)
    assert not runner.jobs
    store = reopen(opened, store)
    assert store.get("lost") is None


def test_a_snapshot_written_in_many_slices_recovers_every_key(
    tmp_path: Path, opened: list[Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("kvd.journal.SNAPSHOT_SLICE", 3)
    monkeypatch.setattr("kvd.journal.SNAPSHOT_PAUSE", 0)
    store = open_store(opened, tmp_path)
    expected = {f"k{i}": f"v{i}" for i in range(10)}
    for key, value in expected.items():
        store.put(key, value)
    store.delete("k4")
    del expected["k4"]
    assert fired(store.compact())
    assert len(snapshot_data(tmp_path)) == 10, "tombstones too"
    store = reopen(opened, store)
    assert dict(store.items()) == expected


def test_versions_in_follows_keys_that_come_and_go_once_asked(tmp_path: Path, opened: list[Store]) -> None:
    from kvd.digests import bucket_of
    from kvd.digests import versions_in as scanned

    store = open_store(opened, tmp_path)
    for i in range(200):
        store.apply(f"k{i}", f"v{i}", "0000000000010000000.gw")
    every = set(range(256))
    assert store.versions_in(every) == scanned(dict(store._data), every)  # the first question makes the index
    store.drop("k1", "0000000000010000000.gw")  # gone
    store.apply("k2", None, "0000000000020000000.gw")  # a tombstone stays
    store.apply("new", "x", "0000000000020000000.gw")  # came
    store.apply("k3", "again", "0000000000030000000.gw")  # overwritten
    for wanted in (every, {bucket_of("new"), bucket_of("k2")}, {bucket_of("k1")}, set()):
        versions, tombstones = store.versions_in(wanted)
        expected, dead = scanned(dict(store._data), wanted)
        assert versions == expected and sorted(tombstones) == sorted(dead)
    assert "k1" not in store.versions_in(every)[0] and store.versions_in({bucket_of("new")})[0]["new"]


def test_ranges_indexed_at_start_up_answer_as_the_lazy_index_does(tmp_path: Path, opened: list[Store]) -> None:
    """A node indexes its key ranges before it serves; what repair asks of them is the same."""
    from kvd.digests import Digests
    from kvd.digests import versions_in as scanned

    store = open_store(opened, tmp_path)
    for i in range(300):
        store.apply(f"k{i}", None if i % 7 == 0 else f"v{i}", f"00000000000{i % 10}0000000.gw")
    store.index_ranges()
    every = set(range(256))
    assert store.digests() == Digests.of(dict(store._data)).values()
    versions, tombstones = store.versions_in(every)
    expected, dead = scanned(dict(store._data), every)
    assert versions == expected and sorted(tombstones) == sorted(dead) and len(dead) == 43
    store.apply("late", "x", "0000000000090000000.gw")  # kept up to date from then on, as before
    assert store.digests() == Digests.of(dict(store._data)).values()
    assert store.versions_in(every)[0]["late"] == "0000000000090000000.gw"


def test_what_a_node_keeps_per_key_is_left_alone_by_the_garbage_collector(tmp_path: Path, opened: list[Store]) -> None:
    """A full collection walks every tracked container: at 1M keys, sets and lists of them cost it 250 ms."""
    import gc

    from kvd.changes import ChangeIndex

    store = open_store(opened, tmp_path)
    store.index_ranges()
    changes = ChangeIndex.follow(store)
    for i in range(3000):  # enough overwrites for the change index to compact itself too
        store.put(f"k{i % 500}", "v")
    store.drop("k1", store.entry("k1")[1])  # type: ignore[index]
    assert store._buckets is not None
    per_key = [store._data, *store._buckets, changes._seqs, changes._key_at, changes._seq_of]
    gc.collect()  # dicts of strings and integers only are untracked at a collection, if not before
    for container in per_key:
        # Untracked, or (an array of machine integers) with nothing inside for the collector to walk.
        assert not gc.is_tracked(container) or len(gc.get_referents(container)) <= 1, type(container)
