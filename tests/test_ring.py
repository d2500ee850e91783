"""Tests for kvd.ring: placement, stability, movement on membership change, balance."""

from __future__ import annotations

import contextlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from kvd import ring as ring_module
from kvd.ring import DEFAULT_VNODES, POINT_SPACE, Ring, key_point, node_points

KEYS = [f"key-{i}" for i in range(200)] + ["", "ключ", "🔑", "a/b c", "\t"]

node_ids = st.text(max_size=6)
memberships = st.dictionaries(node_ids, st.integers(1, 3), max_size=6)
vnode_counts = st.integers(1, 24)
# "crowded" squeezes every node onto 8 ring positions, so equal points (ties
# between nodes and within one node) are the rule instead of a 2**-64 event.
placements = st.sampled_from(["hashed", "crowded"])
# A tiny bucket table sends most lookups down the bisection path.
bucket_caps = st.sampled_from([20, 2])

few_examples = settings(max_examples=100, deadline=None)


def crowded_points(node_id: str, count: int) -> list[int]:
    return [(key_point(f"{node_id}\0{i}") % 8) << 61 for i in range(count)]


@contextlib.contextmanager
def placed(placement: str, bucket_cap: int = 20) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if placement == "crowded":
            stack.enter_context(mock.patch.object(ring_module, "node_points", crowded_points))
        stack.enter_context(mock.patch.object(ring_module, "_MAX_BUCKET_BITS", bucket_cap))
        yield


def sorted_pairs(members: Mapping[str, int], vnodes: int) -> list[tuple[int, str]]:
    """Every (point, node id) of the membership, in ring order."""
    return sorted(
        (point, node_id)
        for node_id, weight in members.items()
        for point in ring_module.node_points(node_id, weight * vnodes)
    )


def reference_preference(pairs: list[tuple[int, str]], point: int, n: int) -> list[str]:
    """The specification, slowly: walk the sorted pairs from the first at or after point, wrapping."""
    found: list[str] = []
    start = bisect_left(pairs, (point, ""))
    for i in range(len(pairs)):
        node_id = pairs[(start + i) % len(pairs)][1]
        if len(found) < n and node_id not in found:
            found.append(node_id)
    return found


def test_key_point_is_stable_across_versions() -> None:
    """key_point is BLAKE2s-256's first 64 bits, big-endian, of the UTF-8 key: these values must never change."""
    assert key_point("") == 7575470396830417044
    assert key_point("a") == 5335941579481821239
    assert key_point("kvd") == 8052196895219533465
    assert key_point("user:42") == 16604877442263969969
    assert key_point("ключ") == 2781010298759440740
    assert key_point("🔑") == 7234187405472975977


def test_node_points_are_stable_and_extend_as_a_prefix() -> None:
    """A node's points are fixed by its id, and more points only append to the sequence."""
    assert node_points("node-1", 3) == [13037219603265927632, 17455508837341283347, 9513285430911647861]
    assert node_points("node-1", 20)[:3] == node_points("node-1", 3)
    assert node_points("node-1", 0) == []
    assert all(0 <= p < POINT_SPACE for p in node_points("node-1", 100))


def test_fixed_ring_gives_fixed_preference_lists() -> None:
    """Placement of nodes, not only of keys, is stable: a given membership always yields these lists."""
    ring = Ring({"alpha": 1, "beta": 1, "gamma": 2, "delta": 1, "epsilon": 1}, vnodes=16)
    assert ring.preference_list("a", 3) == ["gamma", "beta", "delta"]
    assert ring.preference_list("c", 3) == ["beta", "epsilon", "gamma"]
    assert ring.preference_list("d", 3) == ["beta", "alpha", "gamma"]
    assert ring.preference_list("e", 3) == ["epsilon", "beta", "gamma"]
    assert ring.preference_list("user:42", 3) == ["delta", "alpha", "epsilon"]
    assert ring.preference_list("ключ", 3) == ["beta", "alpha", "epsilon"]


def test_empty_ring_has_no_owner_and_empty_preference_lists() -> None:
    ring = Ring({})
    assert len(ring) == 0
    assert ring.owner("k") is None
    assert ring.owner_at(0) is None
    assert ring.preference_list("k", 0) == []
    assert ring.preference_list("k", 3) == []
    assert ring.preference_list_at(POINT_SPACE - 1, 3) == []


