"""The node's store for the second part of the client API: expiry (TTL) and sorted listings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from kvd.gateway.listing import merge
from kvd.journal import SNAPSHOT, journal_name
from kvd.store import Listed, Store
from kvd.ttl import MAX_TTL, BadTTL, expired, expires, parse_ttl, with_expiry
from kvd.versions import HybridClock, encode

START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def stores() -> Iterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        store.abandon()


def open_store(stores: list[Store], path: Path, clock: Clock, **kwargs: object) -> Store:
    store = Store.open(str(path), clock=HybridClock(clock.seconds, "n1"), **kwargs)  # type: ignore[arg-type]
    stores.append(store)
    return store


def reopen(stores: list[Store], store: Store, clock: Clock) -> Store:
    store.close()
    stores.remove(store)
    return open_store(stores, Path(store.directory), clock)


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "1e12", "", "abc", str(MAX_TTL + 1)])
def test_a_ttl_must_be_a_positive_finite_number_of_at_most_ten_years(text: str) -> None:
    with pytest.raises(BadTTL):
        parse_ttl(text)


def test_a_ttl_in_range_is_taken_in_seconds() -> None:
    assert parse_ttl("2") == 2.0 and parse_ttl("0.5") == 0.5 and parse_ttl(str(MAX_TTL)) == MAX_TTL


def test_an_expiry_travels_in_the_version_and_keeps_versions_ordered() -> None:
    plain, later = encode(1000, 0, "gw"), encode(1000, 1, "gw")
    carrying = with_expiry(plain, 12.0015)
    assert expires(carrying) == 12.002 and expires(plain) is None
    assert plain < carrying < later, "the expiry does not change where a write orders"
    assert not expired(carrying, 12.001) and expired(carrying, 12.002) and expired(carrying, 13)
    assert not expired(plain, 1e12)


def test_an_entry_reads_as_present_before_its_expiry_and_absent_at_and_after_it(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    version = store.put("k", "v", ttl=10).result
    assert expires(version) == START + 10
    clock.advance(9.999)
    assert store.get("k") == "v" and store.entry("k") == ("v", version) and "k" in store
    assert dict(store.items()) == {"k": "v"}
    clock.advance(0.001)
    assert store.get("k") is None and "k" not in store
    assert store.entry("k") == (None, version), "a tombstone of the same version, so repair copies no value"
    assert dict(store.entries()) == {"k": (None, version)}
    assert store.delete("k") is None, "nothing live to delete"
    clock.advance(100)
    assert store.entry("k") == (None, version)


def test_a_later_put_without_ttl_makes_the_key_permanent(tmp_path: Path, stores: list[Store], clock: Clock) -> None:
    store = open_store(stores, tmp_path, clock)
    store.put("k", "v1", ttl=1)
    permanent = store.put("k", "v2").result
    assert expires(permanent) is None
    clock.advance(MAX_TTL)
    assert store.get("k") == "v2"


def test_an_expired_entry_is_listed_as_a_tombstone_for_repair(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    version = store.put("k", "v", ttl=1).result
    store.put("other", "w")
    buckets = range(256)
    assert store.versions_in(buckets)[1] == []
    clock.advance(1)
    versions, tombstones = store.versions_in(buckets)
    assert versions["k"] == version and tombstones == ["k"]


def test_an_expiry_survives_restart_from_the_journal_and_from_a_snapshot(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    short = store.put("short", "s", ttl=5).result
    long = store.put("long", "l", ttl=50).result
    store = reopen(stores, store, clock)
    assert store.entry("short") == ("s", short) and store.entry("long") == ("l", long)
    assert store.compact().called
    assert (tmp_path / SNAPSHOT).exists()
    store = reopen(stores, store, clock)
    clock.advance(5)
    assert store.get("short") is None and store.get("long") == "l"
    store = reopen(stores, store, clock)
    assert store.entry("short") == (None, short)
    clock.advance(45)
    assert store.get("long") is None


def test_a_format_2_data_dir_holding_an_expiring_entry_loads_it_with_its_expiry(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    """The journal and snapshot formats did not change: an expiring entry is one whose version carries its expiry."""
    expiring = "0000000000010000000.gw~" + str(int((START + 5) * 1000))
    (tmp_path / SNAPSHOT).write_text(
        '{"kvd":2,"generation":1,"data":{"a":"' + expiring + '\\u001f1","old":"0000000000010000000.gw\\u001fx"}}\n'
    )
    (tmp_path / journal_name(1)).write_text(f'["p","b","2","{expiring}"]\n')
    store = open_store(stores, tmp_path, clock)
    assert store.get("a") == "1" and store.get("b") == "2" and store.get("old") == "x"
    clock.advance(5)
    assert store.get("a") is None and store.get("b") is None and store.get("old") == "x"


def test_a_listing_is_in_utf8_byte_order_including_non_ascii_keys(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    keys = ["b", "a", "é", "z", "日本", "\U0001f600", "\ufffd", "ab", "a\u00a0"]
    for key in keys:
        store.put(key, key.upper())
    listed = store.listing(limit=100)
    assert [key for key, _, _ in listed.entries] == sorted(keys, key=lambda k: k.encode("utf-8"))
    assert not listed.more
    assert all(value == "" for _, value, _ in listed.entries), "no values unless asked for"
    with_values = store.listing(limit=100, values=True)
    assert [(k, v) for k, v, _ in with_values.entries] == sorted(
        ((k, k.upper()) for k in keys), key=lambda kv: kv[0].encode()
    )


def test_a_listing_pages_by_prefix_and_after(tmp_path: Path, stores: list[Store], clock: Clock) -> None:
    store = open_store(stores, tmp_path, clock)
    for key in ["a", "p", "p/1", "p/2", "p/3", "p0", "q"]:
        store.put(key, "v")
    first = store.listing("p/", limit=2)
    assert [k for k, _, _ in first.entries] == ["p/1", "p/2"] and first.more
    rest = store.listing("p/", after="p/2", limit=2)
    assert [k for k, _, _ in rest.entries] == ["p/3"] and not rest.more
    assert store.listing("p/", after="a", limit=5).entries == first.entries + rest.entries
    assert store.listing("p/", after="z", limit=5).entries == []
    assert [k for k, _, _ in store.listing("", after="p0", limit=5).entries] == ["q"]


def test_a_listing_gives_tombstones_and_expired_entries_with_no_value(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    store.put("a", "1")
    store.put("b", "2")
    store.put("c", "3", ttl=1)
    store.delete("b")
    clock.advance(1)
    assert [(k, v) for k, v, _ in store.listing(values=True).entries] == [("a", "1"), ("b", None), ("c", None)]


def test_a_listing_stops_at_its_limit_counting_tombstones_so_its_work_is_bounded(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    store.apply_batch([[f"k{i:05d}", None, encode(1000, i, "x")] for i in range(5000)])
    store.put("k99999", "live")
    listed = store.listing("k", limit=10)
    assert len(listed.entries) == 10 and listed.more, "ten tombstones, then a stop: not a scan for live keys"
    assert all(value is None for _, value, _ in listed.entries)


def test_a_listing_with_values_stops_at_its_value_budget(tmp_path: Path, stores: list[Store], clock: Clock) -> None:
    store = open_store(stores, tmp_path, clock)
    for i in range(10):
        store.put(f"k{i}", "x" * 100)
    listed = store.listing(limit=10, values=True, max_chars=250)
    assert len(listed.entries) == 3 and listed.more


def test_the_index_follows_drops_and_survives_restart(tmp_path: Path, stores: list[Store], clock: Clock) -> None:
    store = open_store(stores, tmp_path, clock)
    version = store.put("a", "1").result
    store.put("b", "2")
    store.drop("a", version)
    assert [k for k, _, _ in store.listing().entries] == ["b"]
    store = reopen(stores, store, clock)
    assert [k for k, _, _ in store.listing().entries] == ["b"]


def test_the_index_once_made_follows_every_change(tmp_path: Path, stores: list[Store], clock: Clock) -> None:
    store = open_store(stores, tmp_path, clock)
    store.put("m", "1")
    assert [k for k, _, _ in store.listing().entries] == ["m"], "the first listing makes the index"
    version = store.put("a", "1").result
    store.apply_batch([["z", "2", encode(1000, 0, "x")], ["b", None, encode(1000, 1, "x")]])
    store.delete("m")
    assert [(k, v) for k, v, _ in store.listing(values=True).entries] == [
        ("a", "1"),
        ("b", None),
        ("m", None),
        ("z", "2"),
    ]
    store.drop("a", version)
    store.drop_batch([["b", encode(1000, 1, "x")]])
    assert [k for k, _, _ in store.listing().entries] == ["m", "z"]


def test_expire_turns_due_entries_into_tombstones_of_the_same_version(
    tmp_path: Path, stores: list[Store], clock: Clock
) -> None:
    store = open_store(stores, tmp_path, clock)
    assert store.expire().result == 0, "the first call scans; nothing carries an expiry yet"
    soon = store.put("soon", "s", ttl=1).result
    store.put("later", "l", ttl=10)
    store.put("rewritten", "r", ttl=1)
    store.put("rewritten", "permanent")
    digests = store.digests()
    assert len(store) == 3
    clock.advance(1)
    assert store.expire().result == 1
    assert store.entry("soon") == (None, soon) and len(store) == 2
    assert store.get("rewritten") == "permanent" and store.get("later") == "l"
    assert store.digests() == digests, "the same versions: replicas still agree"
    assert store.expire().result == 0
    store = reopen(stores, store, clock)
    assert store.entry("soon") == (None, soon), "the tombstone is in the journal"
    clock.advance(9)
    assert store.expire().result == 1, "after a restart, the first call finds what is due by scanning"
    assert len(store) == 1


# The gateway's merge of node answers, against a model.

node_entries = st.dictionaries(
    st.sampled_from([f"k{i}" for i in range(12)]),
    st.tuples(st.none() | st.just("v"), st.integers(1, 4)),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(node_entries, min_size=1, max_size=4), st.integers(1, 5))
def test_paging_through_merged_answers_lists_each_newest_live_key_once_in_order(
    nodes: list[dict[str, tuple[str | None, int]]], limit: int
) -> None:
    def answer(node: dict[str, tuple[str | None, int]], after: str | None) -> Listed:
        keys = sorted(k for k in node if after is None or k > after)
        chosen = keys[:limit]
        return Listed([(k, node[k][0], encode(1000, node[k][1], f"n{node[k][1]}")) for k in chosen], len(keys) > limit)

    newest: dict[str, tuple[str | None, int]] = {}
    for node in nodes:
        for key, entry in node.items():
            # Newest version wins; at one version (one write), a value beats a tombstone: the
            # tombstone a node made of it when it expired by that node's (fast) clock.
            if key not in newest or (entry[1], entry[0] is not None) > (newest[key][1], newest[key][0] is not None):
                newest[key] = entry
    expected = sorted(k for k, (value, _) in newest.items() if value is not None)
    listed: list[str] = []
    after: str | None = None
    for _ in range(100):
        page = merge([answer(node, after) for node in nodes], limit, START)
        assert len(page.items) <= limit
        listed += [key for key, _, _ in page.items]
        if page.next is None:
            break
        assert after is None or page.next > after, "every page moves on"
        after = page.next
    assert listed == expected


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text("ab/", min_size=1, max_size=4), st.one_of(st.none(), st.text("xy", max_size=3)), max_size=30
    ),
    st.text("ab/", max_size=2),
    st.one_of(st.none(), st.text("ab/", max_size=4)),
    st.integers(1, 6),
    st.booleans(),
    st.integers(0, 6),
)
def test_a_listing_is_the_sorted_model_cut_at_its_prefix_limit_and_budget(
    tmp_path_factory: pytest.TempPathFactory,
    entries: dict[str, str | None],
    prefix: str,
    after: str | None,
    limit: int,
    values: bool,
    max_chars: int,
) -> None:
    store = Store.open(str(tmp_path_factory.mktemp("listing")), clock=HybridClock(lambda: START, "n1"))
    try:
        store.apply_batch([[key, value, encode(1000, 0, "x")] for key, value in entries.items()])
        following = sorted(k for k in entries if k.startswith(prefix) and (after is None or k > after))
        expected: list[tuple[str, str | None]] = []
        budget, more = max_chars, False
        for key in following:
            if len(expected) >= limit or (values and budget < 0):
                more = True
                break
            value = entries[key]
            if value is not None and values:
                budget -= len(value)
            expected.append((key, value if values or value is None else ""))
        listed = store.listing(prefix, after, limit, values, max_chars)
        assert [(key, value) for key, value, _ in listed.entries] == expected, (entries, prefix, after, limit)
        assert listed.more is more
    finally:
        store.abandon()
