"""
Watches, the change feed and write receipts, in the cluster simulation (Clock + in-memory
network, real Klein resources and the production transport).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_replication import NODES, Simulation
from twisted.internet.defer import ensureDeferred

from kvd.gateway.feed import _merge, decode_cursor, encode_cursor
from kvd.gateway.nodes import ChangePage
from kvd.testing.cluster import Harness


class Follower:
    """A consumer of GET /changes: what it has seen of each key (the newest version)."""

    def __init__(self, harness: Harness, cursor: str | None = None) -> None:
        self.h = harness
        self.seen: dict[str, str] = {}
        self.values: dict[str, str | None] = {}
        if cursor is None:
            status, body = self.h.gateway("GET", "/changes")
            assert status == 200 and body["changes"] == [], body
            cursor = body["next"]
        self.cursor = cursor

    def take(self, body: Any) -> int:
        for change in body["changes"]:
            if change["version"] > self.seen.get(change["key"], ""):
                self.seen[change["key"]] = change["version"]
                self.values[change["key"]] = change["value"]
        self.cursor = body["next"]
        return len(body["changes"])

    def poll(self, limit: int = 100) -> int:
        status, body = self.h.gateway("GET", f"/changes?cursor={self.cursor}&limit={limit}")
        assert status == 200, body
        assert len(body["changes"]) <= limit
        return self.take(body)

    def drain(self) -> None:
        for _ in range(200):
            if self.poll() == 0:
                return
        raise AssertionError("the feed never ran dry")


class Acknowledged:
    """The versions of the writes the gateway acknowledged."""

    def __init__(self, simulation: Simulation) -> None:
        self.s = simulation
        self.versions: dict[str, str] = {}

    def write(self, key: str, value: str | None) -> None:
        h = self.s.h
        status, body = h.gateway("PUT" if value is not None else "DELETE", f"/kv/{key}", value and value.encode())
        if status == 200:
            self.versions[key] = body["version"]
        else:
            assert status in (404, 503), (status, body)

    def missed_by(self, follower: Follower) -> dict[str, tuple[str, str | None]]:
        return {
            key: (version, follower.seen.get(key))
            for key, version in self.versions.items()
            if follower.seen.get(key, "") < version
        }


def pending(harness: Harness, path: str) -> list[Any]:
    """Start a gateway request without waiting for it; the list gets (status, body) when it ends."""
    results: list[Any] = []
    ensureDeferred(harness._call("GET", "http://gateway.test" + path, None)).addBoth(results.append)
    harness.settle()
    return results


@pytest.fixture
def simulation(tmp_path: Path) -> Any:
    harness = Harness(tmp_path)
    try:
        yield Simulation(harness)
    finally:
        harness.close()


def test_the_cursor_is_opaque_but_round_trips() -> None:
    positions = {"a": ("e1", 3), "b": ("e2", 0)}
    assert decode_cursor(encode_cursor(positions)) == positions
    assert decode_cursor("0") == {}


def test_at_one_version_the_feed_reports_the_value_not_a_fast_nodes_tombstone_of_it() -> None:
    version = "0000000f4240000000.gw~99999"
    pages = {
        "fast": ChangePage("e1", 1, [("k", None, version)], False, [1]),
        "right": ChangePage("e2", 1, [("k", "v", version)], False, [1]),
    }
    for order in (pages, dict(reversed(pages.items()))):
        assert _merge(order, dict.fromkeys(order), 10) == [("k", "v", version)]


def test_a_bad_cursor_or_limit_is_a_400(simulation: Simulation) -> None:
    simulation.begin(3)
    for query in ("cursor=nonsense", "cursor=" + quote(encode_cursor({}) + "!!"), "limit=0", "limit=x", "wait=-1"):
        status, body = simulation.h.gateway("GET", f"/changes?{query}")
        assert status == 400 and body["success"] is False, (query, body)


def test_cursor_0_walks_everything_there_is_in_pages(simulation: Simulation) -> None:
    simulation.begin(3, keys=25)
    simulation.write("k3", None)
    follower = Follower(simulation.h, cursor="0")
    pages = 0
    while follower.poll(limit=4):
        pages += 1
    assert pages >= 7
    assert set(follower.seen) == {f"k{i}" for i in range(25)}
    assert follower.values["k3"] is None, "a delete shows as a null value"
    assert follower.values["k4"] == "v4"


def test_no_cursor_means_from_now_on(simulation: Simulation) -> None:
    simulation.begin(3, keys=5)
    follower = Follower(simulation.h)
    assert follower.poll() == 0
    simulation.write("new", "1")
    follower.drain()
    assert follower.values == {"new": "1"}


def test_a_long_poll_on_the_feed_wakes_at_the_write_and_holds_until_then(simulation: Simulation) -> None:
    simulation.begin(3)
    follower = Follower(simulation.h)
    waiting = pending(simulation.h, f"/changes?cursor={follower.cursor}&wait=60")
    simulation.h.advance(20)
    assert waiting == [], "nothing was written: the feed waits"
    simulation.write("k", "v")
    assert waiting, "the write ended the wait, with no time passing"
    status, body = waiting[0]
    assert status == 200 and [c["key"] for c in body["changes"]] == ["k"]


def test_a_long_poll_on_the_feed_ends_empty_after_its_wait(simulation: Simulation) -> None:
    simulation.begin(3)
    follower = Follower(simulation.h)
    waiting = pending(simulation.h, f"/changes?cursor={follower.cursor}&wait=5")
    simulation.h.advance(4)
    assert waiting == []
    simulation.h.advance(2)
    assert waiting and waiting[0][0] == 200 and waiting[0][1]["changes"] == []


def test_the_cursor_survives_a_node_being_down_and_its_restart(simulation: Simulation) -> None:
    simulation.begin(3)
    acked = Acknowledged(simulation)
    follower = Follower(simulation.h)
    acked.write("before", "1")
    follower.drain()
    simulation.crash("n1")
    for i in range(10):
        acked.write(f"down{i}", "x")
    follower.drain()
    cursor = decode_cursor(follower.cursor)
    assert "n1" in cursor, "the node that is down keeps its position"
    simulation.start("n1")
    simulation.h.advance(1)
    for i in range(5):
        acked.write(f"back{i}", "y")
    follower.drain()
    assert acked.missed_by(follower) == {}
    assert decode_cursor(follower.cursor)["n1"][0] != cursor["n1"][0], "the restarted node has a new epoch"


feed_actions = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 7), st.text(max_size=3)),
        st.tuples(st.just("delete"), st.integers(0, 7)),
        st.tuples(st.sampled_from(["crash", "start"]), st.sampled_from(NODES[:4])),
        st.tuples(st.just("advance"), st.integers(1, 12)),
        st.tuples(st.just("poll"), st.integers(1, 5)),
        st.tuples(st.just("sweep")),
    ),
    max_size=25,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(feed_actions)
def test_every_acknowledged_write_appears_in_the_feed_whatever_crashes_and_restarts(
    tmp_path_factory: pytest.TempPathFactory, schedule: list[Any]
) -> None:
    harness = Harness(tmp_path_factory.mktemp("feed"))
    try:
        simulation = Simulation(harness)
        simulation.begin(4)
        acked = Acknowledged(simulation)
        follower = Follower(harness)
        for action in schedule:
            kind = action[0]
            if kind == "put":
                acked.write(f"k{action[1]}", action[2])
            elif kind == "delete":
                acked.write(f"k{action[1]}", None)
            elif kind == "crash" and len(simulation.live) > 1:
                simulation.crash(action[1])
            elif kind == "start" and action[1] not in simulation.live:
                simulation.start(action[1])
            elif kind == "advance":
                harness.advance(action[1])
            elif kind == "poll":
                follower.poll(limit=action[1])
            elif kind == "sweep":
                simulation.sweep()
        for n in sorted(simulation.crashed):
            simulation.start(n)
        harness.advance(1)
        follower.drain()
        assert acked.missed_by(follower) == {}
    finally:
        harness.close()


# Watches.


def test_a_watch_answers_at_once_when_the_version_already_differs(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.write("k", "v1")
    status, body = simulation.h.gateway("GET", "/kv/k?wait=60&version=")
    assert (status, body["value"]) == (200, "v1")
    status, body = simulation.h.gateway("GET", "/kv/k?wait=60&version=0000-not-it")
    assert (status, body["value"]) == (200, "v1")


def test_a_watch_wakes_within_100ms_of_the_write(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.write("k", "v1")
    _, current = simulation.h.gateway("GET", "/kv/k")
    waiting = pending(simulation.h, f"/kv/k?wait=120&version={current['version']}")
    simulation.h.advance(30)
    assert waiting == [], "the version is still the watched one"
    started = simulation.h.clock.seconds()
    simulation.write("k", "v2")
    while not waiting and simulation.h.clock.seconds() - started < 0.1:
        simulation.h.clock.advance(0.01)
        simulation.h.settle()
    assert waiting, "the watch woke within 100 ms of simulated time"
    status, body = waiting[0]
    assert (status, body["value"]) == (200, "v2")


def test_a_watch_on_an_absent_key_wakes_when_it_appears_and_one_on_a_live_key_at_its_delete(
    simulation: Simulation,
) -> None:
    simulation.begin(3)
    waiting = pending(simulation.h, "/kv/new?wait=60&version=")
    simulation.h.advance(5)
    assert waiting == []
    simulation.write("new", "here")
    assert waiting and waiting[0][0] == 200 and waiting[0][1]["value"] == "here"
    version = waiting[0][1]["version"]
    deleted = pending(simulation.h, f"/kv/new?wait=60&version={version}")
    simulation.h.advance(5)
    assert deleted == []
    simulation.write("new", None)
    assert deleted and deleted[0][0] == 404


def test_a_watch_with_the_version_a_delete_answered_waits_for_the_next_write(simulation: Simulation) -> None:
    """The version a DELETE answers is the key's while it is absent: watching it is no busy loop."""
    simulation.begin(3)
    h = simulation.h
    simulation.write("gone", "v1")
    status, deleted = h.gateway("DELETE", "/kv/gone")
    assert status == 200
    waiting = pending(h, f"/kv/gone?wait=60&version={deleted['version']}")
    status, body = h.call("PUT", "http://n1.test/kv/mine", b"v1")
    h.call("DELETE", "http://n1.test/kv/mine")
    tombstone = h.stores["n1"].entry("mine")
    assert tombstone is not None and tombstone[0] is None
    on_node: list[Any] = []
    ensureDeferred(h._call("GET", f"http://n1.test/kv/mine?wait=60&version={tombstone[1]}", None)).addBoth(
        on_node.append
    )
    h.settle()
    h.advance(5)
    assert (waiting, on_node) == ([], [])
    simulation.write("gone", "back")
    h.call("PUT", "http://n1.test/kv/mine", b"back")
    assert waiting and (waiting[0][0], waiting[0][1]["value"]) == (200, "back")
    assert on_node and on_node[0][1]["value"] == "back"


