"""
Tests for L{kvd.registry}: membership, leases, incarnations, the change
index and long-poll waiters.  Pure domain code: no reactor, no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.python.failure import Failure

from kvd.registry import (
    InvalidRegistration,
    Member,
    Registry,
    StaleIncarnation,
)

T = TypeVar("T")

TTL = 10.0
URL_A = "http://127.0.0.1:8001"
URL_B = "http://127.0.0.1:8002"


def body(url: str = URL_A, weight: int | None = None, incarnation: int | None = None) -> dict[str, object]:
    result: dict[str, object] = {"url": url}
    if weight is not None:
        result["weight"] = weight
    if incarnation is not None:
        result["incarnation"] = incarnation
    return result


def result_of(d: Deferred[T]) -> T:
    """
    The result of a Deferred that has already succeeded.
    """
    results: list[T | Failure] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    [result] = results
    if isinstance(result, Failure):
        result.raiseException()
    assert not isinstance(result, Failure)
    return result


def cancel_wait(d: Deferred[int]) -> None:
    """
    Cancel a pending wait, as the HTTP layer does when its timeout ends.
    """
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)


def registry_state(registry: Registry) -> tuple[int, list[Member]]:
    return registry.index, registry.members()


# Registering, renewing, leaving


def test_register_new_node_joins_and_moves_index() -> None:
    registry = Registry(ttl=TTL)
    assert registry.index == 1
    assert registry.register("node-1", body(), now=0.0) is True
    assert registry.is_member("node-1")
    assert registry.members() == [Member("node-1", URL_A, 1, 0, TTL)]
    assert registry.index == 2


def test_weight_and_incarnation_are_taken_from_the_body() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(weight=7, incarnation=3), now=5.0)
    assert registry.member("n") == Member("n", URL_A, 7, 3, 5.0 + TTL)


def test_renewal_with_same_body_is_not_a_change() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(weight=2), now=0.0)
    assert registry.register("n", body(weight=2), now=3.0) is False
    assert registry.index == 2


@pytest.mark.parametrize(
    "second",
    [body(url=URL_B), body(weight=2), body(incarnation=1)],
    ids=["url", "weight", "incarnation"],
)
def test_new_url_weight_or_incarnation_is_a_change(
    second: dict[str, object],
) -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    assert registry.register("n", second, now=1.0) is True
    assert registry.index == 3
    [member] = registry.members()
    assert member.to_json() == {
        "id": "n",
        "url": second["url"],
        "weight": second.get("weight", 1),
        "status": "up",
    }
    assert member.incarnation == second.get("incarnation", 0)


def test_unknown_body_fields_are_ignored() -> None:
    """
    Newer nodes may send more fields; an older registry accepts them.
    """
    registry = Registry(ttl=TTL)
    assert registry.register("n", {"url": URL_A, "zone": "eu-1"}, now=0.0)
    assert registry.member("n") == Member("n", URL_A, 1, 0, TTL)


def test_leave_removes_member_and_moves_index() -> None:
    registry = Registry(ttl=TTL)
    registry.register("a", body(), now=0.0)
    registry.register("b", body(URL_B), now=0.0)
    assert registry.leave("a", now=1.0) is True
    assert not registry.is_member("a")
    assert [m.id for m in registry.members()] == ["b"]
    assert registry.index == 4


def test_leave_unknown_node_returns_false_and_changes_nothing() -> None:
    registry = Registry(ttl=TTL)
    registry.register("a", body(), now=0.0)
    before = registry_state(registry)
    assert registry.leave("nobody", now=1.0) is False
    assert registry.leave("a/../b", now=1.0) is False
    assert registry_state(registry) == before


def test_members_are_sorted_by_id() -> None:
    registry = Registry(ttl=TTL)
    for node_id in ["c", "a", "B", "b"]:
        registry.register(node_id, body(), now=0.0)
    assert [m.id for m in registry.members()] == ["B", "a", "b", "c"]


# Leases and expiry


def test_member_is_up_until_the_lease_ends_and_down_exactly_at_ttl() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=100.0)
    assert registry.expire(100.0 + TTL - 1e-6) == []
    assert registry.is_up("n")
    assert registry.index == 2
    assert registry.expire(100.0 + TTL) == ["n"]
    assert registry.is_member("n") and not registry.is_up("n"), "down is not gone"
    assert registry.member("n") == Member("n", URL_A, 1, 0, 100.0 + TTL, "down")
    assert registry.index == 3


def test_a_down_member_is_forgotten_exactly_forget_after_seconds_after_its_lease_ended() -> None:
    registry = Registry(ttl=TTL, forget_after=60.0)
    registry.register("n", body(), now=0.0)
    assert registry.expire(TTL) == ["n"]
    assert registry.expire(TTL + 60.0 - 1e-6) == []
    assert registry.is_member("n") and registry.index == 3
    assert registry.expire(TTL + 60.0) == ["n"]
    assert not registry.is_member("n")
    assert registry.index == 4


def test_a_member_down_and_due_to_be_forgotten_in_one_sweep_moves_the_index_once() -> None:
    registry = Registry(ttl=TTL, forget_after=1.0)
    registry.register("n", body(), now=0.0)
    assert registry.expire(TTL + 5.0) == ["n"]
    assert registry.members() == [] and registry.index == 3


def test_a_renewal_of_a_down_member_marks_it_up_and_moves_the_index() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    registry.expire(TTL)
    assert registry.register("n", body(), now=TTL + 1) is True
    assert registry.member("n") == Member("n", URL_A, 1, 0, 2 * TTL + 1, "up")
    assert registry.index == 4


def test_a_renewal_after_the_lease_ended_keeps_the_member_from_being_forgotten() -> None:
    registry = Registry(ttl=TTL, forget_after=5.0)
    registry.register("n", body(), now=0.0)
    registry.expire(TTL)
    registry.register("n", body(), now=TTL + 4)
    assert registry.expire(TTL + 6) == []
    assert registry.is_up("n")


def test_a_down_member_leaves_by_delete() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    registry.expire(TTL)
    assert registry.leave("n", now=TTL + 1) is True
    assert not registry.is_member("n") and registry.index == 4


def test_members_and_snapshot_filter_by_status() -> None:
    registry = Registry(ttl=TTL)
    registry.register("a", body(), now=0.0)
    registry.register("b", body(URL_B), now=5.0)
    registry.expire(TTL)
    assert [m.id for m in registry.members("up")] == ["b"]
    assert [m.id for m in registry.members("down")] == ["a"]
    assert registry.snapshot("up") == {"index": 4, "nodes": [{"id": "b", "url": URL_B, "weight": 1, "status": "up"}]}


@pytest.mark.parametrize("forget_after", [0, -1, float("inf"), float("nan"), True])
def test_forget_after_must_be_a_positive_finite_number(forget_after: float) -> None:
    with pytest.raises(ValueError):
        Registry(ttl=TTL, forget_after=forget_after)


def test_renewal_extends_the_lease() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    registry.register("n", body(), now=8.0)
    assert registry.expire(TTL) == []
    assert registry.is_member("n")
    assert registry.expire(8.0 + TTL) == ["n"]
    assert not registry.is_up("n")


def test_expiring_several_members_moves_index_once() -> None:
    registry = Registry(ttl=TTL)
    registry.register("a", body(), now=0.0)
    registry.register("b", body(URL_B), now=1.0)
    registry.register("c", body(), now=5.0)
    assert registry.expire(12.0) == ["a", "b"]
    assert [(m.id, m.status) for m in registry.members()] == [("a", "down"), ("b", "down"), ("c", "up")]
    assert registry.index == 5


def test_expire_with_nothing_due_does_not_move_index() -> None:
    registry = Registry(ttl=TTL)
    assert registry.expire(1000.0) == []
    registry.register("a", body(), now=0.0)
    assert registry.expire(1.0) == []
    assert registry.index == 2


def test_heartbeat_after_lease_ended_is_a_rejoin_even_before_expire_runs() -> None:
    """
    The answer does not depend on when the expiry timer last ran: a lease
    that ended marks the member down (one change) and the heartbeat marks
    it up again (another).
    """
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    assert registry.register("n", body(), now=TTL) is True
    assert registry.index == 4
    assert registry.member("n") == Member("n", URL_A, 1, 0, 2 * TTL)


def test_registering_marks_down_other_members_whose_lease_ended() -> None:
    registry = Registry(ttl=TTL)
    registry.register("old", body(), now=0.0)
    registry.register("new", body(URL_B), now=TTL)
    assert [(m.id, m.status) for m in registry.members()] == [("new", "up"), ("old", "down")]


def test_leave_after_lease_ended_removes_the_down_member() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    assert registry.leave("n", now=TTL) is True
    assert not registry.is_member("n")
    assert registry.index == 4, "marked down, then removed"


def test_next_expiry_is_the_earliest_lease_end() -> None:
    registry = Registry(ttl=TTL)
    assert registry.next_expiry() is None
    registry.register("a", body(), now=3.0)
    registry.register("b", body(), now=1.0)
    assert registry.next_expiry() == 1.0 + TTL
    registry.register("b", body(), now=5.0)
    assert registry.next_expiry() == 3.0 + TTL


@pytest.mark.parametrize("ttl", [0.0, -1.0, float("inf"), float("nan")])
def test_ttl_must_be_a_positive_finite_number(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        Registry(ttl=ttl)


# Incarnations


def test_older_incarnation_is_rejected_and_changes_nothing() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(URL_A, incarnation=5), now=0.0)
    before = registry_state(registry)
    with pytest.raises(StaleIncarnation) as info:
        registry.register("n", body(URL_B, incarnation=4), now=1.0)
    assert registry_state(registry) == before
    assert info.value.incarnation == 4
    assert info.value.current == 5
    assert "older" in str(info.value)


def test_a_registration_without_incarnation_is_accepted_and_keeps_the_highest() -> None:
    """An operator's curl in DESIGN.md's shape always works; stale heartbeats stay refused after it."""
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=5), now=0.0)
    registry.register("n", {"url": "http://manual:1"}, now=1.0)
    assert registry.member("n") is not None and registry.member("n").url == "http://manual:1"  # type: ignore[union-attr]
    with pytest.raises(StaleIncarnation):
        registry.register("n", body(incarnation=4), now=2.0)


def test_older_incarnation_is_rejected_after_leave() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=5), now=0.0)
    registry.leave("n", now=1.0)
    before = registry_state(registry)
    with pytest.raises(StaleIncarnation):
        registry.register("n", body(incarnation=4), now=2.0)
    assert registry_state(registry) == before


def test_older_incarnation_is_rejected_after_expiry() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=5), now=0.0)
    registry.expire(TTL)
    with pytest.raises(StaleIncarnation):
        registry.register("n", body(incarnation=4), now=TTL + 1)
    assert registry.member("n") == Member("n", URL_A, 1, 5, TTL, "down")
    assert registry.index == 3


def test_older_incarnation_is_rejected_after_the_member_is_forgotten() -> None:
    registry = Registry(ttl=TTL, forget_after=1.0)
    registry.register("n", body(incarnation=5), now=0.0)
    registry.expire(TTL + 1)
    assert not registry.is_member("n")
    with pytest.raises(StaleIncarnation) as raised:
        registry.register("n", body(incarnation=4), now=TTL + 2)
    assert raised.value.current == 5


def test_rejected_incarnation_does_not_even_expire_other_members() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=5), now=0.0)
    registry.register("other", body(URL_B), now=0.0)
    before = registry_state(registry)
    with pytest.raises(StaleIncarnation):
        registry.register("n", body(incarnation=1), now=5 * TTL)
    assert registry_state(registry) == before


def test_higher_incarnation_replaces_the_member() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(URL_A, incarnation=1), now=0.0)
    assert registry.register("n", body(URL_A, incarnation=2), now=1.0) is True
    assert registry.member("n") == Member("n", URL_A, 1, 2, 1.0 + TTL)
    assert registry.index == 3
    with pytest.raises(StaleIncarnation):
        registry.register("n", body(URL_A, incarnation=1), now=2.0)


def test_same_incarnation_may_rejoin_after_leave() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=3), now=0.0)
    registry.leave("n", now=1.0)
    assert registry.register("n", body(incarnation=3), now=2.0) is True
    assert registry.is_member("n")


def test_leave_from_older_incarnation_is_rejected_and_changes_nothing() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=2), now=0.0)
    before = registry_state(registry)
    with pytest.raises(StaleIncarnation):
        registry.leave("n", now=1.0, incarnation=1)
    assert registry_state(registry) == before


@pytest.mark.parametrize("incarnation", [2, 3, None])
def test_leave_from_current_or_newer_incarnation_is_accepted(
    incarnation: int | None,
) -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=2), now=0.0)
    assert registry.leave("n", now=1.0, incarnation=incarnation) is True
    assert not registry.is_member("n")


def test_leave_from_older_incarnation_after_lease_ended_is_refused() -> None:
    """
    A member whose lease ended is down, not gone: a late leave from an older
    process must not remove it.
    """
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=2), now=0.0)
    before = registry_state(registry)
    with pytest.raises(StaleIncarnation):
        registry.leave("n", now=TTL, incarnation=1)
    assert registry_state(registry) == before


def test_leave_with_incarnation_for_unknown_node_returns_false() -> None:
    registry = Registry(ttl=TTL)
    assert registry.leave("n", now=0.0, incarnation=0) is False


@pytest.mark.parametrize("incarnation", [-1, True, 1.5, "3"])
def test_leave_with_invalid_incarnation_is_rejected(incarnation: object) -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    with pytest.raises(InvalidRegistration, match="incarnation"):
        registry.leave("n", now=1.0, incarnation=incarnation)  # type: ignore[arg-type]
    assert registry.is_member("n")


# Validation


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        (None, "must be a JSON object"),
        ([URL_A], "must be a JSON object"),
        ("http://x", "must be a JSON object"),
        ({}, 'has no "url"'),
        ({"weight": 1}, 'has no "url"'),
        ({"url": None}, 'has no "url"'),
        ({"url": 8001}, '"url" must be a string'),
        ({"url": ["http://x"]}, '"url" must be a string'),
        ({"url": ""}, "must start with http:// or https://"),
        ({"url": "127.0.0.1:8001"}, "must start with http:// or https://"),
        ({"url": "ftp://host/"}, "must start with http:// or https://"),
        ({"url": "file:///etc/passwd"}, "must start with http:// or https://"),
        ({"url": "http://"}, "has no host"),
        ({"url": "http:///path"}, "has no host"),
        ({"url": "http://:8001"}, "has no host"),
        ({"url": "http://host:99999"}, "invalid port"),
        ({"url": "http://host:port"}, "invalid port"),
        ({"url": "http://host:0"}, "invalid port"),
        ({"url": "http://host/?a=b"}, "without a query or fragment"),
        ({"url": "http://host/#x"}, "without a query or fragment"),
        ({"url": "http://ho st"}, "spaces, control characters"),
        ({"url": "http://host\r\nX: y"}, "spaces, control characters"),
        ({"url": "http://h\u00f6st"}, "non-ASCII"),
        ({"url": "http://h/" + "a" * 3000}, "longer than 2048"),
        (body(weight="1"), '"weight" must be an integer'),  # type: ignore[arg-type]
        (body(weight=1.0), '"weight" must be an integer'),  # type: ignore[arg-type]
        (body(weight=True), '"weight" must be an integer'),
        ({"url": URL_A, "weight": None}, '"weight" must be an integer'),
        (body(weight=0), '"weight" must be between 1 and 16'),
        (body(weight=-3), '"weight" must be between 1 and 16'),
        (body(weight=17), '"weight" must be between 1 and 16'),
        (body(weight=10**100), '"weight" must be between 1 and 16'),
        (body(url="http://[::1"), "is not a URL"),
        (body(incarnation="2"), '"incarnation" must be an integer'),  # type: ignore[arg-type]
        (body(incarnation=2.0), '"incarnation" must be an integer'),  # type: ignore[arg-type]
        (body(incarnation=False), '"incarnation" must be an integer'),
        (body(incarnation=-1), '"incarnation" must be between 0'),
        (body(incarnation=2**63), '"incarnation" must be between 0'),
    ],
)
def test_invalid_body_is_rejected_with_a_clear_message(request_body: object, message: str) -> None:
    registry = Registry(ttl=TTL)
    with pytest.raises(InvalidRegistration) as info:
        registry.register("n", request_body, now=0.0)
    assert message in str(info.value)
    assert str(info.value).endswith(".")
    assert registry_state(registry) == (1, [])


@pytest.mark.parametrize(
    "node_id",
    [
        "",
        "x" * 129,
        ".",
        "..",
        ".hidden",
        "-rf",
        "_x",
        "a/b",
        "a b",
        "a\nb",
        "a%2Fb",
        "n\u00f6de",
        "a:b",
    ],
)
def test_invalid_node_id_is_rejected(node_id: str) -> None:
    registry = Registry(ttl=TTL)
    with pytest.raises(InvalidRegistration) as info:
        registry.register(node_id, body(), now=0.0)
    assert "node id" in str(info.value)
    assert "1 to 128 characters" in str(info.value)
    assert registry_state(registry) == (1, [])


def test_node_id_that_is_not_a_string_is_rejected() -> None:
    registry = Registry(ttl=TTL)
    with pytest.raises(InvalidRegistration, match="node id"):
        registry.register(7, body(), now=0.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("node_id", ["a", "7", "node-1", "Node_2.eu-west", "n.", "x" * 128])
def test_valid_node_ids_are_accepted(node_id: str) -> None:
    registry = Registry(ttl=TTL)
    assert registry.register(node_id, body(), now=0.0) is True


def test_long_invalid_values_are_shortened_in_the_message() -> None:
    registry = Registry(ttl=TTL)
    with pytest.raises(InvalidRegistration) as info:
        registry.register("/" * 1000, body(), now=0.0)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8001",
        "https://node-1.example.com",
        "http://[::1]:8001/",
        "HTTP://host:80/prefix",
    ],
)
def test_valid_urls_are_accepted_unchanged(url: str) -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(url), now=0.0)
    [member] = registry.members()
    assert member.url == url


# Snapshot and JSON shape


def test_snapshot_has_exactly_the_design_shape() -> None:
    registry = Registry(ttl=TTL)
    registry.register("b", body(URL_B, weight=3, incarnation=9), now=0.0)
    registry.register("a", body(URL_A), now=0.0)
    assert registry.snapshot() == {
        "index": 3,
        "nodes": [
            {"id": "a", "url": URL_A, "weight": 1, "status": "up"},
            {"id": "b", "url": URL_B, "weight": 3, "status": "up"},
        ],
    }


def test_empty_snapshot() -> None:
    assert Registry(ttl=TTL).snapshot() == {"index": 1, "nodes": []}


# Long-poll waiters


def test_wait_fires_on_join_with_the_new_index() -> None:
    registry = Registry(ttl=TTL)
    d = registry.wait_for_change(1)
    assert not d.called
    registry.register("n", body(), now=0.0)
    assert result_of(d) == 2
    assert registry.waiting == 0


def test_wait_is_not_woken_by_a_plain_renewal() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    d = registry.wait_for_change(2)
    registry.register("n", body(), now=1.0)
    registry.expire(2.0)
    assert not d.called
    cancel_wait(d)


def test_wait_fires_on_leave() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    d = registry.wait_for_change(2)
    registry.leave("n", now=1.0)
    assert result_of(d) == 3


def test_wait_fires_on_expiry() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    d = registry.wait_for_change(2)
    registry.expire(TTL)
    assert result_of(d) == 3


def test_wait_is_not_woken_by_rejected_requests() -> None:
    registry = Registry(ttl=TTL)
    registry.register("n", body(incarnation=2), now=0.0)
    d = registry.wait_for_change(2)
    with pytest.raises(StaleIncarnation):
        registry.register("n", body(incarnation=1), now=1.0)
    with pytest.raises(InvalidRegistration):
        registry.register("m", {}, now=1.0)
    assert registry.leave("unknown", now=1.0) is False
    assert not d.called
    cancel_wait(d)


def test_all_waiters_fire_once_with_the_final_index() -> None:
    """
    A heartbeat after its lease ended is two changes (down, up); the
    waiters fire once, after both, and see the final membership.
    """
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    seen: list[tuple[int, object]] = []
    waits = [registry.wait_for_change(2) for _ in range(3)]
    for d in waits:
        d.addCallback(lambda index: seen.append((index, registry.snapshot())))
    registry.register("n", body(), now=TTL)
    final = (4, {"index": 4, "nodes": [{"id": "n", "url": URL_A, "weight": 1, "status": "up"}]})
    assert seen == [final] * 3


@pytest.mark.parametrize("index", [0, 1, 2, 57, -1])
def test_wait_with_an_index_other_than_current_answers_at_once(index: int) -> None:
    """
    An older index means the client missed changes; a larger one comes from
    an earlier registry process (the index restarted): neither may hang.
    """
    registry = Registry(ttl=TTL)
    registry.register("n", body(), now=0.0)
    registry.register("m", body(), now=0.0)
    assert registry.index == 3
    assert result_of(registry.wait_for_change(index)) == 3
    assert registry.waiting == 0


def test_cancelled_wait_removes_the_waiter() -> None:
    registry = Registry(ttl=TTL)
    d = registry.wait_for_change(1)
    assert registry.waiting == 1
    d.cancel()
    with pytest.raises(CancelledError):
        result_of(d)
    assert registry.waiting == 0
    registry.register("n", body(), now=0.0)


def test_a_thousand_cancelled_waits_leave_no_waiters_behind() -> None:
    registry = Registry(ttl=TTL)
    waits = [registry.wait_for_change(1) for _ in range(1000)]
    keep = registry.wait_for_change(1)
    assert registry.waiting == 1001
    for d in waits:
        cancel_wait(d)
    assert registry.waiting == 1
    registry.register("n", body(), now=0.0)
    assert result_of(keep) == 2
    assert registry.waiting == 0


def test_cancelling_a_fired_wait_is_harmless() -> None:
    registry = Registry(ttl=TTL)
    d = registry.wait_for_change(1)
    registry.register("n", body(), now=0.0)
    d.cancel()
    assert result_of(d) == 2
    assert registry.waiting == 0


def test_a_waiter_may_wait_again_from_its_callback() -> None:
    registry = Registry(ttl=TTL)
    second: list[Deferred[int]] = []
    registry.wait_for_change(1).addCallback(lambda index: second.append(registry.wait_for_change(index)))
    registry.register("n", body(), now=0.0)
    [d] = second
    assert not d.called
    registry.leave("n", now=1.0)
    assert result_of(d) == 3


# Logging


def registry_log_lines(events: Sequence[LogEvent]) -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_namespace") == "kvd.registry"]


def test_join_leave_down_and_forget_are_logged_but_renewals_are_not() -> None:
    registry = Registry(ttl=TTL, forget_after=5.0)
    with capturedLogs() as events:
        registry.register("a", body(URL_A), now=0.0)
        registry.register("b", body(URL_B), now=0.0)
        registry.register("a", body(URL_A), now=1.0)
        assert len(registry_log_lines(events)) == 2
        registry.leave("a", now=2.0)
        registry.expire(TTL)
        registry.expire(TTL + 5.0)
    lines = registry_log_lines(events)
    assert len(lines) == 5
    joined_a, joined_b, left, down, forgotten = lines
    assert "a" in joined_a and "joined" in joined_a and URL_A in joined_a
    assert "b" in joined_b and URL_B in joined_b
    assert "left" in left and URL_A in left
    assert "down" in down and URL_B in down
    assert "forgotten" in forgotten and URL_B in forgotten
    assert events[-1]["node_id"] == "b"


# Invariants


NODE_IDS = ["a", "b", "c"]
URLS = [URL_A, URL_B]
TIME_STEPS = [0.0, 1.0, 3.0, TTL - 0.5, TTL]

register_ops = st.tuples(
    st.just("register"),
    st.sampled_from(NODE_IDS),
    st.sampled_from(URLS),
    st.integers(1, 2),
    st.integers(0, 3),
    st.sampled_from(TIME_STEPS),
)
leave_ops = st.tuples(
    st.just("leave"),
    st.sampled_from(NODE_IDS),
    st.none() | st.integers(0, 3),
    st.sampled_from(TIME_STEPS),
)
expire_ops = st.tuples(st.just("expire"), st.sampled_from(TIME_STEPS))
FORGET = 2 * TTL


class Model:
    """
    The registry as plain dicts, for comparison.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.changes = 0
        # id -> (url, weight, incarnation, expires, status)
        self.members: dict[str, tuple[str, int, int, float, str]] = {}
        self.highest: dict[str, int] = {}

    def expire(self) -> list[str]:
        changed = []
        for node_id, m in sorted(self.members.items()):
            if m[4] == "up" and m[3] <= self.now:
                self.members[node_id] = (*m[:4], "down")
                changed.append(node_id)
            if m[3] + FORGET <= self.now:
                del self.members[node_id]
                if node_id not in changed:
                    changed.append(node_id)
        if changed:
            self.changes += 1
        return changed

    def register(self, node_id: str, url: str, weight: int, inc: int) -> bool | str:
        if inc < self.highest.get(node_id, 0):
            return "stale"
        self.expire()
        old = self.members.get(node_id)
        self.members[node_id] = (url, weight, inc, self.now + TTL, "up")
        self.highest[node_id] = inc
        changed = old is None or old[:3] != (url, weight, inc) or old[4] == "down"
        self.changes += changed
        return changed

    def leave(self, node_id: str, inc: int | None) -> bool | str:
        old = self.members.get(node_id)
        if inc is not None and old and inc < old[2]:
            return "stale"
        self.expire()
        removed = self.members.pop(node_id, None) is not None
        self.changes += removed
        return removed


