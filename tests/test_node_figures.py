"""
The per-node figures of C{GET /cluster} (L{kvd.gateway.figures}): each node's key count and
repair report from its own C{GET /node}, asked at most once per L{MAX_AGE} and never waited
on for longer than L{TIMEOUT}, and the requests this gateway has sent it. The whole cluster
in one process on the in-memory network and a Clock.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.web.resource import Resource

from kvd.gateway.figures import MAX_AGE, MAX_ANSWER, TIMEOUT, Figures, parse_node
from kvd.internal import RepairReport
from kvd.membership import NodeInfo
from kvd.testing.cluster import Hang, Harness
from kvd.transport import Answer

NODES = ("a", "b", "c")


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    harness.watcher.start()
    for node_id in NODES:
        harness.start_node(node_id)
    harness.advance(1)
    try:
        yield harness
    finally:
        harness.close()


def nodes(h: Harness) -> dict[str, dict[str, Any]]:
    status, body = h.gateway("GET", "/cluster")
    assert status == 200, body
    return {node["id"]: node for node in body["nodes"]}


def own_keys(h: Harness, node_id: str) -> int:
    status, body = h.call("GET", f"http://{node_id}.test/node")
    assert status == 200
    return int(body["keys"])


def timed_cluster(h: Harness, step: float = 0.05) -> tuple[float, int, dict[str, dict[str, Any]]]:
    """GET /cluster while the clock moves: how long it took (clock seconds), its status and its nodes."""
    results: list[Any] = []
    ensureDeferred(h._call("GET", "http://gateway.test/cluster", None)).addBoth(results.append)
    h.settle()
    started = h.clock.seconds()
    while not results:
        assert h.clock.seconds() - started < 30, "/cluster did not answer"
        h.clock.advance(step)
        h.settle()
    status, body = results[0]
    return h.clock.seconds() - started, status, {node["id"]: node for node in body["nodes"]}


def test_each_node_shows_its_own_live_key_count_and_the_requests_this_gateway_sent_it(h: Harness) -> None:
    for i in range(30):
        assert h.gateway("PUT", f"/kv/k{i}", b"v")[0] == 200
    assert h.gateway("DELETE", "/kv/k0")[0] == 200  # a tombstone is not a live key
    shown = nodes(h)
    assert {n: shown[n]["keys"] for n in NODES} == {n: own_keys(h, n) for n in NODES}
    assert sum(shown[n]["keys"] for n in NODES) == 29 * 3
    assert all(type(shown[n]["requests"]) is int and shown[n]["requests"] > 1 for n in NODES)
    before = shown["a"]["requests"]
    assert h.gateway("GET", "/kv/k1")[0] == 200
    assert h.gateway("PUT", "/kv/k1", b"w")[0] == 200
    assert nodes(h)["a"]["requests"] > before, "the counter follows what is sent, not the cache"


def test_the_figures_are_kept_for_max_age_then_asked_again(h: Harness) -> None:
    first = nodes(h)
    assert {n: first[n]["keys"] for n in NODES} == dict.fromkeys(NODES, 0)
    for i in range(10):
        assert h.gateway("PUT", f"/kv/k{i}", b"v")[0] == 200
    sent = {n: nodes(h)[n]["requests"] for n in NODES}
    h.clock.advance(MAX_AGE - 0.1)
    again = nodes(h)
    assert {n: again[n]["keys"] for n in NODES} == dict.fromkeys(NODES, 0), "kept: not asked again"
    assert {n: again[n]["requests"] for n in NODES} == sent, "polling within MAX_AGE sends the nodes nothing"
    h.clock.advance(0.2)
    fresh = nodes(h)
    assert {n: fresh[n]["keys"] for n in NODES} == {n: own_keys(h, n) for n in NODES} == dict.fromkeys(NODES, 10)
    assert {n: fresh[n]["requests"] for n in NODES} == {n: sent[n] + 1 for n in NODES}, "one GET /node each"


def test_concurrent_polls_share_one_ask_per_node(h: Harness) -> None:
    h.clock.advance(MAX_AGE)
    sent = {n: nodes(h)[n]["requests"] for n in NODES}  # this poll asked them
    h.clock.advance(MAX_AGE)
    results: list[Any] = []
    for _ in range(5):
        ensureDeferred(h._call("GET", "http://gateway.test/cluster", None)).addBoth(results.append)
    h.settle()
    assert [status for status, _ in results] == [200] * 5
    assert {n: nodes(h)[n]["requests"] for n in NODES} == {n: sent[n] + 1 for n in NODES}


def test_a_hung_node_is_null_within_the_timeout_and_then_at_once_until_it_answers_again(h: Harness) -> None:
    assert h.gateway("PUT", "/kv/x", b"1")[0] == 200
    h.clock.advance(MAX_AGE)
    h.network.pause("b.test")  # a SIGSTOPped node: takes the connection, never answers
    took, status, shown = timed_cluster(h)
    assert status == 200 and took <= TIMEOUT + 0.05
    assert shown["b"]["keys"] is None and shown["b"]["repair"] is None
    assert shown["a"]["keys"] == shown["c"]["keys"] == 1
    took, status, shown = timed_cluster(h)
    assert (took, status, shown["b"]["keys"]) == (0, 200, None), "its silence is kept too: no second wait"
    h.network.resume("b.test")
    h.clock.advance(MAX_AGE)
    h.settle()
    assert nodes(h)["b"]["keys"] == 1


def test_a_node_down_in_the_registry_or_refusing_is_null_without_waiting(h: Harness) -> None:
    h.crash_node("c")
    took, status, shown = timed_cluster(h)
    assert (took, status, shown["c"]["keys"]) == (0, 200, None), "refused at once"
    h.advance(30)  # past the registry's lease: down
    status, body = h.gateway("GET", "/cluster")
    (c,) = [node for node in body["nodes"] if node["id"] == "c"]
    assert (status, c["status"], c["keys"]) == (200, "down", None)
    h.clock.advance(MAX_AGE)
    assert c["requests"] == nodes(h)["c"]["requests"], "a node the registry says is down is not asked"


class Garbage(Resource):
    isLeaf = True

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__()
        self.body, self.status = body, status

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        return self.body


@pytest.mark.parametrize(
    "body,status",
    [
        (b"not json", 200),
        (b'{"success": true, "keys": "many"}', 200),
        (b'{"success": true, "keys": -1}', 200),
        (b'{"success": true, "keys": true}', 200),
        (b'{"success": true, "id": "someone-else", "keys": 3}', 200),
        (b'{"success": true, "keys": 3, "rebalance": {"sent": "x"}}', 200),
        (b"[1, 2]", 200),
        (b'{"success": false, "error": "no"}', 500),
        (b'{"keys": 3}' + b" " * MAX_ANSWER, 200),
    ],
)
def test_garbage_from_a_node_is_null_never_a_500(h: Harness, body: bytes, status: int) -> None:
    h.network.serve("b.test", Garbage(body, status))
    h.clock.advance(MAX_AGE)
    shown = nodes(h)
    assert shown["b"]["keys"] is None and shown["b"]["repair"] is None
    assert shown["a"]["keys"] == 0 and shown["b"]["status"] == "up"


def test_a_node_that_never_answers_at_the_http_level_is_null_within_the_timeout(h: Harness) -> None:
    h.network.serve("c.test", Hang())
    h.clock.advance(MAX_AGE)
    took, status, shown = timed_cluster(h)
    assert status == 200 and took <= TIMEOUT + 0.05 and shown["c"]["keys"] is None


def test_the_last_repair_report_for_each_node_is_shown(h: Harness) -> None:
    h.network.pause("c.test")
    for i in range(12):
        assert h.gateway("PUT", f"/kv/k{i}", b"v")[0] == 200
        h.advance(0.5, step=0.25)
    h.network.resume("c.test")
    h.advance(5)  # c judged reachable again by its probes
    d: Deferred[None] = Deferred.fromCoroutine(h.repairer.sweep())
    for _ in range(50):
        h.settle()
        if d.called:
            break
        h.clock.advance(0.1)
    h.clock.advance(MAX_AGE)
    shown = nodes(h)
    reports = {n: h.call("GET", f"http://{n}.test/node")[1].get("rebalance") for n in NODES}
    assert all(report is not None for report in reports.values())
    assert {n: shown[n]["repair"] for n in NODES} == reports
    assert sum(report["sent"] for report in reports.values()) > 0, "the sweep sent c what it missed"
    assert own_keys(h, "c") == 12 == shown["c"]["keys"]


def test_parse_node_accepts_only_that_nodes_node_json() -> None:
    report = RepairReport(3, 2, 1, None)
    body = b'{"success": true, "id": "a", "keys": 7, "rebalance": %s}' % json.dumps(report.to_json()).encode()
    assert parse_node(Answer(200, body), "a") == Figures(7, report)
    assert parse_node(Answer(200, b'{"keys": 0}'), "a") == Figures(0, None)
    assert parse_node(Answer(200, body), "b") is None
    assert parse_node(Answer(404, body), "a") is None
    assert parse_node(Answer(200, b'{"keys": 1.5}'), "a") is None
    assert parse_node(Answer(200, b"[" * 100000), "a") is None


def test_a_large_cluster_asks_its_members_less_often() -> None:
    """1,000 members are asked every 10 s, not every MAX_AGE: at most 100 asks a second."""
    from twisted.internet.task import Clock

    from kvd.gateway.cluster import Cluster
    from kvd.gateway.figures import MEMBERS_PER_SECOND, NodeFigures

    asked: list[str] = []

    class Nodes:
        class health:
            @staticmethod
            def reachable(node_id: str) -> bool:
                return True

        def __call__(self, node: NodeInfo) -> Any:
            asked.append(node.id)
            return self

        def counted(self) -> Any:
            return self

        def call(self, *args: Any, **kwargs: Any) -> Any:
            return fail(ConnectionRefusedError())  # no figures, and that silence is kept as an answer

    clock = Clock()
    cluster = Cluster(vnodes=1, replicas=3)
    cluster.update({f"n{i}": NodeInfo(f"n{i}", f"http://n{i}.test") for i in range(1000)})
    figures = NodeFigures(Nodes(), clock)  # type: ignore[arg-type]
    ensureDeferred(figures.of(cluster.view()))
    assert len(asked) == 1000
    clock.advance(MAX_AGE + 1)
    ensureDeferred(figures.of(cluster.view()))
    assert len(asked) == 1000, "kept longer than MAX_AGE at 1,000 members"
    clock.advance(1000 / MEMBERS_PER_SECOND)
    ensureDeferred(figures.of(cluster.view()))
    assert len(asked) == 2000
