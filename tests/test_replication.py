"""
Replication in a deterministic simulation: registry, nodes and a gateway in one process over
an in-memory network on a Clock, with nodes that crash, come back, join and leave.

After quiescence every live key must sit on exactly its N owners with one version, keys must
be gone from every other node, and no acknowledged write may be lost.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred

from kvd.gateway.nodes import NodeClients
from kvd.gateway.repair import Repairer
from kvd.testing.cluster import TTL, Harness

NODES = ["n1", "n2", "n3", "n4", "n5"]


class Simulation:
    def __init__(self, harness: Harness) -> None:
        self.h = harness
        self.h.repairer.ranges_per_sweep = 256
        self.h.watcher.start()
        self.live: set[str] = set()
        self.crashed: set[str] = set()
        self.incarnations: dict[str, int] = {}
        # key -> last acknowledged value (None: deleted); keys with an unacknowledged write
        # after their last acknowledged one are uncertain.
        self.acknowledged: dict[str, str | None] = {}
        self.uncertain: set[str] = set()

    def begin(self, nodes: int, keys: int = 0) -> None:
        """Start the first C{nodes} nodes, let the gateway see them, and write C{keys} keys."""
        for n in NODES[:nodes]:
            self.start(n)
        self.h.advance(1)
        for i in range(keys):
            self.write(f"k{i}", f"v{i}")

    def start(self, node_id: str) -> None:
        self.incarnations[node_id] = self.incarnations.get(node_id, 0) + 1
        self.h.start_node(node_id, self.incarnations[node_id])
        self.live.add(node_id)
        self.crashed.discard(node_id)

    def crash(self, node_id: str) -> None:
        if node_id in self.live:
            self.h.crash_node(node_id)
            self.live.discard(node_id)
            self.crashed.add(node_id)

    def leave(self, node_id: str) -> None:
        if node_id in self.live:
            ensureDeferred(self.h.heartbeats[node_id].stop())
            self.h.settle()
            self.h.network.down.add(f"{node_id}.test")
            self.live.discard(node_id)

    def write(self, key: str, value: str | None) -> None:
        status, _ = self.h.gateway("PUT" if value is not None else "DELETE", f"/kv/{key}", value and value.encode())
        if status == 200 or (value is None and status == 404):
            self.acknowledged[key] = value
            self.uncertain.discard(key)
        else:
            assert status == 503, status
            self.uncertain.add(key)

    def sweep(self) -> None:
        ensureDeferred(self.h.repairer.sweep())
        self.h.settle()

    def quiesce(self) -> None:
        """Let membership settle (crashed nodes expire) and sweep until nothing changes."""
        self.h.advance(TTL * 2)
        for _ in range(6):
            self.sweep()
            self.h.advance(1)

    def check(self) -> None:
        members = set(self.h.cluster.members)
        assert members == self.live, (members, self.live)
        stores = {n: self.h.stores[n] for n in members}
        keys = set()
        for store in stores.values():
            keys.update(k for k, _ in store.entries())
        for key in keys:
            owners = self.h.cluster.owners(key)
            entries = {n: stores[n].entry(key) for n in owners}
            assert len(set(entries.values())) == 1 and None not in entries.values(), (key, entries)
            holders = {n for n, s in stores.items() if s.entry(key) is not None}
            assert holders == set(owners), (key, holders, owners)
        for key, value in self.acknowledged.items():
            if key in self.uncertain:
                continue
            status, body = self.h.gateway("GET", f"/kv/{key}")
            if value is None:
                assert status == 404, (key, body)
            else:
                assert (status, body.get("value")) == (200, value), key


@pytest.fixture
def simulation(tmp_path: Path) -> Any:
    harness = Harness(tmp_path)
    try:
        yield Simulation(harness)
    finally:
        harness.close()


def test_a_node_that_missed_writes_catches_up_without_reads(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.crash("n2")
    for i in range(40):
        simulation.write(f"k{i}", f"v{i}")
    simulation.start("n2")
    simulation.h.advance(1)
    for _ in range(3):
        simulation.sweep()
    assert len(simulation.h.stores["n2"]) == 40, "every write reached n2 without a client reading it"
    simulation.quiesce()
    simulation.check()


def test_writes_while_a_replica_is_down_go_to_a_fallback_and_move_back(simulation: Simulation) -> None:
    simulation.begin(4)
    simulation.crash("n1")
    simulation.crash("n2")  # keys owned by n1, n2 and one other need a fallback for W=2
    for i in range(40):
        simulation.write(f"k{i}", f"v{i}")
    assert not simulation.uncertain, "every write made its quorum"
    simulation.start("n1")
    simulation.start("n2")
    simulation.quiesce()
    simulation.check()


def test_a_join_moves_keys_to_the_new_node_and_off_the_old_ones(simulation: Simulation) -> None:
    simulation.begin(3, 60)
    simulation.start("n4")
    simulation.quiesce()
    simulation.check()
    assert 0 < len(simulation.h.stores["n4"]) < 60


def test_a_leave_re_replicates_the_leavers_keys(simulation: Simulation) -> None:
    simulation.begin(4, 60)
    simulation.leave("n2")
    simulation.quiesce()
    simulation.check()


def test_replicas_converge_on_the_newest_write_and_deletes_win_over_older_values(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.write("k", "first")
    simulation.crash("n3")
    simulation.write("k", "second")
    simulation.write("gone", "x")
    simulation.write("gone", None)
    simulation.start("n3")
    simulation.quiesce()
    simulation.check()


def test_tombstones_are_collected_once_every_replica_has_them_and_the_grace_passed(simulation: Simulation) -> None:
    simulation.begin(3)
    simulation.write("k", "v")
    simulation.write("k", None)
    simulation.quiesce()
    assert all(s.entry("k") == (None, s.entry("k")[1]) for s in simulation.h.stores.values())  # type: ignore[index]
    simulation.h.advance(61)  # the harness's grace is 60 s
    simulation.sweep()
    simulation.sweep()
    assert all(s.entry("k") is None for s in simulation.h.stores.values())
    simulation.check()


actions = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 9), st.text(max_size=3)),
        st.tuples(st.just("delete"), st.integers(0, 9)),
        st.tuples(st.sampled_from(["crash", "start", "leave"]), st.sampled_from(NODES)),
        st.tuples(st.just("advance"), st.integers(1, 12)),
        st.tuples(st.just("sweep")),
    ),
    max_size=30,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(actions)
def test_any_schedule_of_writes_crashes_joins_and_leaves_converges(
    tmp_path_factory: pytest.TempPathFactory, schedule: list[Any]
) -> None:
    harness = Harness(tmp_path_factory.mktemp("sim"))
    try:
        simulation = Simulation(harness)
        for n in NODES[:3]:
            simulation.start(n)
        harness.advance(1)
        for action in schedule:
            kind = action[0]
            if kind == "put":
                simulation.write(f"k{action[1]}", action[2])
            elif kind == "delete":
                simulation.write(f"k{action[1]}", None)
            elif kind == "crash":
                simulation.crash(action[1])
            elif kind == "start" and action[1] not in simulation.live:
                simulation.start(action[1])
            elif kind == "leave" and len(simulation.live) > 3:
                # A node leaving takes its copies with it: as an operator would, let the
                # cluster re-replicate before anything else happens.
                simulation.leave(action[1])
                harness.advance(1)
                simulation.sweep()
            elif kind == "advance":
                harness.advance(action[1])
            elif kind == "sweep":
                simulation.sweep()
        for n in sorted(simulation.crashed):
            simulation.start(n)  # every crashed node comes back in the end
        for n in NODES:
            if len(simulation.live) < 3 and n not in simulation.live:
                simulation.start(n)  # enough nodes for the quorums
        simulation.quiesce()
        simulation.check()
    finally:
        harness.close()


def test_each_node_shows_what_the_last_sweep_moved_for_it(simulation: Simulation) -> None:
    simulation.begin(3, 60)
    simulation.start("n4")
    simulation.h.advance(1)
    simulation.sweep()
    reports = {n: simulation.h.call("GET", f"http://{n}.test/node")[1]["rebalance"] for n in NODES[:4]}
    received = len(simulation.h.stores["n4"])
    assert received > 0
    assert sum(r["sent"] for r in reports.values()) == received, reports
    assert sum(r["dropped"] for r in reports.values()) == received, "each key n4 took left one old owner"
    assert all(r["keys_to_send"] >= r["sent"] and r["last_error"] is None for r in reports.values())


def test_a_membership_change_during_a_sweep_does_not_break_it(simulation: Simulation) -> None:
    simulation.begin(3, 30)

    class JoinMidway(Repairer):
        joined = False

        async def _listings(self, clients: Any, buckets: list[int]) -> Any:
            if not self.joined:
                self.joined = True
                simulation.start("n4")  # the gateway learns of n4 while the sweep is running
            return await super()._listings(clients, buckets)

    h = simulation.h
    nodes = NodeClients(h.peers)
    repairer = h.repairer = JoinMidway(h.cluster, nodes, h.clock.seconds, tombstone_grace=60, ranges_per_sweep=256)
    simulation.sweep()
    assert repairer.joined and repairer.progress.last_error is None
    simulation.quiesce()
    simulation.check()


def test_an_unexpected_error_in_a_sweep_is_logged_and_the_next_sweep_still_runs(simulation: Simulation) -> None:
    simulation.start("n1")
    h = simulation.h

    class Broken(Repairer):
        async def _sweep(self, view: Any) -> None:
            raise KeyError("a bug")

    repairer = Broken(h.cluster, NodeClients(h.peers), h.clock.seconds)
    results: list[Any] = []
    ensureDeferred(repairer.sweep()).addBoth(results.append)
    assert results == [None], "sweep() itself never fails: a failure would stop its TimerService"
    assert "unexpectedly" in (repairer.progress.last_error or "")
    assert not repairer._running


def test_a_sweep_lists_a_few_ranges_at_a_time_so_its_memory_does_not_follow_the_key_count(
    simulation: Simulation,
) -> None:
    """A node back after missing every write: the sweep lists its stale ranges in steps, not all at once."""
    simulation.begin(3)
    simulation.crash("n2")
    for i in range(300):
        simulation.write(f"k{i}", f"v{i}")
    simulation.start("n2")
    simulation.h.advance(1)
    listed: list[int] = []

    class Counting(Repairer):
        async def _listings(self, clients: Any, buckets: list[int]) -> Any:
            listed.append(len(buckets))
            return await super()._listings(clients, buckets)

    h = simulation.h
    h.repairer = Counting(h.cluster, NodeClients(h.peers), h.clock.seconds, ranges_per_sweep=256, ranges_per_step=8)
    simulation.sweep()
    assert len(listed) > 1 and max(listed) <= 8, listed
    assert len(simulation.h.stores["n2"]) == 300, "every step's keys reached n2 in the one sweep"
    simulation.quiesce()
    simulation.check()
