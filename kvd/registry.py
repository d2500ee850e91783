"""
The registry's domain: which nodes are members, their leases, lease expiry,
the change index and the long-poll waiters that watch it.

This module knows nothing about HTTP or the reactor.  Time comes in as
``now`` (seconds from the caller's clock); the HTTP layer maps
L{InvalidRegistration} to 400 and L{StaleIncarnation} to 409 (with the
registry's current incarnation in the answer, so a node restored from an
older copy of its data dir can move past it).

Node ids
    A node id is 1 to 128 characters of ASCII letters, digits, C{.}, C{_}
    and C{-}, and starts with a letter or a digit.  Ids appear in URL path
    segments, command lines and log lines, so the rule keeps out
    everything that needs escaping there, and the leading-character rule
    keeps out C{.}, C{..} and ids that read like command-line options.

Leases and status
    Registering or renewing gives a member a lease until C{now + ttl} and
    marks it C{"up"}.  A lease has ended when C{expires <= now}; the member
    is then C{"down"}: still a member (an outage is not a departure), down
    since the moment its lease ended.  A member is removed only by a leave,
    or once it has been down for C{forget_after} seconds.  Every call that
    changes state first applies the lease ends and forgets due by its
    C{now}, so an answer never depends on when the caller's expiry timer
    last ran: a heartbeat arriving after its lease ended is a return (two
    changes: marked down, then up), not a renewal.

Incarnations
    Each registration carries an incarnation (a node picks a larger one each
    time its process starts).  The registry remembers the highest
    incarnation it has ever accepted for each id, even after the member
    left or expired, and rejects anything lower with L{StaleIncarnation}
    without changing any state; so a late heartbeat or leave from a dead
    process never overrides its restarted successor.  The memory lasts as
    long as the registry process.

The change index
    C{index} starts at 1 and moves by exactly 1 for each membership change:
    a join, a leave, a change of url, weight, incarnation or status (a
    down member renewing), and an expiry sweep that marked down or forgot
    at least one member.  A plain renewal does not move it.  A long poll
    for index I answers at once whenever I differs from the current index,
    including an I larger than the current one: that is an index from an
    earlier registry process (the index restarts at 1), and waiting for it
    to be "passed" could hang for ever.
"""

from __future__ import annotations

import heapq
import math
import re
from typing import Literal

from attrs import evolve, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from kvd.validate import MAX_URL_LENGTH, Invalid, base_url
from kvd.validate import shown as _shown

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_INCARNATION",
    "MAX_URL_LENGTH",
    "MAX_WEIGHT",
    "STATUSES",
    "DEFAULT_FORGET_AFTER",
    "InvalidRegistration",
    "Member",
    "Registry",
    "StaleIncarnation",
    "Status",
    "validate_node_id",
]

MAX_ID_LENGTH = 128
#: A node of weight w takes w x --vnodes points on every gateway's ring (4000 each by default);
#: past this a ring rebuild would stall a gateway for seconds.
MAX_WEIGHT = 16
# Large enough for a wall-clock-in-nanoseconds incarnation, small enough to
# survive any JSON implementation that uses 64-bit integers.
MAX_INCARNATION = 2**63 - 1

#: A member is forgotten after being down this long, unless told otherwise.
DEFAULT_FORGET_AFTER = 3600.0

Status = Literal["up", "down"]
#: The statuses a member can have, as C{GET /registry/nodes} shows them.
STATUSES: tuple[Status, ...] = ("up", "down")

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

log = Logger()


class InvalidRegistration(ValueError):
    """
    A registration (or leave) request is malformed.  The message is a
    sentence fit to show the client.
    """


class StaleIncarnation(Exception):
    """
    A request comes from an older incarnation of a node than the newest one
    the registry has accepted for that id.
    """

    def __init__(self, node_id: str, incarnation: int, current: int) -> None:
        super().__init__(
            f"Node {node_id} incarnation {incarnation} is older than"
            f" incarnation {current}, which the registry has already seen."
        )
        self.node_id = node_id
        self.incarnation = incarnation
        self.current = current


@frozen
class Member:
    """
    A registered node and its lease.

    @ivar expires: when its lease ends (or ended, for a member that is down).
    """

    id: str
    url: str
    weight: int
    incarnation: int
    expires: float
    status: Status = "up"

    @property
    def up(self) -> bool:
        return self.status == "up"

    def to_json(self) -> dict[str, object]:
        """
        The public fields of a member, as C{GET /registry/nodes} lists them.
        """
        return {"id": self.id, "url": self.url, "weight": self.weight, "status": self.status}