def test_preference_list_returns_every_node_when_the_ring_has_fewer_than_n() -> None:
    ring = Ring({"a": 1, "b": 2}, vnodes=8)
    for key in KEYS:
        nodes = ring.preference_list(key, 5)
        assert sorted(nodes) == ["a", "b"]
        assert nodes[0] == ring.owner(key)
        assert ring.preference_list(key, 0) == []


@few_examples
@given(members=memberships, vnodes=vnode_counts, placement=placements)
def test_preference_list_is_n_distinct_members_led_by_the_owner(
    members: dict[str, int], vnodes: int, placement: str
) -> None:
    """Each list has min(n, members) distinct members, starts with owner(), and extends the list for n - 1."""
    with placed(placement):
        ring = Ring(members, vnodes)
    for key in KEYS:
        previous: list[str] = []
        for n in range(len(members) + 2):
            nodes = ring.preference_list(key, n)
            assert len(nodes) == min(n, len(members))
            assert len(set(nodes)) == len(nodes)
            assert set(nodes) <= set(members)
            assert nodes[: len(previous)] == previous
            previous = nodes
        assert ring.owner(key) == (previous[0] if previous else None)
        assert ring.owner(key) == ring.owner_at(key_point(key))
        assert ring.preference_list(key, 3) == ring.preference_list_at(key_point(key), 3)


@few_examples
@given(
    members=memberships,
    vnodes=st.integers(1, 6),
    placement=placements,
    bucket_cap=bucket_caps,
    extra=st.lists(st.integers(0, POINT_SPACE - 1), max_size=10),
)
def test_lookups_match_a_walk_of_the_sorted_points(
    members: dict[str, int], vnodes: int, placement: str, bucket_cap: int, extra: list[int]
) -> None:
    """At, just before and just after every node point, the ring answers what a plain walk of the sorted points does.

    Equal points are walked in node id order; past the last point the walk wraps to the first.
    """
    with placed(placement, bucket_cap):
        ring = Ring(members, vnodes)
        pairs = sorted_pairs(members, vnodes)
    probes = {0, POINT_SPACE - 1, *extra}
    probes |= {q for p, _ in pairs for q in (p - 1, p, p + 1) if 0 <= q < POINT_SPACE}
    for point in sorted(probes):
        for n in range(len(members) + 2):
            assert ring.preference_list_at(point, n) == reference_preference(pairs, point, n)
        assert ring.owner_at(point) == next(iter(reference_preference(pairs, point, 1)), None)


@few_examples
@given(members=memberships, vnodes=vnode_counts, placement=placements)
def test_dict_order_does_not_change_the_ring(members: dict[str, int], vnodes: int, placement: str) -> None:
    """Every gateway given the same membership, in whatever order, builds the same ring."""
    reordered = dict(reversed(list(members.items())))
    with placed(placement):
        ring = Ring(members, vnodes)
        other = Ring(reordered, vnodes)
    assert other.nodes == ring.nodes
    for key in KEYS:
        assert other.preference_list(key, len(members)) == ring.preference_list(key, len(members))


@few_examples
@given(members=memberships, joiner=node_ids, weight=st.integers(1, 3), vnodes=vnode_counts, placement=placements)
def test_a_join_moves_keys_only_onto_the_joiner(
    members: dict[str, int], joiner: str, weight: int, vnodes: int, placement: str
) -> None:
    """A key's owner after a join is its old owner or the joiner.

    Stronger: every new preference list, with the joiner taken out, is a prefix of the old one, so replicas
    only ever shift one place down to make room for the joiner.
    """
    assume(joiner not in members)
    with placed(placement):
        before = Ring(members, vnodes)
        after = Ring({**members, joiner: weight}, vnodes)
    for key in KEYS:
        assert after.owner(key) in (before.owner(key), joiner)
        for n in range(1, len(members) + 3):
            old = before.preference_list(key, n)
            new = after.preference_list(key, n)
            assert len(new) == min(n, len(members) + 1)
            others = [node_id for node_id in new if node_id != joiner]
            assert others == old[: len(others)]


