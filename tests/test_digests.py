"""Anti-entropy digests: stable key ranges, and digests that any change keeps exact."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvd.digests import BUCKETS, Digests, bucket_of, mark, versions_in
from kvd.journal import pack
from kvd.ring import key_point


def test_key_ranges_are_the_ones_every_earlier_version_used() -> None:
    """Nodes of one cluster compare ranges by number: a key's range must never move."""
    assert {k: bucket_of(k) for k in ["a", "b", "ключ", "\U0001f511", "user:42"]} == {
        "a": 74,
        "b": 4,
        "ключ": 38,
        "\U0001f511": 100,
        "user:42": 230,
    }
    assert mark("a", "0000000000010000000.gw") == 0x9EB9F4ACC901F376


@given(st.text(min_size=1))
def test_a_keys_range_is_the_top_byte_of_its_ring_point(key: str) -> None:
    try:
        point = key_point(key)
    except UnicodeEncodeError:
        return
    assert bucket_of(key) == point >> 56 and 0 <= bucket_of(key) < BUCKETS


entries = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e"]),
    st.tuples(st.none() | st.text(max_size=3), st.sampled_from(["0000000000010000000.x", "0000000000020000000.y"])),
)


@given(entries, entries)
def test_changes_keep_the_digests_equal_to_a_fresh_count(before: dict, after: dict) -> None:  # type: ignore[type-arg]
    old = {k: pack(*e) for k, e in before.items()}
    new = {k: pack(*e) for k, e in after.items()}
    digests = Digests.of(old)
    for key in old.keys() | new.keys():
        digests.change(key, old.get(key), new.get(key))
    assert digests.values() == Digests.of(new).values()


def test_versions_in_names_the_keys_of_the_ranges_asked_for_and_their_tombstones() -> None:
    data = {"a": pack("1", "0000000000010000000.x"), "b": pack(None, "0000000000020000000.x")}
    assert versions_in(data, [bucket_of("a"), bucket_of("b")]) == (
        {"a": "0000000000010000000.x", "b": "0000000000020000000.x"},
        ["b"],
    )
    assert versions_in(data, [bucket_of("b")]) == ({"b": "0000000000020000000.x"}, ["b"])
    assert versions_in(data, []) == ({}, [])
