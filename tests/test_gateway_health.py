"""
The gateway's failure detector, and the routing around unreachable nodes it drives: unit
tests of L{kvd.gateway.health.Health}, and the whole cluster in the deterministic simulation
(registry, nodes and gateway over the in-memory network on a Clock) with hung, cut off and
killed nodes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from kvd.gateway.cluster import ClusterView
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.health import FIRST_PROBE_INTERVAL, FLAP_WINDOW, MAX_PROBE_INTERVAL, MIN_TIMEOUT, Health
from kvd.gateway.nodes import MAX_QUEUED, NodeClient, NodeClients
from kvd.gateway.quorum import QuorumFailed, gather
from kvd.membership import NodeInfo
from kvd.resources import GatewayAPI
from kvd.ring import Ring, node_points
from kvd.roles import gateway_metrics
from kvd.testing.cluster import Hang, Harness
from kvd.transport import PeerError, PeerTimeout, PeerUnreachable
from kvd.versions import HybridClock

# The failure detector alone.


def test_a_node_never_heard_from_gets_the_configured_timeout_and_a_known_one_a_learned_one() -> None:
    health = Health(Clock(), ceiling=5.0)
    assert health.timeout("a") == 5.0
    for _ in range(50):
        health.succeeded("a", 0.002)
    assert health.timeout("a") == MIN_TIMEOUT, "a fast node's deadline is the floor, not 5 s"
    for _ in range(50):
        health.succeeded("b", 0.5)
    assert 1.5 <= health.timeout("b") <= 2.0, "about three times a slow node's usual latency"
    for _ in range(50):
        health.succeeded("c", 10.0)
    assert health.timeout("c") == 5.0, "never more than --timeout"


def test_a_failure_marks_a_node_unreachable_at_once_and_probes_back_off_until_one_answers() -> None:
    clock = Clock()
    probes: list[tuple[str, float, float]] = []
    answers: list[Deferred[bool]] = []

    def probe(node_id: str, timeout: float) -> Deferred[bool]:
        probes.append((node_id, timeout, clock.seconds()))
        return answers.pop(0)

    health = Health(clock, ceiling=2.0, probe=probe)
    health.failed("a", "no answer within 0.1s")
    assert not health.reachable("a") and health.unreachable() == ["a"]
    assert health.to_json("a")["reachable"] is False
    answers += [fail(PeerUnreachable("a", "refused")), succeed(False), fail(PeerUnreachable("a", "refused"))]
    for gap in (FIRST_PROBE_INTERVAL, 2 * FIRST_PROBE_INTERVAL, 4 * FIRST_PROBE_INTERVAL):
        count = len(probes)
        clock.advance(gap * 0.99)
        assert len(probes) == count, "not before the backoff"
        clock.advance(gap * 0.01)
        assert len(probes) == count + 1, "and then at once"
    assert all(timeout == 2.0 for _, timeout, _ in probes)
    assert not health.reachable("a")
    answers.append(succeed(True))
    clock.advance(MAX_PROBE_INTERVAL)
    assert health.reachable("a"), "a probe answered 200"
    count = len(probes)
    clock.advance(MAX_PROBE_INTERVAL * 5)
    assert len(probes) == count, "a reachable node is not probed"


def test_a_node_that_answers_probes_but_fails_its_calls_is_probed_ever_less_often_not_every_tenth_of_a_second() -> None:
    """A half-broken node: its /healthz is well, its quorum answers garbage each time it is used again."""
    clock = Clock()
    probed: list[float] = []

    def probe(node_id: str, timeout: float) -> Deferred[bool]:
        probed.append(clock.seconds())
        return succeed(True)

    health = Health(clock, ceiling=2.0, probe=probe)

    def until_probed() -> float:
        """Seconds from now to the next probe, in steps of a hundredth of the first interval."""
        started, count = clock.seconds(), len(probed)
        while len(probed) == count:
            clock.advance(FIRST_PROBE_INTERVAL / 100)
        return clock.seconds() - started

    waits = []
    for _ in range(8):
        health.failed("a", "answered garbage")
        waits.append(until_probed())
        assert health.reachable("a"), "its probe answered"
    step = FIRST_PROBE_INTERVAL / 100
    assert waits == pytest.approx([min(MAX_PROBE_INTERVAL, FIRST_PROBE_INTERVAL * 2**n) for n in range(8)], abs=step)
    clock.advance(FLAP_WINDOW + step)
    health.failed("a", "refused")
    assert until_probed() == pytest.approx(FIRST_PROBE_INTERVAL, abs=step), "well for a while: it starts over"
    for _ in range(8):
        health.failed("a", "answered garbage")
        until_probed()
    health.succeeded("a", 0.002)
    health.failed("a", "refused")
    assert until_probed() == pytest.approx(FIRST_PROBE_INTERVAL, abs=step), (
        "it answered a call: no flap, it starts over"
    )


def test_a_member_that_left_while_unreachable_is_asked_again_when_it_joins_again() -> None:
    """Its judgement leaves with it: nothing is left to probe it, so it would never be asked again."""
    health = Health(Clock(), ceiling=2.0, probe=lambda node_id, timeout: Deferred())
    health.failed("a", "refused")
    health.failed("b", "refused")
    assert not health.reachable("a") and not health.reachable("b")
    health.keep(["b", "c"])
    assert health.reachable("a"), "a left: forgotten, judged anew if it joins again"
    assert not health.reachable("b") and health.unreachable() == ["b"]


def test_time_outs_never_leave_fewer_nodes_reachable_than_the_quorums_need_but_refusals_do() -> None:
    """When every node is slow the gateway is likely the slow one: it keeps asking the last ones."""
    health = Health(Clock(), ceiling=2.0, probe=lambda node_id, timeout: Deferred(), keep_at_least=2)
    for node_id in "abc":
        health.succeeded(node_id, 0.001)
    for node_id in "abc":
        health.failed(node_id, "no answer within 0.5s", timed_out=True)
    assert [health.reachable(n) for n in "abc"] == [False, True, True]
    health.failed("b", "connection refused")
    assert [health.reachable(n) for n in "abc"] == [False, False, True]


def test_the_last_nodes_a_quorum_needs_get_the_whole_timeout_not_the_learned_deadline() -> None:
    """With one of three hung and W=2, a write has nobody to route to: it waits up to --timeout."""
    health = Health(Clock(), ceiling=2.0, probe=lambda node_id, timeout: Deferred(), keep_at_least=2)
    for node_id in "abc":
        health.succeeded(node_id, 0.001)
    assert [health.timeout(n) for n in "abc"] == [MIN_TIMEOUT] * 3, "all three up: learned deadlines"
    health.failed("b", "no answer within 0.5s", timed_out=True)
    assert health.timeout("a") == health.timeout("c") == 2.0
    health.succeeded("b", 0.001)
    assert health.timeout("a") == MIN_TIMEOUT, "and back to the learned one once it answers again"


def test_a_forgotten_member_is_no_longer_probed() -> None:
    clock = Clock()
    probes: list[str] = []
    health = Health(clock, probe=lambda node_id, timeout: (probes.append(node_id), Deferred())[1])
    health.failed("a", "refused")
    health.failed("b", "refused")
    health.keep(["b"])
    clock.advance(1)
    assert probes == ["b"]
    assert health.unreachable() == ["b"]


def test_a_hedged_gather_asks_the_next_candidate_after_the_delay_and_answers_with_the_first_needed() -> None:
    clock = Clock()
    hung: Deferred[str] = Deferred()
    answers = {"a": succeed("A"), "b": hung, "c": succeed("C")}
    done = gather(lambda n: answers[n], ["a", "b"], ["c"], 2, hedge=(clock, 0.01))
    assert not done.called
    clock.advance(0.01)
    assert done.called
    assert done.result.answers == {"a": "A", "c": "C"}
    assert not clock.getDelayedCalls(), "no hedge left scheduled once answered"


def test_a_quorum_failure_names_each_node_once_with_its_latest_reason() -> None:
    """An owner skipped at routing, then asked as a last resort, is one line of the error."""
    answers = {"a": fail(ConnectionRefusedError("refused")), "b": fail(TimeoutError("no answer within 2s"))}
    done = gather(lambda n: answers[n], ["a"], ["b"], 2, errors=["b: unreachable from this gateway"])
    gathered = done.result
    assert sorted(error.split(":")[0] for error in gathered.errors) == ["a", "b"]
    assert "b: no answer within 2s" in gathered.errors
    with pytest.raises(QuorumFailed) as failed:
        gathered.require("write", 2)
    assert str(failed.value).count("b:") == 1


# The per-node queue.


class NeverAnswers:
    """Peers whose calls never answer (a hung node), on a Clock."""

    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.timeout = 5.0
        self.calls = 0
        self.pending: list[Deferred[Any]] = []

    def call(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.calls += 1
        self.pending.append(Deferred())
        return self.pending[-1]


def test_writes_to_a_hung_node_do_not_queue_past_the_bound_and_fail_at_once_past_it() -> None:
    peers = NeverAnswers(Clock())
    client = NodeClient(NodeInfo("a", "http://a.test"), peers)  # type: ignore[arg-type]
    failed: list[Any] = []
    for i in range(MAX_QUEUED * 3):
        client.apply_key(f"k{i}", "v", "1").addErrback(failed.append)
    assert peers.calls == 1, "one batch in flight"
    assert len(client._applies.items) == MAX_QUEUED
    assert len(failed) == MAX_QUEUED * 3 - MAX_QUEUED - 1, "past the bound (one item went at once): failed at once"
    assert all(isinstance(f.value, PeerError) for f in failed)


def test_a_queue_of_large_values_is_bounded_by_their_size_too() -> None:
    peers = NeverAnswers(Clock())
    client = NodeClient(NodeInfo("a", "http://a.test"), peers)  # type: ignore[arg-type]
    failed: list[Any] = []
    big = "x" * (1024 * 1024)
    for i in range(100):
        client.apply_key(f"k{i}", big, "1").addErrback(failed.append)
    assert client._applies.chars <= 16 * 1024 * 1024 + len(big)
    assert failed, "the later ones fail at once"


def test_once_a_node_is_judged_unreachable_what_waits_for_it_fails_and_new_items_fail_at_once() -> None:
    clock = Clock()
    peers = NeverAnswers(clock)
    clients = NodeClients(peers)  # type: ignore[arg-type]
    client = clients(NodeInfo("a", "http://a.test"))
    waiting = [client.apply_key(f"k{i}", "v", "1") for i in range(10)]
    failures: list[Any] = []
    for d in waiting:
        d.addErrback(failures.append)
    # The batch in flight (one item) times out: the node is judged unreachable, and the nine that waited fail too.
    peers.pending[0].errback(PeerTimeout("http://a.test", "no answer within 5s"))
    assert not clients.health.reachable("a")
    assert len(failures) == 10 and all(isinstance(f.value, PeerError) for f in failures)
    assert [type(f.value) for f in failures[1:]] == [PeerUnreachable] * 9
    late: list[Any] = []
    client.read_key("k").addErrback(late.append)
    assert late and isinstance(late[0].value, PeerUnreachable) and peers.calls == 1


# The whole cluster.


class GatewayHarness(Harness):
    """The harness with the gateway's calls to nodes on their own source, so a test can cut them alone."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.gateway_peers = self.network.peers("gateway", timeout=2.0)
        self.nodes = NodeClients(self.gateway_peers)
        self.health = self.nodes.health
        self.coordinator = Coordinator(self.cluster, self.nodes, HybridClock(self.clock.seconds, "gw"))
        metrics = gateway_metrics(self.cluster, self.repairer, health=self.health)
        self.api = GatewayAPI(self.cluster, self.coordinator, metrics=metrics, repairer=self.repairer)
        self.network.serve("gateway.test", self.api.resource())

    def start(self, method: str, path: str, body: bytes | None = None) -> list[Any]:
        results: list[Any] = []
        ensureDeferred(self._call(method, "http://gateway.test" + path, body)).addBoth(results.append)
        self.settle()
        return results

    def timed(self, method: str, path: str, body: bytes | None = None, step: float = 0.005) -> tuple[float, Any]:
        """A request's answer, and how much simulated time it took."""
        started = self.clock.seconds()
        results = self.start(method, path, body)
        while not results:
            assert self.clock.seconds() - started < 10, f"{method} {path} did not finish"
            self.clock.advance(step)
            self.settle()
        return self.clock.seconds() - started, results[0]

    def warm_up(self, keys: int = 20) -> None:
        for i in range(keys):
            assert self.gateway("PUT", f"/kv/warm{i}", b"v")[0] == 200
            assert self.gateway("GET", f"/kv/warm{i}")[0] == 200

    def probe_time(self) -> None:
        """Let probes run (and the network move) for a few probe intervals."""
        self.advance(3 * MAX_PROBE_INTERVAL, step=0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[GatewayHarness]:
    h = GatewayHarness(tmp_path)
    h.watcher.start()
    for node_id in ("a", "b", "c"):
        h.start_node(node_id)
    h.advance(1)
    h.warm_up()
    try:
        yield h
    finally:
        h.health.stop()
        h.close()


def test_a_hung_node_costs_at_most_one_deadline_then_is_routed_around_and_used_again_once_it_answers(
    cluster: GatewayHarness,
) -> None:
    deadline = cluster.health.timeout("b")
    assert deadline == MIN_TIMEOUT, "learned from the warm-up: the in-memory network answers at once"
    cluster.network.pause("b.test")
    took, reads = [], []
    for i in range(10):
        elapsed, (status, _) = cluster.timed("PUT", f"/kv/k{i}", b"v%d" % i, step=0.001)
        assert status == 200
        took.append(elapsed)
        elapsed, (status, body) = cluster.timed("GET", f"/kv/k{i}", step=0.001)
        assert (status, body["value"]) == (200, f"v{i}")
        reads.append(elapsed)
    assert max(took + reads) <= deadline + 0.01, "nothing waits longer than the learned deadline"
    assert max(reads) <= 0.01 < deadline, "a read asks the third replica after the usual worst latency (hedging)"
    cluster.advance(deadline, step=deadline / 2)  # the batches sent to b before it hung run out of time
    assert not cluster.health.reachable("b"), "the hung node was judged unreachable"
    # From now on, requests do not wait on it at all: they finish without the clock moving.
    for i in range(20):
        assert cluster.start("PUT", f"/kv/later{i}", b"x")[0][0] == 200
        assert cluster.start("GET", f"/kv/later{i}")[0][1]["value"] == "x"
    status, body = cluster.gateway("GET", "/cluster")
    assert [n["reachable"] for n in body["nodes"]] == [True, False, True]
    assert cluster.gateway("GET", "/readyz")[0] == 200, "W=2 and R=2 are still reachable"

    cluster.network.resume("b.test")
    cluster.probe_time()
    assert cluster.health.reachable("b"), "probed and reachable again"
    assert cluster.gateway("PUT", "/kv/after", b"back")[0] == 200
    assert cluster.stores["b"].entry("after") is not None, "writes go to it again"


def write_while_b_and_c_stall_for_a_second(h: GatewayHarness) -> None:
    """
    A PUT of "stalled" while owners b and c stall together for a second: the first past its
    deadline is routed around, the other, the last a W=2 quorum needs, is waited for, and the
    write succeeds once they answer.
    """
    h.network.pause("b.test")
    h.network.pause("c.test")
    results = h.start("PUT", "/kv/stalled", b"v")
    h.advance(1.0, step=0.05)
    assert not results, "still waiting on the last owner the quorum needs"
    assert [h.health.reachable(n) for n in "bc"].count(False) == 1, "the first past its deadline is routed around"
    h.network.resume("b.test")
    h.network.resume("c.test")
    h.advance(0.1, step=0.05)
    assert results and results[0][0] == 200, results


def test_a_write_waits_the_whole_timeout_for_the_last_owners_a_quorum_needs_when_two_stall_at_once(
    cluster: GatewayHarness,
) -> None:
    """
    Two of three owners stall for a second together (an fsync on a shared disk, a loaded
    machine), longer than their learned deadline but within --timeout (2 s): the first past
    its deadline is routed around, the other is the last a quorum of W=2 needs and is waited
    for, and the write succeeds rather than failing in half a second (what CI once saw).
    """
    cluster.health.keep_at_least = 2
    assert cluster.health.timeout("b") == cluster.health.timeout("c") == MIN_TIMEOUT
    write_while_b_and_c_stall_for_a_second(cluster)
    assert sum(cluster.stores[n].entry("stalled") is not None for n in "abc") >= 2


def test_a_member_the_registry_has_down_is_no_spare_that_lets_the_last_owners_be_routed_around(
    tmp_path: Path,
) -> None:
    """
    Four members, d hung and marked down by the registry before this gateway called it (so
    its detector never judged it): writes go to a, b and c. Two of them stall for a second
    together (a loaded machine): d is no spare, so after the first is routed around the other
    is the last a quorum of W=2 needs and is waited for, and the write succeeds rather than
    failing in half a second (what tests/integration/test_down_processes.py once saw).
    """
    h = GatewayHarness(tmp_path)
    try:
        h.cluster.adopted = h.health.adopt  # as the gateway role wires it
        h.health.keep_at_least = 2
        for node_id in ("a", "b", "c", "d"):
            h.start_node(node_id)
        h.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abcd"})
        h.warm_up()
        assert all(h.health.timeout(n) == MIN_TIMEOUT for n in "abcd"), "every member answered the warm-up"
        h.network.pause("d.test")  # its machine hung: it stopped renewing, and its lease ran out
        h.cluster.update({**h.cluster.members, "d": NodeInfo("d", "http://d.test", status="down")})
        write_while_b_and_c_stall_for_a_second(h)
    finally:
        h.health.stop()
        h.close()


def test_an_owner_judged_unreachable_for_a_moment_stands_in_when_a_target_hangs_later(
    cluster: GatewayHarness,
) -> None:
    """
    A request routed while owner a was judged unreachable (a slow answer on a loaded machine),
    then b hangs: by b's deadline a answers probes again, and the request asks it instead of
    failing with one of two (what bench/chaos.py saw as 503s).
    """
    for method, body in (("PUT", b"m"), ("GET", None)):
        cluster.health.failed("a", "no answer within 0.5s", timed_out=True)
        assert not cluster.health.reachable("a")
        cluster.network.pause("b.test")
        elapsed, (status, answer) = cluster.timed(method, "/kv/warm3" if method == "GET" else "/kv/moment", body)
        assert status == 200, (method, answer)
        if method == "PUT":
            assert answer["hinted"] == {}, "an owner asked as a spare holds the write for itself, not as a hint"
        assert elapsed <= MIN_TIMEOUT + 0.05, "no longer than b's deadline"
        assert cluster.health.reachable("a"), "its probe answered meanwhile"
        cluster.network.resume("b.test")
        cluster.probe_time()
        assert cluster.health.reachable("b")


def test_a_node_cut_off_from_the_gateway_alone_is_routed_around_while_it_stays_registered(
    cluster: GatewayHarness,
) -> None:
    cluster.network.cut("gateway", "b.test")
    for i in range(10):
        assert cluster.start("PUT", f"/kv/cut{i}", b"c")[0][0] == 200, "a refusal is routed around at once"
        assert cluster.start("GET", f"/kv/cut{i}")[0][1]["value"] == "c"
    cluster.advance(30)
    assert cluster.registry.is_member("b"), "b still renews its lease"
    assert set(cluster.cluster.members) == {"a", "b", "c"}
    assert not cluster.health.reachable("b")
    assert cluster.stores["b"].entry("cut0") is None

    cluster.network.heal("gateway", "b.test")
    cluster.probe_time()
    assert cluster.health.reachable("b")
    cluster.repairer.ranges_per_sweep = 1 << 16
    done = ensureDeferred(cluster.repairer.sweep())
    cluster.settle()
    assert done.called
    assert all(cluster.stores["b"].entry(f"cut{i}") is not None for i in range(10)), "the writes reach it"


def test_a_killed_node_costs_nothing_after_the_first_refusal_and_readiness_follows(
    cluster: GatewayHarness,
) -> None:
    cluster.crash_node("b")
    assert cluster.start("GET", "/kv/warm0")[0][0] == 200
    assert not cluster.health.reachable("b")
    links = len([link for link in cluster.network.links if link.host == "b.test"])
    for i in range(10):
        assert cluster.start("GET", f"/kv/warm{i}")[0][0] == 200, "answered without the clock moving"
    assert links == 0 and not any(link.host == "b.test" for link in cluster.network.links)
    status, body = cluster.gateway("GET", "/readyz")
    assert status == 200 and body["reachable"] == ["a", "c"] and body["down"] == ["b"]

    cluster.crash_node("c")
    assert cluster.start("GET", "/kv/warm1")[0][0] == 503
    status, body = cluster.gateway("GET", "/readyz")
    assert status == 503 and body["success"] is False and (body["writes"], body["reads"]) == (False, False)
    assert body["reachable"] == ["a"] and body["down"] == ["b", "c"] and "not ready" in body["error"]
    # Every owner unreachable: a 503 at once, not after a timeout.
    results = cluster.start("PUT", "/kv/warm2", b"v")
    assert results and results[0][0] == 503 and "unreachable" in results[0][1]["error"]
    assert cluster.gateway("GET", "/healthz")[0] == 200, "/healthz stays a liveness check"


class Garbage(Resource):
    """A node that answers every request, /healthz too, 200 with C{body}: not a node's JSON."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Any) -> bytes:
        return self.body


@pytest.mark.parametrize("body", [b"<html>not a kvd node</html>", b'{"entries": "not a dict", "live": 7}'])
def test_a_node_answering_garbage_is_judged_unreachable_at_once_and_reachable_again_once_it_answers_well(
    cluster: GatewayHarness, body: bytes
) -> None:
    """
    A member whose quorum calls are answered with garbage (not JSON, or JSON of the wrong
    shape) is one no quorum can use: /cluster says it is unreachable, requests are routed
    around it without waiting, probes answered with garbage keep it so, and once it answers
    well it is used again.
    """
    node_b = cluster.network.sites["b.test"].resource
    cluster.network.serve("b.test", Garbage(body))
    for i in range(5):
        assert cluster.start("PUT", f"/kv/g{i}", b"v")[0][0] == 200, "answered without the clock moving"
        assert cluster.start("GET", f"/kv/g{i}")[0][0] == 200
    assert not cluster.health.reachable("b")
    reachable = {n["id"]: n["reachable"] for n in cluster.gateway("GET", "/cluster")[1]["nodes"]}
    assert reachable == {"a": True, "b": False, "c": True}
    cluster.probe_time()
    assert not cluster.health.reachable("b"), "a probe answered 200 with garbage: still unreachable"
    cluster.network.serve("b.test", node_b)
    cluster.probe_time()
    assert cluster.health.reachable("b"), "answering well again, it is reachable again"
    assert cluster.gateway("PUT", "/kv/after", b"back")[0] == 200
    assert cluster.stores["b"].entry("after") is not None, "writes go to it again"


class OtherSecret(Resource):
    """A node started with another cluster secret: /healthz well, every internal call 401."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/healthz":
            return b'{"success": true}'
        request.setResponseCode(401)
        return b'{"success": false, "error": "this request needs the cluster secret"}'


def test_a_node_refusing_the_cluster_secret_is_judged_unreachable_and_says_why(cluster: GatewayHarness) -> None:
    """
    A member whose every internal call is answered 401 (its --cluster-secret-file is not the
    gateway's) serves no quorum: /cluster says it is unreachable and why, and requests are
    routed around it, not sent to it every time while it is counted as reachable.
    """
    cluster.network.serve("b.test", OtherSecret())
    for i in range(5):
        assert cluster.start("PUT", f"/kv/s{i}", b"v")[0][0] == 200, "answered without the clock moving"
    assert not cluster.health.reachable("b")
    nodes = {n["id"]: n for n in cluster.gateway("GET", "/cluster")[1]["nodes"]}
    assert nodes["b"]["reachable"] is False and "cluster-secret" in nodes["b"]["unreachable_because"]
    assert nodes["a"]["reachable"] is True and nodes["c"]["reachable"] is True


def test_the_gateway_metrics_count_unreachable_nodes(cluster: GatewayHarness) -> None:
    cluster.crash_node("b")
    cluster.start("GET", "/kv/warm0")
    answer: list[Any] = []
    ensureDeferred(cluster.client.call("GET", "http://gateway.test/metrics")).addBoth(answer.append)
    cluster.settle()
    assert b"kvd_unreachable_nodes 1.0" in answer[0].body


def test_a_write_for_an_unreachable_owner_lands_on_the_next_reachable_member(tmp_path: Path) -> None:
    h = GatewayHarness(tmp_path)
    try:
        h.watcher.start()
        for node_id in ("a", "b", "c", "d"):
            h.start_node(node_id)
        h.advance(1)
        key = next(f"k{i}" for i in range(100) if h.cluster.view().placement(f"k{i}")[0][0] == "a")
        owners, fallbacks = h.cluster.view().placement(key)
        h.health.failed("a", "refused")
        assert h.start("PUT", f"/kv/{key}", b"v")[0][0] == 200
        assert h.stores["a"].entry(key) is None, "the unreachable owner was not asked"
        assert all(h.stores[n].entry(key) is not None for n in [*owners[1:], fallbacks[0]]), "a hint on the fallback"
    finally:
        h.health.stop()
        h.close()


def test_a_registry_down_member_is_not_asked(cluster: GatewayHarness) -> None:
    members = dict(cluster.cluster.members)
    members["b"] = NodeInfo("b", members["b"].url, status="down")
    cluster.cluster.update(members)
    cluster.network.pause("b.test")  # were it asked, the request would wait
    assert cluster.start("PUT", "/kv/k", b"v")[0][0] == 200
    assert cluster.start("GET", "/kv/k")[0][0] == 200
    assert json.loads(json.dumps(cluster.gateway("GET", "/readyz")[1]))["down"] == ["b"]


def test_a_replica_hung_from_the_start_costs_one_configured_timeout_at_most(tmp_path: Path) -> None:
    h = GatewayHarness(tmp_path)
    try:
        for node_id in ("a", "b"):
            h.start_node(node_id)
        h.network.serve("slow.test", Hang())
        h.cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in ("a", "b", "slow")})
        elapsed, (status, _) = h.timed("PUT", "/kv/k", b"v", step=0.05)
        assert status == 200 and elapsed == 0
        elapsed, (status, _) = h.timed("GET", "/kv/k", step=0.05)
        assert status == 200 and elapsed <= 2.0
    finally:
        h.health.stop()
        h.close()