@settings(max_examples=300, deadline=None)
@given(st.lists(register_ops | leave_ops | expire_ops, max_size=40))
def test_index_counts_exactly_the_membership_changes(
    ops: list[tuple[object, ...]],
) -> None:
    """
    For any sequence of requests: the index is 1 + the number of membership
    changes, never goes back, the members match a simple model, and a
    long poll on the index before each request fires iff the index moved.
    """
    registry = Registry(ttl=TTL, forget_after=FORGET)
    model = Model()
    for op in ops:
        model.now += op[-1]  # type: ignore[operator]
        before = registry.index
        wait = registry.wait_for_change(before)
        outcome: bool | str | list[str]
        if op[0] == "register":
            _, node_id, url, weight, inc, _ = op
            expected = model.register(node_id, url, weight, inc)  # type: ignore[arg-type]
            try:
                outcome = registry.register(
                    node_id,  # type: ignore[arg-type]
                    body(url, weight, inc),  # type: ignore[arg-type]
                    model.now,
                )
            except StaleIncarnation:
                outcome = "stale"
            assert outcome == expected
        elif op[0] == "leave":
            _, node_id, inc, _ = op
            expected = model.leave(node_id, inc)  # type: ignore[arg-type]
            try:
                outcome = registry.leave(node_id, model.now, inc)  # type: ignore[arg-type]
            except StaleIncarnation:
                outcome = "stale"
            assert outcome == expected
        else:
            expected_changed = model.expire()
            assert registry.expire(model.now) == expected_changed

        assert registry.index == 1 + model.changes
        assert registry.index >= before
        assert registry.members() == [Member(i, *model.members[i]) for i in sorted(model.members)]
        if registry.index == before:
            assert not wait.called
            cancel_wait(wait)
        else:
            assert result_of(wait) == registry.index
        assert registry.waiting == 0