def validate_node_id(node_id: object) -> str:
    """
    Return C{node_id} if it is a valid node id (see the module docstring),
    else raise L{InvalidRegistration}.
    """
    if not isinstance(node_id, str) or _NODE_ID.fullmatch(node_id) is None:
        raise InvalidRegistration(
            f"The node id {_shown(node_id)} is not valid: it must be 1 to"
            f" {MAX_ID_LENGTH} characters of ASCII letters, digits, '.', '_'"
            " or '-', starting with a letter or a digit."
        )
    return node_id


def _validate_url(url: object) -> str:
    if url is None:
        raise InvalidRegistration('The request body has no "url".')
    if not isinstance(url, str):
        raise InvalidRegistration('"url" must be a string.')
    try:
        return base_url(url, '"url"')
    except Invalid as e:
        raise InvalidRegistration(str(e)) from None


def _validate_weight(weight: object) -> int:
    if not isinstance(weight, int) or isinstance(weight, bool):
        raise InvalidRegistration('"weight" must be an integer.')
    if not 1 <= weight <= MAX_WEIGHT:
        raise InvalidRegistration(f'"weight" must be between 1 and {MAX_WEIGHT}, not {weight}.')
    return weight


def _validate_incarnation(incarnation: object) -> int:
    if not isinstance(incarnation, int) or isinstance(incarnation, bool):
        raise InvalidRegistration('"incarnation" must be an integer.')
    if not 0 <= incarnation <= MAX_INCARNATION:
        raise InvalidRegistration(f'"incarnation" must be between 0 and {MAX_INCARNATION}.')
    return incarnation


