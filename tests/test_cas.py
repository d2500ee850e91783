"""
Conditional writes in the deterministic simulation: three nodes, each with its store and
its Paxos acceptor, and two gateways (two proposers) on one Clock over the in-memory network,
with nodes down, paused and proposers that stop half-way.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from kvd.gateway import Cluster
from kvd.gateway.cas import Proposer
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.health import MIN_HEDGE
from kvd.gateway.nodes import NodeClients
from kvd.membership import NodeInfo
from kvd.paxos import Acceptor, Proposal
from kvd.resources import GatewayAPI, NodeAPI
from kvd.store import Store
from kvd.testing.network import Network
from kvd.versions import HybridClock

NODES = ("a", "b", "c")
GATEWAYS = ("gw1", "gw2")


class CasCluster:
    def __init__(self, directory: str, seed: int = 0) -> None:
        self.directory = directory
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.network = Network(self.clock)
        self.client = self.network.peers(timeout=600.0)
        self.stores: dict[str, Store] = {}
        self.acceptors: dict[str, Acceptor] = {}
        self.proposers: dict[str, Proposer] = {}
        members = {n: NodeInfo(n, f"http://{n}.test") for n in NODES}
        for node_id in NODES:
            self.start_node(node_id)
        for number, gw in enumerate(GATEWAYS):
            cluster = Cluster(vnodes=16, replicas=3)
            cluster.update(members)
            nodes = NodeClients(self.network.peers(gw, timeout=2.0))
            clock = HybridClock(self.clock.seconds, gw)
            coordinator = Coordinator(cluster, nodes, clock)
            proposer = Proposer(cluster, nodes, clock, self.clock, random=random.Random(seed + number).random)
            self.proposers[gw] = proposer
            self.network.serve(f"{gw}.test", GatewayAPI(cluster, coordinator, proposer=proposer).resource())

    def start_node(self, node_id: str) -> None:
        store = Store.open(f"{self.directory}/{node_id}", clock=HybridClock(self.clock.seconds, node_id))
        acceptor = Acceptor.in_store(store)
        self.stores[node_id], self.acceptors[node_id] = store, acceptor
        self.network.down.discard(f"{node_id}.test")
        self.network.serve(f"{node_id}.test", NodeAPI(node_id, store, acceptor=acceptor).resource())

    def crash_node(self, node_id: str) -> None:
        self.network.down.add(f"{node_id}.test")
        self.stores[node_id].abandon()

    def start(self, method: str, gw: str, key: str, body: bytes | None = None, **headers: str) -> Deferred[Any]:
        async def call() -> tuple[int, Any]:
            lines = b"".join(b"%s: %s\r\n" % (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items())
            answer = await self.client.call(method, f"http://{gw}.test/kv/{key}", body, headers=lines)
            return answer.status, json.loads(answer.body)

        return ensureDeferred(call())

    def run(self, *started: Deferred[Any], limit: float = 120.0) -> list[Any]:
        results: dict[int, Any] = {}
        for i, d in enumerate(started):
            d.addBoth(lambda r, i=i: results.__setitem__(i, r))
        elapsed = 0.0
        while True:
            self.network.flush()
            if len(results) == len(started) or elapsed > limit:
                break
            self.clock.advance(0.001 if elapsed < 1 else 0.25)
            elapsed += 0.001 if elapsed < 1 else 0.25
        assert len(results) == len(started), "requests did not finish"
        for r in results.values():
            if hasattr(r, "raiseException"):
                r.raiseException()
        return [results[i] for i in range(len(started))]

    def call(self, method: str, gw: str, key: str, body: bytes | None = None, **headers: str) -> tuple[int, Any]:
        result: tuple[int, Any] = self.run(self.start(method, gw, key, body, **headers))[0]
        return result

    def close(self) -> None:
        for node_id, store in self.stores.items():
            if f"{node_id}.test" not in self.network.down:
                store.abandon()


@pytest.fixture
def cas(tmp_path: Any) -> Iterator[CasCluster]:
    c = CasCluster(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


def test_if_none_match_creates_once_and_then_answers_412_with_the_version(cas: CasCluster) -> None:
    status, body = cas.call("PUT", "gw1", "k", b"one", if_none_match="*")
    assert status == 200 and body["value"] == "one"
    status, again = cas.call("PUT", "gw2", "k", b"two", if_none_match="*")
    assert (status, again) == (
        412,
        {"success": False, "key": "k", "version": body["version"], "error": again["error"]},
    )
    assert cas.call("GET", "gw2", "k")[1]["value"] == "one"


def test_if_match_writes_only_over_the_named_version(cas: CasCluster) -> None:
    version = cas.call("PUT", "gw1", "k", b"one")[1]["version"]
    assert cas.call("PUT", "gw1", "k", b"x", if_match='"0000"')[0] == 412
    status, body = cas.call("PUT", "gw2", "k", b"two", if_match=f'W/"{version}"')
    assert status == 200 and body["version"] > version
    assert cas.call("PUT", "gw1", "k", b"three", if_match=version)[1]["version"] == body["version"]
    assert cas.call("GET", "gw1", "k")[1] == {"success": True, "key": "k", "value": "two", "version": body["version"]}
    status, gone = cas.call("DELETE", "gw1", "k", if_match=f'"{body["version"]}"')
    assert status == 200
    assert cas.call("GET", "gw2", "k")[0] == 404
    assert cas.call("PUT", "gw2", "absent", b"v", if_match="*") == (
        412,
        {"success": False, "key": "absent", "version": None, "error": "If-Match failed: the key does not exist"},
    )


def test_a_conditional_write_takes_ttl_and_an_expired_entry_counts_as_absent(cas: CasCluster) -> None:
    status, body = cas.call("PUT", "gw1", "k?ttl=10", b"lease", if_none_match="*")
    assert status == 200 and body["expires"] == cas.clock.seconds() + 10
    version = body["version"]
    assert cas.call("PUT", "gw2", "k?ttl=10", b"other", if_none_match="*") == (
        412,
        {"success": False, "key": "k", "version": version, "error": "If-None-Match: * failed: the key exists"},
    )
    for node_id in NODES:
        assert cas.stores[node_id].entry("k") == ("lease", version), "every owner holds the expiry in the version"
    cas.clock.advance(9.5)
    status, renewed = cas.call("PUT", "gw2", "k?ttl=10", b"lease", if_match=f'"{version}"')
    assert status == 200 and renewed["expires"] == cas.clock.seconds() + 10, "renewed before it expired"
    cas.clock.advance(10)
    assert cas.call("GET", "gw1", "k")[0] == 404
    assert cas.call("PUT", "gw1", "k", b"x", if_match=f'"{renewed["version"]}"') == (
        412,
        {"success": False, "key": "k", "version": None, "error": "If-Match failed: the key does not exist"},
    )
    status, taken = cas.call("PUT", "gw1", "k", b"mine", if_none_match="*")
    assert status == 200 and "expires" not in taken, "expired counts as absent; no ttl: permanent"
    cas.clock.advance(100)
    assert cas.call("GET", "gw2", "k")[1]["value"] == "mine"
    assert cas.call("PUT", "gw1", "k?ttl=0", b"v", if_match="*")[0] == 400


def test_bad_precondition_headers_are_400(cas: CasCluster) -> None:
    assert cas.call("DELETE", "gw1", "k", if_none_match="*")[0] == 400
    assert cas.call("PUT", "gw1", "k", b"v", if_none_match='"x"')[0] == 400
    assert cas.call("PUT", "gw1", "k", b"v", if_match='"a", "b"')[0] == 400
    assert cas.call("PUT", "a", "k", b"v", if_none_match="nope")[0] == 400


def test_a_node_checks_its_own_conditional_writes(cas: CasCluster) -> None:
    status, body = cas.call("PUT", "a", "k", b"one", if_none_match="*")
    assert status == 200
    assert cas.call("PUT", "a", "k", b"two", if_none_match="*")[1]["version"] == body["version"]
    assert cas.call("PUT", "a", "k", b"two", if_match=f'"{body["version"]}"')[0] == 200
    assert cas.call("DELETE", "a", "k", if_match=f'"{body["version"]}"')[0] == 412


def test_two_gateways_racing_on_one_precondition_have_one_winner(cas: CasCluster) -> None:
    version = cas.call("PUT", "gw1", "k", b"start")[1]["version"]
    cas.crash_node("c")
    races = [cas.start("PUT", gw, "k", f"{gw}-{i}".encode(), if_match=version) for i in range(3) for gw in GATEWAYS]
    results = cas.run(*races)
    winners = [body for status, body in results if status == 200]
    assert len(winners) == 1, results
    assert all(status == 412 for status, _ in results if status != 200)
    assert cas.call("GET", "gw2", "k")[1]["value"] == winners[0]["value"]


def test_without_a_majority_of_owners_a_conditional_write_is_503(cas: CasCluster) -> None:
    cas.call("PUT", "gw1", "k", b"start")
    cas.crash_node("b")
    cas.network.pause("c.test")
    status, body = cas.call("PUT", "gw1", "k", b"v", if_none_match="*")
    assert status == 503 and body["success"] is False
    # Its receipt, as any write's 503: nobody took it; it was never proposed, so it never appears.
    assert (body["replicas"], body["hinted"], body["partial"]) == ([], {}, False)


def test_a_paused_owner_does_not_stop_conditional_writes(cas: CasCluster) -> None:
    cas.network.pause("a.test")
    assert cas.call("PUT", "gw1", "k", b"one", if_none_match="*")[0] == 200
    assert cas.call("PUT", "gw2", "k", b"two", if_none_match="*")[0] == 412


def test_a_round_asks_a_majority_of_the_owners_and_another_in_place_of_a_slow_one(cas: CasCluster) -> None:
    assert cas.call("PUT", "gw1", "k", b"v", if_none_match="*")[0] == 200
    asked = [n for n in NODES if cas.acceptors[n].state("k") != ("", None)]
    assert len(asked) == 2, "prepare and accept go to a majority only"
    assert all(cas.stores[n].entry("k") == ("v", cas.acceptors[asked[0]].state("k")[0]) for n in NODES), (
        "the commit goes to every owner"
    )
    cas.network.pause(f"{asked[0]}.test")
    assert cas.call("PUT", "gw1", "k", b"w", if_match="*")[0] == 200
    (spare,) = set(NODES) - set(asked)
    assert cas.acceptors[spare].state("k")[1] is not None, "the owner not asked first stood in for the paused one"


def test_a_round_asks_one_more_owner_only_once_twice_the_usual_worst_latency_has_passed(cas: CasCluster) -> None:
    # A hedged prepare or accept costs one more node a durable write, and an item may wait for
    # the batch in flight before its own: so a round hedges later than a read does.
    assert cas.call("PUT", "gw1", "k", b"v", if_none_match="*")[0] == 200
    asked = [n for n in NODES if cas.acceptors[n].state("k") != ("", None)]
    (spare,) = set(NODES) - set(asked)
    cas.network.pause(f"{asked[0]}.test")
    # Every owner has answered in no time on the simulated clock: the usual worst is the
    # least a read hedges after, MIN_HEDGE.
    d = cas.start("PUT", "gw1", "k", b"w", if_match="*")
    waited = 0.0
    while waited < 1.8 * MIN_HEDGE:
        cas.network.flush()
        cas.clock.advance(0.0005)
        waited += 0.0005
    cas.network.flush()
    assert cas.acceptors[spare].state("k") == ("", None), "no hedge before twice the usual worst"
    cas.clock.advance(0.3 * MIN_HEDGE)
    cas.network.flush()
    assert cas.acceptors[spare].state("k")[0] != "", "the spare owner was asked once that passed"
    assert cas.run(d)[0][0] == 200


def _crash_after_accept(cas: CasCluster, on: tuple[str, ...], key: str, value: str) -> str:
    """A proposer that prepared at every owner, then had one accept land on C{on} and died."""
    ballot = HybridClock(cas.clock.seconds, "gw-crashed").next()
    for node_id in NODES:
        cas.acceptors[node_id].prepare(key, ballot)
    for node_id in on:
        cas.acceptors[node_id].accept(key, Proposal(ballot, value, ballot))
    return ballot


def test_a_proposal_a_crashed_proposer_left_accepted_is_finished_by_the_next(cas: CasCluster) -> None:
    version = cas.call("PUT", "gw1", "k", b"start")[1]["version"]
    cas.clock.advance(1)
    left = _crash_after_accept(cas, ("a",), "k", "from-the-dead")
    cas.crash_node("c")  # the next proposer's quorum must include a
    status, body = cas.call("PUT", "gw2", "k", b"late", if_match=version)
    assert (status, body["version"]) == (412, left)
    assert cas.proposers["gw2"].recovered == 1
    assert cas.call("GET", "gw1", "k")[1]["value"] == "from-the-dead"
    assert cas.stores["a"].entry("k") == ("from-the-dead", left)
    assert cas.call("PUT", "gw1", "k", b"next", if_match=left)[0] == 200


def test_a_read_after_a_majority_accepted_sees_the_value_once_a_proposer_finishes_it(cas: CasCluster) -> None:
    cas.call("PUT", "gw1", "k", b"start")
    cas.clock.advance(1)
    left = _crash_after_accept(cas, ("b", "c"), "k", "chosen")
    status, body = cas.call("PUT", "gw1", "k", b"other", if_match="*")
    assert status == 200 and body["version"] > left
    assert cas.proposers["gw1"].recovered == 1
    # The chosen value was written before "other" went over it.
    assert cas.call("GET", "gw2", "k")[1]["value"] == "other"


def test_acceptors_forget_committed_proposals_when_compacting(cas: CasCluster) -> None:
    acceptor = cas.acceptors["a"]
    # Its records are in the store's journal: the store's compaction is the acceptor's.
    cas.stores["a"].compact_min_bytes = 0
    # A round asks a majority of the owners, the first ones in placement order: keys whose first two include a.
    view = cas.proposers["gw1"].cluster.view()
    keys = [key for key in (f"k{i}" for i in range(100)) if "a" in view.placement(key)[0][:2]][:5]
    for key in keys:
        cas.call("PUT", "gw1", key, b"v", if_none_match="*")
    assert len(acceptor) <= 1
    assert acceptor.floor != ""


class PaxosSpy:
    """A gateway's transport that remembers the items of every /internal/paxos request, by node."""

    def __init__(self, peers: Any) -> None:
        self.peers = peers
        self.items: list[tuple[str, list[Any]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.peers, name)

    def call(self, method: str, url: str, body: bytes | None = None, **kw: Any) -> Any:
        if url.endswith("/internal/paxos"):
            host = url.split("//", 1)[1].split(".", 1)[0]
            self.items += [(host, item) for item in json.loads(body or b"{}")["items"]]
        return self.peers.call(method, url, body, **kw)


def test_owners_that_accepted_a_proposal_are_sent_its_commit_by_key_and_version_only(cas: CasCluster) -> None:
    spy = PaxosSpy(cas.proposers["gw1"].nodes.peers)
    cas.proposers["gw1"].nodes.peers = spy
    version = cas.call("PUT", "gw1", "k", b"0")[1]["version"]
    for value in ("1", "22", "333"):
        status, body = cas.call("PUT", "gw1", "k", value.encode(), if_match=version)
        assert status == 200, body
        version = body["version"]
    accepted = {(node, item[4]) for node, item in spy.items if item[0] == "a"}
    short = [(node, item) for node, item in spy.items if item[0] == "k"]
    whole = [(node, item) for node, item in spy.items if item[0] == "c"]
    assert short, "once a node has said it takes them, commits to acceptors name key and version only"
    assert all(item == ["k", "k", item[2]] and (node, item[2]) in accepted for node, item in short)
    first_commits = {node for node, item in whole if (node, item[3]) in accepted}
    assert len(first_commits) == len([n for n, item in whole if (n, item[3]) in accepted]), (
        "an acceptor gets the whole commit of a proposal it accepted only until it has said it takes them"
    )
    assert len(short) + len(whole) == 3 * 3, "each write commits to all three owners"
    for node_id in NODES:
        assert cas.stores[node_id].entry("k") == ("333", version), node_id


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 1000),
    writers=st.lists(st.sampled_from(GATEWAYS), min_size=2, max_size=5),
    fault=st.sampled_from(["none", "down", "pause", "cut"]),
    victim=st.sampled_from(NODES),
    rounds=st.integers(1, 3),
)
def test_at_most_one_winner_per_precondition_and_reads_see_every_win(
    seed: int, writers: list[str], fault: str, victim: str, rounds: int
) -> None:
    directory = tempfile.mkdtemp()
    cas = CasCluster(directory, seed)
    try:
        version = cas.call("PUT", "gw1", "k", b"0")[1]["version"]
        if fault == "down":
            cas.crash_node(victim)
        elif fault == "pause":
            cas.network.pause(f"{victim}.test")
        elif fault == "cut":
            cas.network.cut("gw1", f"{victim}.test")
        wins: dict[str, str] = {}
        for r in range(rounds):
            started = [cas.start("PUT", gw, "k", f"{r}-{i}".encode(), if_match=version) for i, gw in enumerate(writers)]
            results = cas.run(*started)
            winners = [body for status, body in results if status == 200]
            assert len(winners) <= 1, results
            assert all(status in (200, 412) for status, _ in results), results
            if winners:
                wins[version] = winners[0]["version"]
                version = winners[0]["version"]
            for gw in GATEWAYS:
                status, body = cas.call("GET", gw, "k")
                assert status == 200 and body["version"] >= version, (body, version)
            version = cas.call("GET", "gw2", "k")[1]["version"]
        assert wins, "someone wins when a majority of owners is reachable"
    finally:
        cas.close()
        shutil.rmtree(directory)