# Readiness: the ring ranges that lack a read quorum.


def test_ranges_short_of_a_quorum_are_counted_exactly_whichever_members_are_unreachable() -> None:
    """The count that C{/readyz} reports, against a walk over every segment of the ring."""
    ids = "abcde"
    ring = Ring(dict.fromkeys(ids, 1), vnodes=16)
    members = {node_id: NodeInfo(node_id, f"http://127.0.0.1:{5000 + i}") for i, node_id in enumerate(ids)}
    view = ClusterView(members, ring, 3)
    points = 16 * len(ids)
    for unreachable, needed in [("", 2), ("a", 2), ("ab", 2), ("abc", 2), ("ab", 3), ("abcd", 1), ("abcde", 1)]:
        expected = sum(
            sum(owner not in unreachable for owner in ring.preference_list_at(point, 3)) < needed
            for node_id in ids
            for point in node_points(node_id, 16)
        )
        for _ in range(2):  # the second answer comes from the cache, and must be the same
            assert view.ranges_short_of(needed, lambda n, u=unreachable: n not in u) == expected, (unreachable, needed)
        if len(unreachable) <= 3 - needed:
            assert expected == 0, "no range can be short while enough members are reachable"
    assert view.ranges_short_of(1, lambda n: False) == points, "nothing reachable: every range is short"