class Registry:
    """
    The members (up and down), their leases and the change index.

    @ivar ttl: the lease length in seconds.
    @ivar forget_after: how long a member stays down before it is removed.
    @ivar index: the change index (see the module docstring).
    """

    def __init__(self, ttl: float, forget_after: float = DEFAULT_FORGET_AFTER) -> None:
        if isinstance(ttl, bool) or not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        if isinstance(forget_after, bool) or not (math.isfinite(forget_after) and forget_after > 0):
            raise ValueError(f"forget_after must be a positive number of seconds, not {forget_after!r}")
        self.ttl = ttl
        self.forget_after = forget_after
        self.index = 1
        self._members: dict[str, Member] = {}
        #: (time, member id): a min-heap of when a sweep may have something to do for a member.
        self._deadlines: list[tuple[float, str]] = []
        self._highest_incarnation: dict[str, int] = {}
        # A dict used as an insertion-ordered set: waiters fire in the order
        # they arrived, and a cancelled one is removed in O(1).
        self._waiters: dict[Deferred[int], None] = {}

    def register(self, node_id: str, body: object, now: float) -> bool:
        """
        Register C{node_id} or renew its lease until C{now + ttl}.

        @param body: the parsed JSON request body,
            C{{"url": URL, "weight": W, "incarnation": N}}; C{weight}
            defaults to 1; without C{incarnation} the registration is always
            accepted and keeps the highest incarnation seen.  Other keys are
            ignored, so newer nodes can send more.
        @return: C{True} if membership changed (a join, a return from
            down, or a new url, weight or incarnation), C{False} for a plain
            renewal.
        @raise InvalidRegistration: the id or body is malformed.
        @raise StaleIncarnation: a newer incarnation of this id has been
            seen; nothing changed.
        """
        validate_node_id(node_id)
        if not isinstance(body, dict):
            raise InvalidRegistration("The request body must be a JSON object.")
        url = _validate_url(body.get("url"))
        weight = _validate_weight(body.get("weight", 1))
        highest = self._highest_incarnation.get(node_id)
        if "incarnation" in body:
            incarnation = _validate_incarnation(body["incarnation"])
            if highest is not None and incarnation < highest:
                raise StaleIncarnation(node_id, incarnation, highest)
        else:
            # A registration that claims no incarnation (an operator's curl, say) is taken
            # as it comes, and keeps the highest one seen, so stale heartbeats stay refused.
            incarnation = highest or 0

        start = self.index
        self._sweep(now)
        old = self._members.get(node_id)
        new = Member(node_id, url, weight, incarnation, now + self.ttl)
        self._members[node_id] = new
        heapq.heappush(self._deadlines, (new.expires, node_id))
        self._highest_incarnation[node_id] = incarnation
        changed = old is None or (old.url, old.weight, old.incarnation, old.status) != (
            url,
            weight,
            incarnation,
            "up",
        )
        if changed:
            self.index += 1
            if old is None:
                action = "joined"
            elif old.up:
                action = "re-registered"
            else:
                action = "is up again"
            log.info(
                "Node {node_id} {action} at {url} (weight {weight}, incarnation {incarnation})",
                node_id=node_id,
                action=action,
                url=url,
                weight=weight,
                incarnation=incarnation,
            )
        self._notify(start)
        return changed

    def leave(self, node_id: str, now: float, incarnation: int | None = None) -> bool:
        """
        Remove C{node_id} now, up or down.

        @param incarnation: if given, the incarnation of the process that is
            leaving; a leave from an older incarnation than the registered
            member's is refused.
        @return: C{True} if it was a member, C{False} if unknown (including
            a member forgotten by C{now}).
        @raise InvalidRegistration: C{incarnation} is not a valid incarnation.
        @raise StaleIncarnation: a newer incarnation is registered; nothing
            changed.
        """
        if incarnation is not None:
            _validate_incarnation(incarnation)
            member = self._members.get(node_id)
            # Down is not gone: a late leave from a dead process must not remove its successor.
            if member is not None and incarnation < member.incarnation:
                raise StaleIncarnation(node_id, incarnation, member.incarnation)

        start = self.index
        self._sweep(now)
        member = self._members.pop(node_id, None)
        if member is not None:
            self.index += 1
            log.info("Node {node_id} at {url} left", node_id=node_id, url=member.url)
        self._notify(start)
        return member is not None

    def expire(self, now: float) -> list[str]:
        """
        Mark down every member whose lease has ended (C{expires <= now}), and
        forget every member down for C{forget_after} seconds by C{now}.

        @return: the ids that changed (marked down or forgotten), sorted;
            the index moves once if any.
        """
        start = self.index
        changed = self._sweep(now)
        self._notify(start)
        return changed

    def members(self, status: Status | None = None) -> list[Member]:
        """
        The members, sorted by id; with C{status}, only those with that status.
        """
        return [
            self._members[node_id]
            for node_id in sorted(self._members)
            if status is None or self._members[node_id].status == status
        ]

    def member(self, node_id: str) -> Member | None:
        """
        The member registered as C{node_id}, or C{None}.
        """
        return self._members.get(node_id)

    def is_member(self, node_id: str) -> bool:
        """Whether C{node_id} is a member, up or down."""
        return node_id in self._members

    def is_up(self, node_id: str) -> bool:
        member = self._members.get(node_id)
        return member is not None and member.up

    def snapshot(self, status: Status | None = None) -> dict[str, object]:
        """
        The membership as C{GET /registry/nodes} shows it (without
        C{"success"}): C{{"index": I, "nodes": [{"id", "url", "weight",
        "status"}, ...]}}; with C{status}, only the members with that status.
        """
        return {
            "index": self.index,
            "nodes": [member.to_json() for member in self.members(status)],
        }

    def next_expiry(self) -> float | None:
        """
        The next time a sweep has something to do (a lease of a member that
        is up ends, or a member that is down is forgotten), or C{None} with
        no members.
        """
        return min(
            (m.expires if m.up else m.expires + self.forget_after for m in self._members.values()),
            default=None,
        )

    def wait_for_change(self, index: int) -> Deferred[int]:
        """
        Wait until the index differs from C{index}.

        @return: a Deferred that fires with the current index: at once if it
            already differs from C{index} (larger or smaller, see the module
            docstring), else at the next membership change.  Cancelling it
            forgets the waiter.
        """
        if index != self.index:
            return succeed(self.index)
        waiter: Deferred[int] = Deferred(self._forget_waiter)
        self._waiters[waiter] = None
        return waiter

    @property
    def waiting(self) -> int:
        """
        How many long polls are waiting for a change.
        """
        return len(self._waiters)

    def _forget_waiter(self, waiter: Deferred[int]) -> None:
        self._waiters.pop(waiter, None)

    def _sweep(self, now: float) -> list[str]:
        """
        Mark down the members whose lease ended by C{now}, forget those down long enough; one index move.

        Only the deadlines that have passed are looked at (a heap of them, each checked against
        the member as it is now, as a renewal leaves its older deadline behind), so a renewal
        costs O(log members), not a pass over every member.
        """
        changed = set()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, node_id = heapq.heappop(deadlines)
            member = self._members.get(node_id)
            if member is None:
                continue
            if member.up and member.expires <= now:
                member = self._members[node_id] = evolve(member, status="down")
                heapq.heappush(deadlines, (member.expires + self.forget_after, node_id))
                changed.add(node_id)
                log.info(
                    "Node {node_id} at {url} is down: lease not renewed within {ttl}s",
                    node_id=node_id,
                    url=member.url,
                    ttl=self.ttl,
                )
            if not member.up and member.expires + self.forget_after <= now:
                del self._members[node_id]
                changed.add(node_id)
                log.info(
                    "Node {node_id} at {url} forgotten: down for {forget_after}s",
                    node_id=node_id,
                    url=member.url,
                    forget_after=self.forget_after,
                )
        if changed:
            self.index += 1
        return sorted(changed)

    def _notify(self, start: int) -> None:
        # Fire once per public call, after the state is final, so a waiter
        # that reads the registry from its callback sees a consistent view.
        if self.index == start:
            return
        waiters, self._waiters = self._waiters, {}
        index = self.index
        for waiter in waiters:
            waiter.callback(index)
