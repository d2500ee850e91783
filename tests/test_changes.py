"""A node's write order index (kvd.changes): order, one entry per key, epochs, waiters."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from kvd.changes import ChangeIndex
from kvd.store import Store
from kvd.versions import HybridClock


def test_keys_come_in_the_order_they_last_changed_each_once() -> None:
    index = ChangeIndex.of(["a", "b", "c"])
    index.changed("a")
    page = index.since(0)
    assert page.keys == ["b", "c", "a"]
    assert page.next == index.position == 4
    assert not page.more
    assert index.since(2).keys == ["c", "a"]
    assert index.since(4).keys == []


def test_a_page_is_cut_by_its_limit_and_the_next_one_goes_on_from_it() -> None:
    index = ChangeIndex.of(f"k{i}" for i in range(10))
    first = index.since(0, limit=4)
    assert first.keys == ["k0", "k1", "k2", "k3"] and first.more
    second = index.since(first.next, limit=100)
    assert second.keys == [f"k{i}" for i in range(4, 10)] and not second.more


def test_a_prefix_filters_and_a_bounded_scan_still_moves_the_position_on() -> None:
    index = ChangeIndex.of(["x1", "y1", "y2", "x2"])
    assert index.since(0, prefix="x").keys == ["x1", "x2"]
    page = index.since(0, prefix="x", scan=2)
    assert page.keys == ["x1"] and page.more and page.next == 2
    assert index.since(page.next, prefix="x").keys == ["x2"]


def test_forgotten_keys_leave_and_compaction_keeps_the_order() -> None:
    index = ChangeIndex.of(f"k{i}" for i in range(3000))
    for i in range(0, 3000, 2):
        index.changed(f"k{i}")
    index.forget("k1")
    keys = index.since(0, limit=10_000).keys
    assert len(keys) == len(index) == 2999
    assert keys[:3] == ["k3", "k5", "k7"]
    assert keys[-2:] == ["k2996", "k2998"]


@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans()), max_size=60), st.integers(0, 60))
def test_since_any_position_gives_exactly_the_keys_whose_last_change_is_after_it(
    changes: list[tuple[str, bool]], position: int
) -> None:
    index = ChangeIndex()
    last: dict[str, int] = {}
    for n, (key, present) in enumerate(changes, 1):
        if present:
            index.changed(key)
            last[key] = index.position
        else:
            index.forget(key)
            last.pop(key, None)
        assert index.position == sum(1 for _, p in changes[:n] if p)
    expected = sorted((seq, key) for key, seq in last.items() if seq > position)
    assert index.since(position).keys == [key for _, key in expected]


def test_waiters_wake_on_their_key_or_prefix_and_cancelled_ones_are_forgotten() -> None:
    index = ChangeIndex()
    on_a, on_b, on_x = index.wait_for_key("a"), index.wait_for_key("b"), index.wait_for_prefix("x")
    gone = index.wait_for_key("a")
    gone.cancel()
    gone.addErrback(lambda _: None)
    assert index.waiting == 3
    index.changed("a")
    assert on_a.called and not on_b.called and not on_x.called
    index.changed("xy")
    assert on_x.called and not on_b.called
    assert index.waiting == 1


def test_the_index_follows_the_store_and_a_restart_has_a_new_epoch(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), clock=HybridClock(lambda: 1000.0, "n"))
    index = ChangeIndex.follow(store)
    store.put("a", "1")
    store.put("b", "2")
    store.delete("a")
    assert index.since(0).keys == ["b", "a"]
    store.close()
    again = Store.open(str(tmp_path), clock=HybridClock(lambda: 1000.0, "n"))
    restarted = ChangeIndex.follow(again)
    assert restarted.epoch != index.epoch
    assert sorted(restarted.since(0).keys) == ["a", "b"]
    again.close()
