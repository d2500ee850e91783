"""A quorum's replicas answer straight to its gathering (no Deferred per replica), with the same outcomes."""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure

from kvd.gateway.nodes import NodeClient
from kvd.gateway.quorum import Gathered, Reply, gather
from kvd.transport import PeerError


def test_told_replicas_reach_the_quorum_and_a_failed_one_is_replaced_by_a_spare() -> None:
    replies: dict[str, Reply[str]] = {}

    def tell(node_id: str, reply: Reply[str]) -> None:
        replies[node_id] = reply

    def ask(node_id: str) -> Any:
        raise AssertionError("with tell, no Deferred is asked for")

    gathered: list[Gathered[str]] = []
    gather(ask, ["a", "b", "c"], ["d"], 2, tell=tell).addCallback(gathered.append)
    assert sorted(replies) == ["a", "b", "c"]
    replies["a"].errback(PeerError("http://a", "down"))
    assert "d" in replies, "the failed replica's place goes to the spare"
    replies["b"].callback("held-b")
    assert not gathered
    replies["d"].callback("held-d")
    (result,) = gathered
    assert result.accepted_by == ["b", "d"] and result.standing_in == {"d": "a"}
    assert result.errors == ["a: http://a: down"]


def test_an_answer_whose_taker_fails_does_not_stop_the_rest_of_its_batch() -> None:
    told: list[Any] = []

    class Breaks:
        def callback(self, answer: Any) -> None:
            raise RuntimeError("broken")

        def errback(self, failure: Any) -> None:
            raise RuntimeError("broken")

    class Takes:
        def callback(self, answer: Any) -> None:
            told.append(answer)

        def errback(self, failure: Failure) -> None:
            told.append(failure.value)

    NodeClient._deliver(["x", "y"], [(None, Breaks()), (None, Takes())])
    NodeClient._deliver_entries({"k": (None, "v")}, [("k", Breaks()), ("k", Takes())])
    assert told == ["y", (None, "v")]
