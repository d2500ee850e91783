"""The gateway's client of a node's internal API, and the quorum helper, with canned answers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred, fail, succeed

from kvd.gateway.nodes import MAX_BATCH, MAX_QUEUED, NodeClient, Written, split
from kvd.gateway.quorum import QuorumFailed, gather
from kvd.keys import BATCH_VALUE_BUDGET
from kvd.membership import NodeInfo
from kvd.paxos import Promise, Proposal
from kvd.transport import Answer, PeerError, PeerUnreachable

NODE = NodeInfo("n1", "http://n1.test")


class CannedPeers:
    """Answers each call with the next canned answer, and remembers what was asked."""

    def __init__(self, *answers: Answer | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, Any]] = []

    def call(self, method: str, url: str, body: bytes | None = None, **_: Any) -> Deferred[Answer]:
        self.calls.append((method, url, None if body is None else json.loads(body)))
        answer = self.answers.pop(0)
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


def client(*answers: Answer | Exception) -> tuple[NodeClient, CannedPeers]:
    peers = CannedPeers(*answers)
    return NodeClient(NODE, peers), peers  # type: ignore[arg-type]


def ok(body: object) -> Answer:
    return Answer(200, json.dumps(body).encode())


def failure_of(d: Deferred[Any]) -> BaseException:
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures, "expected the call to fail"
    return failures[0].value  # type: ignore[no-any-return]


def result_of(d: Deferred[Any]) -> Any:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results and not hasattr(results[0], "raiseException"), results
    return results[0]


@pytest.mark.parametrize(
    "answer",
    [
        Answer(200, b"not json"),
        Answer(200, b"[1, 2]"),
        ok({"live": "yes"}),
        ok({"live": [True]}),  # one answer for two items
        ok({"live": [True, False], "versions": ["v", 1]}),  # a version that is not a string
        ok({"live": [True, False], "versions": ["v", None]}),
        Answer(500, b"{}"),
    ],
)
def test_an_apply_answer_that_is_not_the_expected_json_is_a_peer_error_naming_the_node(answer: Answer) -> None:
    nodes, _ = client(answer)
    error = failure_of(nodes.apply([("a", "1", "v"), ("b", None, "v")]))
    assert isinstance(error, PeerError) and error.url == NODE.url


@pytest.mark.parametrize(
    "body",
    [{"entries": []}, {"entries": {"k": ["v"]}}, {"entries": {"k": [1, "v"]}}, {"entries": {}, "more": "k"}],
)
def test_a_read_answer_that_is_not_the_expected_json_is_a_peer_error(body: object) -> None:
    nodes, _ = client(ok(body))
    assert isinstance(failure_of(nodes.read(["k"])), PeerError)


def test_a_read_asks_again_for_the_keys_a_node_deferred_and_gives_up_on_a_node_that_defers_all() -> None:
    nodes, peers = client(ok({"entries": {"a": ["1", "v1"]}, "more": ["b"]}), ok({"entries": {"b": [None, "v2"]}}))
    assert result_of(nodes.read(["a", "b"])) == {"a": ("1", "v1"), "b": (None, "v2")}
    assert [call[2]["keys"] for call in peers.calls] == [["a", "b"], ["b"]]
    stuck, _ = client(ok({"entries": {}, "more": ["a", "b"]}))
    assert isinstance(failure_of(stuck.read(["a", "b"])), PeerError)


def test_queued_writes_to_one_node_go_together_while_one_request_is_in_flight() -> None:
    peers = CannedPeers()
    pending: Deferred[Answer] = Deferred()
    calls: list[Any] = []

    def call(method: str, url: str, body: bytes | None = None, **_: Any) -> Deferred[Answer]:
        calls.append(json.loads(body or b"null"))
        return pending if len(calls) == 1 else succeed(ok({"live": [False, True]}))

    peers.call = call  # type: ignore[method-assign]
    nodes = NodeClient(NODE, peers)  # type: ignore[arg-type]
    first = nodes.apply_key("a", "1", "v1")
    second, third = nodes.apply_key("b", "2", "v2"), nodes.apply_key("c", None, "v3")
    assert len(calls) == 1, "the others wait for the first request"
    pending.callback(ok({"live": [True]}))
    assert [result_of(d).live for d in (first, second, third)] == [True, False, True]
    assert calls[1] == {"items": [["b", "2", "v2"], ["c", None, "v3"]]}


def test_a_failed_batch_fails_every_write_in_it_and_the_next_batch_still_goes() -> None:
    nodes, _ = client(PeerUnreachable(NODE.url, "refused"), ok({"live": [False]}))
    assert isinstance(failure_of(nodes.apply_key("a", "1", "v1")), PeerError)
    assert result_of(nodes.apply_key("b", "2", "v2")).live is False


def test_batches_are_cut_by_count_and_by_value_size_one_large_value_still_goes_alone() -> None:
    assert [len(b) for b in split(list(range(MAX_BATCH * 2 + 1)), lambda i: 0)] == [MAX_BATCH, MAX_BATCH, 1]
    half = BATCH_VALUE_BUDGET // 2 + 1
    assert [len(b) for b in split([half] * 5, lambda size: size)] == [2, 2, 1]
    assert split([BATCH_VALUE_BUDGET * 3], lambda size: size) == [[BATCH_VALUE_BUDGET * 3]]
    assert split([], lambda size: size) == [[]]


def test_a_quorum_replaces_failed_replicas_by_spares_and_does_not_wait_for_a_slow_one() -> None:
    slow: Deferred[str] = Deferred()
    answers = {"a": succeed("A"), "b": fail(PeerUnreachable("b", "down")), "c": slow, "d": succeed("D")}
    gathered = result_of(gather(lambda n: answers[n], ["a", "b", "c"], ["d"], 2))
    assert gathered.answers == {"a": "A", "d": "D"}
    assert gathered.errors == ["b: b: down"]
    assert not slow.called


def test_a_quorum_that_cannot_be_reached_says_how_many_answered() -> None:
    answers = {"a": succeed("A"), "b": fail(PeerUnreachable("b", "down"))}
    gathered = result_of(gather(lambda n: answers[n], ["a", "b"], [], 2))
    with pytest.raises(QuorumFailed) as caught:
        gathered.require("write", 2)
    assert (caught.value.answered, caught.value.needed) == (1, 2)


def test_conditional_writes_share_one_queue_per_node_and_are_answered_per_item() -> None:
    pending: Deferred[Answer] = Deferred()
    calls: list[tuple[str, Any]] = []

    def call(method: str, url: str, body: bytes | None = None, **_: Any) -> Deferred[Answer]:
        calls.append((url.rsplit("/", 1)[1], json.loads(body or b"null")))
        if len(calls) == 1:
            return pending
        answers = [
            [True, "b2", None, [True, "0001"]],
            [False, "b9", ["b8", "x", "b8"], None],
            [False, "b9"],
            [True, "v3"],
        ]
        return succeed(ok({"answers": answers}))

    peers = CannedPeers()
    peers.call = call  # type: ignore[method-assign]
    nodes = NodeClient(NODE, peers)  # type: ignore[arg-type]
    first = nodes.prepare("a", "b1")
    queued = [
        nodes.prepare("b", "b2"),
        nodes.prepare("c", "b3"),
        nodes.accept("c", Proposal("b2", None, "b2")),
        nodes.commit_key("d", "4", "v3"),
    ]
    assert len(calls) == 1, "the others wait for the first request"
    pending.callback(ok({"answers": [[True, "b1", None, None]]}))
    assert result_of(first) == (Promise(True, "b1", None), None)
    assert [result_of(d) for d in queued] == [
        (Promise(True, "b2", None), (True, "0001")),
        (Promise(False, "b9", Proposal("b8", "x", "b8")), None),
        (False, "b9"),
        Written(True, "v3"),
    ]
    assert calls[1] == (
        "paxos",
        {"items": [["p", "b", "b2"], ["p", "c", "b3"], ["a", "c", "b2", None, "b2"], ["c", "d", "4", "v3"]]},
    )


def test_a_prepare_answer_says_whether_the_key_is_live_and_its_version_and_the_old_form_is_read_too() -> None:
    answers = [[True, "b1", None, [True, "0001"]], [True, "b1", None, [False, "0002"]]]
    # A node of the version before answers the entry itself, [value or null, version].
    answers += [[True, "b1", None, ["v", "0003"]], [True, "b1", None, [None, "0004"]]]
    nodes, _ = client(ok({"answers": answers}))
    got = result_of(nodes.paxos([("p", f"k{i}", "b1") for i in range(4)]))
    assert [entry for _, entry in got] == [(True, "0001"), (False, "0002"), (True, "0003"), (False, "0004")]


@pytest.mark.parametrize(
    "body",
    [
        {"answers": []},  # fewer answers than items
        {"answers": [[True, "b1", None, None], [True, "b1", None, None]]},
        {"answers": [["yes", "b1", None, None]]},
        {"answers": [[True, "b1", ["b1", 3, "b1"], None]]},
        {"answers": [[True, "b1", None, ["v", 7]]]},
        {"answers": [[True, "b1", None, [True, 7]]]},
        {"answers": [[True, "b1", None, [3, "0001"]]]},
        {"answers": [[True, "b1"]]},  # an accept's answer to a prepare
        {"answers": "nope"},
        {"promised": True, "ballot": "b1", "accepted": None, "entry": None},  # the old single-key answer
    ],
)
def test_a_prepare_answer_that_is_not_the_expected_json_is_a_peer_error(body: object) -> None:
    nodes, _ = client(ok(body))
    assert isinstance(failure_of(nodes.prepare("k", "b1")), PeerError)


@pytest.mark.parametrize("body", [{"answers": []}, {"answers": [[1, "b1"]]}, {"accepted": True, "ballot": "b1"}])
def test_accept_and_commit_answers_that_are_not_the_expected_json_are_peer_errors(body: object) -> None:
    nodes, _ = client(ok(body))
    assert isinstance(failure_of(nodes.accept("k", Proposal("b1", "v", "b1"))), PeerError)
    nodes, _ = client(ok(body))
    assert isinstance(failure_of(nodes.commit_key("k", "v", "b1")), PeerError)


def test_a_node_that_stops_answering_fills_no_unbounded_paxos_queue() -> None:
    never: Deferred[Answer] = Deferred()
    peers = CannedPeers()
    peers.call = lambda *a, **k: never  # type: ignore[method-assign]
    nodes = NodeClient(NODE, peers)  # type: ignore[arg-type]
    queued = [nodes.prepare(f"k{i}", "b1") for i in range(MAX_QUEUED + 2)]
    assert isinstance(failure_of(queued[-1]), PeerError), "past MAX_QUEUED an item fails at once"


def test_a_commit_to_a_node_that_accepted_it_names_key_and_version_and_falls_back_to_the_whole_item() -> None:
    version = "018f00000000000000.gw1"
    nodes, peers = client(
        ok({"answers": [[True, "v0"]]}),  # a node of the version before: it does not say it takes them
        ok({"answers": [[True, "v0"]], "accepted_commits": True}),
        ok({"answers": [[True, version]], "accepted_commits": True}),
        ok({"answers": [None], "accepted_commits": True}),  # it no longer holds that proposal
        ok({"answers": [[False, version]], "accepted_commits": True}),
    )
    first: Deferred[Written] = Deferred()
    nodes.commit_accepted_to(first, "k", "value", version)
    assert result_of(first) == Written(True, "v0")
    assert peers.calls[-1][2] == {"items": [["c", "k", "value", version]]}, "the whole item until the node says so"
    second: Deferred[Written] = Deferred()
    nodes.commit_accepted_to(second, "k", "value", version)
    assert result_of(second) == Written(True, "v0")
    assert peers.calls[-1][2] == {"items": [["c", "k", "value", version]]}
    third: Deferred[Written] = Deferred()
    nodes.commit_accepted_to(third, "k", "value", version)
    assert result_of(third) == Written(True, version)
    assert peers.calls[-1][2] == {"items": [["k", "k", version]]}, "key and version only"
    fourth: Deferred[Written] = Deferred()
    nodes.commit_accepted_to(fourth, "k", "value", version)
    assert result_of(fourth) == Written(False, version)
    assert [body for _, _, body in peers.calls[-2:]] == [
        {"items": [["k", "k", version]]},
        {"items": [["c", "k", "value", version]]},
    ], "answered null: the whole item goes in its place"
