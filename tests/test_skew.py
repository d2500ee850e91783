"""
Skewed clocks in the deterministic simulation: a second gateway whose clock runs an hour
ahead (or behind) writes a key, then a normal gateway overwrites or deletes it. A write
acknowledged after another always wins over it, whatever the clocks say.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from kvd.gateway.coordinator import Coordinator
from kvd.gateway.nodes import NodeClients
from kvd.gateway.skew import MEDIAN_EVERY, ClockSkew
from kvd.testing.cluster import Harness
from kvd.ttl import expires
from kvd.versions import HybridClock


def settled(harness: Harness, d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    harness.settle()
    assert results, "did not finish"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path)
    h.watcher.start()
    for node_id in ("a", "b", "c"):
        h.start_node(node_id)
    h.advance(1)
    try:
        yield h
    finally:
        h.close()


def skewed(harness: Harness, offset: float) -> tuple[Coordinator, ClockSkew]:
    now = lambda: harness.clock.seconds() + offset  # noqa: E731
    skew = ClockSkew(now)
    return Coordinator(harness.cluster, NodeClients(harness.peers, skew.observe), HybridClock(now, "gw-skewed")), skew


@pytest.mark.parametrize("offset", [3600.0, -3600.0])
def test_writes_acknowledged_after_a_skewed_gateways_write_win_over_it(harness: Harness, offset: float) -> None:
    other, skew = skewed(harness, offset)
    for i in range(20):
        key = f"k{i}"
        settled(harness, other.write(key, "from the skewed gateway"))
        version, _ = settled(harness, harness.coordinator.write(key, f"later {i}"))
        harness.clock.advance(0.001)
        assert settled(harness, harness.coordinator.read(key)) == (f"later {i}", version)
        assert all(harness.stores[n].entry(key) == (f"later {i}", version) for n in "abc")
    assert abs(skew.largest() - offset) < 1, "the skewed gateway measured its skew"


@pytest.mark.parametrize("offset", [3600.0, -3600.0])
def test_deletes_acknowledged_after_a_skewed_gateways_write_are_not_undone(harness: Harness, offset: float) -> None:
    other, _ = skewed(harness, offset)
    for i in range(20):
        key = f"k{i}"
        settled(harness, other.write(key, "from the skewed gateway"))
        _, was_live = settled(harness, harness.coordinator.write(key, None))
        assert was_live
        assert settled(harness, harness.coordinator.read(key))[0] is None
        assert harness.gateway("GET", f"/kv/{key}")[0] == 404


def test_a_skewed_gateways_write_after_a_normal_one_wins_too(harness: Harness) -> None:
    """Behind by an hour, its acknowledged write still wins over the earlier one."""
    other, _ = skewed(harness, -3600.0)
    settled(harness, harness.coordinator.write("k", "first"))
    version, _ = settled(harness, other.write("k", "second"))
    assert settled(harness, harness.coordinator.read("k")) == ("second", version)


@pytest.mark.parametrize("offset", [3600.0, -3600.0])
def test_a_skewed_gateway_reckons_ttls_by_its_nodes_clocks_once_it_has_heard_them(
    harness: Harness, offset: float
) -> None:
    now = lambda: harness.clock.seconds() + offset  # noqa: E731
    skew = ClockSkew(now)
    gateway = Coordinator(harness.cluster, NodeClients(harness.peers, skew.observe), HybridClock(skew.cluster_now, "g"))
    settled(harness, gateway.write("warm", "up"))  # its nodes' answers carry their clocks
    assert abs(skew.cluster_now() - harness.clock.seconds()) < 0.01
    version, _ = settled(harness, gateway.write("lease", "held", ttl=600))
    assert expires(version) == pytest.approx(harness.clock.seconds() + 600, abs=0.01)
    harness.clock.advance(599)
    assert settled(harness, harness.coordinator.read("lease")) == ("held", version)


def test_a_gateway_within_a_second_of_its_nodes_keeps_its_own_clock() -> None:
    wall = [1000.0]
    skew = ClockSkew(lambda: wall[0])
    for node_id, node_now in (("a", 999.5), ("b", 999.4), ("c", 1000.3)):
        skew.observe(node_id, node_now)
    assert skew.cluster_now() == 1000.0
    skew.observe("a", 1002.0)
    skew.observe("b", 1002.5)  # two of three are 2 s ahead of it now: the median moves it
    assert skew.cluster_now() == pytest.approx(1002.0)


def test_one_node_of_three_never_moves_a_gateways_clock_nor_a_departed_one() -> None:
    wall = [1000.0]
    skew = ClockSkew(lambda: wall[0])
    skew.keep(["a", "b", "c"])
    skew.observe("a", 1000.0 + 3600)  # the first to answer after a restart is an hour fast
    assert skew.cluster_now() == 1000.0, "one node of three is no majority"
    skew.observe("b", 1000.0)
    skew.observe("c", 1000.1)
    assert skew.cluster_now() == 1000.0, "the low median of a, b, c is b's"
    skew.observe("b", 1000.0 + 3600)  # two of three an hour ahead: the nodes' time is theirs
    assert skew.cluster_now() == pytest.approx(1000.0 + 3600)
    skew.keep(["c", "d"])  # a and b left: their clocks vote no more
    assert set(skew.skews) == {"c"}
    wall[0] += MEDIAN_EVERY
    skew.observe("c", wall[0] + 0.1)
    skew.observe("d", wall[0])  # a majority of the members now: its low median is d's
    assert skew.cluster_now() == wall[0] and skew.largest() == pytest.approx(-0.1)


def test_a_skew_near_the_threshold_does_not_switch_the_correction_on_and_off() -> None:
    wall = [1000.0]
    skew = ClockSkew(lambda: wall[0])
    skew.keep(["a"])
    seen = []
    for node_ahead in (1.02, 0.98, 1.01, 0.97, 0.6, 0.4):
        wall[0] += MEDIAN_EVERY
        skew.observe("a", wall[0] + node_ahead)
        seen.append(round(skew.cluster_now() - wall[0], 2))
    # On past 1 s, off only under half of it.
    assert seen == [1.02, 0.98, 1.01, 0.97, 0.6, 0.0]