@few_examples
@given(members=memberships, vnodes=vnode_counts, placement=placements, data=st.data())
def test_a_leave_moves_only_the_leavers_keys(
    members: dict[str, int], vnodes: int, placement: str, data: st.DataObject
) -> None:
    """Keys the leaver did not own keep their owner.

    Stronger: every old preference list, with the leaver taken out, is a prefix of the new one.
    """
    assume(members)
    leaver = data.draw(st.sampled_from(sorted(members)))
    remaining = {node_id: w for node_id, w in members.items() if node_id != leaver}
    with placed(placement):
        before = Ring(members, vnodes)
        after = Ring(remaining, vnodes)
    for key in KEYS:
        if before.owner(key) != leaver:
            assert after.owner(key) == before.owner(key)
        for n in range(1, len(members) + 2):
            old = before.preference_list(key, n)
            new = after.preference_list(key, n)
            assert len(new) == min(n, len(remaining))
            survivors = [node_id for node_id in old if node_id != leaver]
            assert new[: len(survivors)] == survivors


@few_examples
@given(members=memberships, vnodes=vnode_counts, placement=placements, data=st.data())
def test_raising_a_weight_moves_keys_only_onto_that_node(
    members: dict[str, int], vnodes: int, placement: str, data: st.DataObject
) -> None:
    assume(members)
    heavier = data.draw(st.sampled_from(sorted(members)))
    with placed(placement):
        before = Ring(members, vnodes)
        after = Ring({**members, heavier: members[heavier] + data.draw(st.integers(1, 3))}, vnodes)
    for key in KEYS:
        assert after.owner(key) in (before.owner(key), heavier)


def test_weight_two_gets_about_twice_the_keys_of_weight_one() -> None:
    members = {f"light-{i}": 1 for i in range(5)} | {"heavy": 2}
    ring = Ring(members)
    counts = Counter(ring.owner(f"key-{i}") for i in range(20_000))
    light_mean = sum(counts[f"light-{i}"] for i in range(5)) / 5
    assert 1.6 <= counts["heavy"] / light_mean <= 2.4


def test_ten_equal_nodes_are_balanced_at_the_default_vnodes() -> None:
    """Over 100k keys the busiest of 10 equal nodes holds at most 8% more than the mean."""
    ring = Ring({f"node-{i}": 1 for i in range(1, 11)}, vnodes=DEFAULT_VNODES)
    counts = Counter(ring.owner(f"key-{i}") for i in range(100_000))
    assert len(counts) == 10
    assert max(counts.values()) / (100_000 / 10) <= 1.08


@pytest.mark.parametrize("weight", [0, -1, True, 1.5, "1", None])
def test_a_weight_that_is_not_a_positive_integer_is_rejected(weight: Any) -> None:
    with pytest.raises(ValueError, match="weight of node 'b'"):
        Ring({"a": 1, "b": weight})


@pytest.mark.parametrize("vnodes", [0, -3, True, 2.0])
def test_vnodes_that_are_not_a_positive_integer_are_rejected(vnodes: Any) -> None:
    with pytest.raises(ValueError, match="vnodes"):
        Ring({"a": 1}, vnodes=vnodes)


def test_a_negative_n_or_a_point_off_the_ring_is_rejected() -> None:
    ring = Ring({"a": 1}, vnodes=4)
    with pytest.raises(ValueError):
        ring.preference_list("k", -1)
    for point in (-1, POINT_SPACE):
        with pytest.raises(ValueError):
            ring.owner_at(point)
        with pytest.raises(ValueError):
            ring.preference_list_at(point, 1)


def test_nodes_and_vnodes_are_as_given_and_read_only() -> None:
    given_nodes = {"b": 2, "a": 1}
    ring = Ring(given_nodes, vnodes=7)
    given_nodes["c"] = 1
    assert ring.nodes == {"b": 2, "a": 1}
    assert list(ring.nodes) == ["b", "a"]
    assert ring.vnodes == 7
    assert len(ring) == 2
    with pytest.raises(TypeError):
        ring.nodes["d"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        ring.vnodes = 8  # type: ignore[misc]