def test_a_watch_answers_the_current_value_after_its_wait(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.write("k", "v1")
    _, current = simulation.h.gateway("GET", "/kv/k")
    waiting = pending(simulation.h, f"/kv/k?wait=10&version={current['version']}")
    simulation.h.advance(9)
    assert waiting == []
    simulation.h.advance(2)
    assert waiting and waiting[0][0] == 200 and waiting[0][1]["version"] == current["version"]
    missing = pending(simulation.h, "/kv/nothing?wait=3&version=")
    simulation.h.advance(4)
    assert missing and missing[0][0] == 404


def test_a_watch_still_wakes_with_an_owner_down(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.write("k", "v1")
    _, current = simulation.h.gateway("GET", "/kv/k")
    simulation.crash("n1")
    waiting = pending(simulation.h, f"/kv/k?wait=60&version={current['version']}")
    simulation.h.advance(3)
    assert waiting == []
    simulation.write("k", "v2")
    simulation.h.advance(0.5)
    assert waiting and waiting[0][1]["value"] == "v2"


def test_a_node_watches_its_own_copy(simulation: Simulation) -> None:
    simulation.begin(1)
    h = simulation.h
    status, body = h.call("PUT", "http://n1.test/kv/k", b"v1")
    results: list[Any] = []
    ensureDeferred(h._call("GET", f"http://n1.test/kv/k?wait=30&version={body['version']}", None)).addBoth(
        results.append
    )
    h.settle()
    h.advance(5)
    assert results == []
    h.call("PUT", "http://n1.test/kv/k", b"v2")
    assert results and results[0][1]["value"] == "v2"


def test_idle_watchers_hold_one_internal_long_poll_per_node(simulation: Simulation) -> None:
    simulation.begin(3)
    waiting = [pending(simulation.h, f"/kv/k{i}?wait=60&version=") for i in range(50)]
    simulation.h.advance(5)
    assert not any(waiting)
    held = sum(api_waiting(simulation.h, n) for n in ("n1", "n2", "n3"))
    assert held == 3, "50 watchers, one shared long poll per node"
    simulation.write("k7", "v")
    assert waiting[7] and not any(w for i, w in enumerate(waiting) if i != 7)


def api_waiting(harness: Harness, node: str) -> int:
    resource = harness.network.sites[f"{node}.test"]
    site_resource = getattr(resource, "resource", resource)
    return int(site_resource._api.changes.waiting)


# Receipts.


def test_a_write_says_which_replicas_took_it(simulation: Simulation) -> None:
    simulation.begin(3)
    status, body = simulation.h.gateway("PUT", "/kv/k", b"v")
    assert status == 200
    assert set(body["replicas"]) <= set(simulation.h.cluster.owners("k")) and len(body["replicas"]) >= 2
    assert body["hinted"] == {}


def test_a_write_held_by_a_fallback_says_for_which_owner(simulation: Simulation) -> None:
    simulation.begin(4)
    owners = simulation.h.cluster.owners("k")
    fallback = next(n for n in NODES[:4] if n not in owners)
    simulation.crash(owners[0])
    simulation.crash(owners[1])
    status, body = simulation.h.gateway("PUT", "/kv/k", b"v")
    assert status == 200, body
    assert sorted(body["replicas"]) == sorted([owners[2], fallback])
    assert body["hinted"] == {fallback: owners[0]} or body["hinted"] == {fallback: owners[1]}, body
    status, body = simulation.h.gateway("DELETE", "/kv/k")
    assert status == 200 and fallback in body["hinted"]


def test_a_write_with_an_older_version_that_lands_later_is_still_in_the_feed(simulation: Simulation) -> None:
    simulation.begin(3)
    h = simulation.h
    follower = Follower(h)
    old = "000000000001000000.elsewhere"
    items = json.dumps({"items": [["late", "from long ago", old]]}).encode()
    status, _ = h.call("POST", "http://n2.test/internal/apply", items)
    assert status == 200
    follower.drain()
    assert follower.seen == {"late": old} and follower.values == {"late": "from long ago"}


def test_a_failed_write_says_whether_it_may_still_appear(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.crash("n2")
    simulation.crash("n3")
    status, body = simulation.h.gateway("PUT", "/kv/k", b"v")
    assert status == 503
    assert body["replicas"] == ["n1"] and body["partial"] is True and body["hinted"] == {}
    simulation.crash("n1")
    status, body = simulation.h.gateway("PUT", "/kv/k", b"v")
    assert status == 503
    assert body["replicas"] == [] and body["partial"] is False
    assert json.dumps(body)


def test_a_node_answers_a_position_of_an_earlier_epoch_from_its_beginning(simulation: Simulation) -> None:
    simulation.begin(1)
    h = simulation.h
    for i in range(20):
        h.call("PUT", "http://n1.test/kv/same", str(i).encode())
    ask = {"since": None, "prefix": "", "limit": 100, "wait": 0}
    _, now = h.call("POST", "http://n1.test/internal/changes", json.dumps(ask).encode())
    assert now["changes"] == [] and now["next"] == 20
    simulation.crash("n1")
    simulation.start("n1")  # a new process: the index is rebuilt, one entry for "same"
    h.call("PUT", "http://n1.test/kv/after", b"x")
    old = {**ask, "since": [now["epoch"], now["next"]]}
    _, body = h.call("POST", "http://n1.test/internal/changes", json.dumps(old).encode())
    assert body["epoch"] != now["epoch"]
    assert [c[0] for c in body["changes"]] == ["same", "after"], "everything again, nothing missed"
    _, bad = h.call("POST", "http://n1.test/internal/changes", b'{"since": [1, 2]}')
    assert bad["success"] is False


def test_small_pages_over_many_nodes_still_give_every_key(simulation: Simulation) -> None:
    """A page cut by its limit moves each node's position only past what it took from it."""
    simulation.begin(5)
    follower = Follower(simulation.h)
    for i in range(30):
        simulation.write(f"k{i}", f"v{i}")
    polls = 0
    while follower.poll(limit=3):
        polls += 1
    assert polls >= 10
    assert set(follower.seen) == {f"k{i}" for i in range(30)}
