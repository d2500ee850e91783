"""
The reads' hedges under one timer (L{kvd.gateway.quorum.Hedges}): each read still asks one
more replica when its delay passes without its quorum, the answered ones never, and there is
one timer for all, not a callLater and a cancel a read.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from kvd.gateway.quorum import Gathered, Hedges, Reply, gather_to


def _read(hedges: Hedges, delay: float, asked: list[str], replies: dict[str, Reply[str]], name: str) -> list[str]:
    """A read of 2 of a and b, c its spare; returns the list its answers' nodes go to."""
    done: list[str] = []

    def tell(node_id: str, reply: Reply[str]) -> None:
        asked.append(f"{name}:{node_id}")
        replies[f"{name}:{node_id}"] = reply

    def then(gathered: Gathered[str]) -> None:
        done.extend(gathered.answers)

    gather_to(then, tell, ["a", "b"], ["c"], 2, hedge=(hedges, delay))
    return done


def test_a_read_not_answered_in_its_delay_asks_its_spare_then_and_an_answered_one_never() -> None:
    clock = Clock()
    hedges = Hedges(clock)
    asked: list[str] = []
    replies: dict[str, Reply[str]] = {}
    slow = _read(hedges, 0.01, asked, replies, "slow")
    clock.advance(0.002)
    quick = _read(hedges, 0.01, asked, replies, "quick")
    assert len(clock.getDelayedCalls()) == 1, "one timer for both reads"
    replies["quick:a"].callback("A")
    replies["quick:b"].callback("B")
    replies["slow:a"].callback("A")
    assert quick == ["a", "b"] and slow == []
    clock.advance(0.008 - 1e-4)
    assert "slow:c" not in asked, "no hedge before the delay"
    clock.advance(1e-4)
    assert "slow:c" in asked, "the hedge at the read's delay, exactly"
    replies["slow:c"].callback("C")
    assert slow == ["a", "c"]
    clock.advance(0.002)
    assert "quick:c" not in asked, "an answered read is passed over at its moment"
    assert clock.getDelayedCalls() == [], "no timer left once every read is answered and its moment passed"


def test_a_shorter_delay_after_a_longer_one_is_hedged_first() -> None:
    clock = Clock()
    hedges = Hedges(clock)
    asked: list[str] = []
    replies: dict[str, Reply[str]] = {}
    _read(hedges, 1.0, asked, replies, "long")
    _read(hedges, 0.005, asked, replies, "short")
    clock.advance(0.005)
    assert "short:c" in asked and "long:c" not in asked
    clock.advance(0.995)
    assert "long:c" in asked


def test_answered_reads_with_a_long_delay_do_not_pile_up() -> None:
    clock = Clock()
    hedges = Hedges(clock)
    asked: list[str] = []
    for i in range(10_000):
        replies: dict[str, Reply[str]] = {}
        _read(hedges, 30.0, asked, replies, f"r{i}")
        replies[f"r{i}:a"].callback("A")
        replies[f"r{i}:b"].callback("B")
        assert hedges.waiting() == 0, "an answered read is let go at once, not kept until its moment"
    assert hedges.moments() < 2048, f"{hedges.moments()} answered reads' moments held"
    clock.advance(30.0)
    assert not any(name.endswith(":c") for name in asked)
    assert hedges.moments() == 0 and clock.getDelayedCalls() == []


def test_a_read_waiting_for_its_hedge_is_counted_until_answered() -> None:
    clock = Clock()
    hedges = Hedges(clock)
    replies: dict[str, Reply[str]] = {}
    _read(hedges, 0.01, [], replies, "r")
    assert hedges.waiting() == 1
    replies["r:a"].callback("A")
    assert hedges.waiting() == 1, "one answer of the two it needs"
    replies["r:b"].callback("B")
    assert hedges.waiting() == 0
