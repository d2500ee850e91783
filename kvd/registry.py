"""
The registry's domain: which nodes are members, their leases, lease expiry,
the change index and the long-poll waiters that watch it.

This module knows nothing about HTTP or the reactor.  Time comes in as
``now`` (seconds from the caller's clock); the HTTP layer maps
L{InvalidRegistration} to 400 and L{StaleIncarnation} to 409.

Node ids
    A node id is 1 to 128 characters of ASCII letters, digits, C{.}, C{_}
    and C{-}, and starts with a letter or a digit.  Ids appear in URL path
    segments, command lines and log lines, so the rule keeps out
    everything that needs escaping there, and the leading-character rule
    keeps out C{.}, C{..} and ids that read like command-line options.

Leases
    Registering or renewing gives a member a lease until C{now + ttl}.  A
    lease has ended when C{expires <= now}.  Every mutating call first drops
    the leases that have ended by its C{now}, so an answer never depends on
    when the caller's expiry timer last ran: a heartbeat arriving after its
    lease ended is a re-join (two changes: the expiry, then the join), not a
    renewal.

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
    a join, a leave, a change of url, weight or incarnation, and an expiry
    sweep that dropped at least one member.  A plain renewal does not move
    it.  A long poll for index I answers at once whenever I differs from the
    current index, including an I larger than the current one: that is an
    index from an earlier registry process (the index restarts at 1), and
    waiting for it to be "passed" could hang for ever.
"""

from __future__ import annotations

import math
import re

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from kvd.validate import MAX_URL_LENGTH, Invalid, base_url
from kvd.validate import shown as _shown

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_INCARNATION",
    "MAX_URL_LENGTH",
    "MAX_WEIGHT",
    "InvalidRegistration",
    "Member",
    "Registry",
    "StaleIncarnation",
    "validate_node_id",
]

MAX_ID_LENGTH = 128
#: A node of weight w takes w x --vnodes points on every gateway's ring (4000 each by default);
#: past this a ring rebuild would stall a gateway for seconds.
MAX_WEIGHT = 16
# Large enough for a wall-clock-in-nanoseconds incarnation, small enough to
# survive any JSON implementation that uses 64-bit integers.
MAX_INCARNATION = 2**63 - 1

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
    """

    id: str
    url: str
    weight: int
    incarnation: int
    expires: float

    def to_json(self) -> dict[str, object]:
        """
        The public fields of a member, as C{GET /registry/nodes} lists them.
        """
        return {"id": self.id, "url": self.url, "weight": self.weight}


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
    The set of live members, their leases and the change index.

    @ivar ttl: the lease length in seconds.
    @ivar index: the change index (see the module docstring).
    """

    def __init__(self, ttl: float) -> None:
        if isinstance(ttl, bool) or not (math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = ttl
        self.index = 1
        self._members: dict[str, Member] = {}
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
        @return: C{True} if membership changed (a join, or a new url,
            weight or incarnation), C{False} for a plain renewal.
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
        self._drop_expired(now)
        old = self._members.get(node_id)
        new = Member(node_id, url, weight, incarnation, now + self.ttl)
        self._members[node_id] = new
        self._highest_incarnation[node_id] = incarnation
        changed = old is None or (old.url, old.weight, old.incarnation) != (
            url,
            weight,
            incarnation,
        )
        if changed:
            self.index += 1
            log.info(
                "Node {node_id} {action} at {url} (weight {weight}, incarnation {incarnation})",
                node_id=node_id,
                action="joined" if old is None else "re-registered",
                url=url,
                weight=weight,
                incarnation=incarnation,
            )
        self._notify(start)
        return changed

    def leave(self, node_id: str, now: float, incarnation: int | None = None) -> bool:
        """
        Remove C{node_id} now.

        @param incarnation: if given, the incarnation of the process that is
            leaving; a leave from an older incarnation than the registered
            member's is refused.
        @return: C{True} if it was a member, C{False} if unknown (including
            a member whose lease had already ended by C{now}).
        @raise InvalidRegistration: C{incarnation} is not a valid incarnation.
        @raise StaleIncarnation: a newer incarnation is registered; nothing
            changed.
        """
        if incarnation is not None:
            _validate_incarnation(incarnation)
            member = self._members.get(node_id)
            # A member whose lease has ended by now is about to be dropped
            # anyway, so a leave from an older incarnation is harmless then.
            if member is not None and member.expires > now and incarnation < member.incarnation:
                raise StaleIncarnation(node_id, incarnation, member.incarnation)

        start = self.index
        self._drop_expired(now)
        member = self._members.pop(node_id, None)
        if member is not None:
            self.index += 1
            log.info("Node {node_id} at {url} left", node_id=node_id, url=member.url)
        self._notify(start)
        return member is not None

    def expire(self, now: float) -> list[str]:
        """
        Drop every member whose lease has ended (C{expires <= now}).

        @return: the ids dropped, sorted; the index moves once if any.
        """
        start = self.index
        dropped = self._drop_expired(now)
        self._notify(start)
        return dropped

    def members(self) -> list[Member]:
        """
        The members, sorted by id.
        """
        return [self._members[node_id] for node_id in sorted(self._members)]

    def member(self, node_id: str) -> Member | None:
        """
        The member registered as C{node_id}, or C{None}.
        """
        return self._members.get(node_id)

    def is_member(self, node_id: str) -> bool:
        return node_id in self._members

    def snapshot(self) -> dict[str, object]:
        """
        The membership as C{GET /registry/nodes} shows it (without
        C{"success"}): C{{"index": I, "nodes": [{"id", "url", "weight"}, ...]}}.
        """
        return {
            "index": self.index,
            "nodes": [member.to_json() for member in self.members()],
        }

    def next_expiry(self) -> float | None:
        """
        The earliest lease expiry, or C{None} with no members.
        """
        return min((m.expires for m in self._members.values()), default=None)

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

    def _drop_expired(self, now: float) -> list[str]:
        dropped = sorted(node_id for node_id, m in self._members.items() if m.expires <= now)
        for node_id in dropped:
            member = self._members.pop(node_id)
            log.info(
                "Node {node_id} at {url} expired: lease not renewed within {ttl}s",
                node_id=node_id,
                url=member.url,
                ttl=self.ttl,
            )
        if dropped:
            self.index += 1
        return dropped

    def _notify(self, start: int) -> None:
        # Fire once per public call, after the state is final, so a waiter
        # that reads the registry from its callback sees a consistent view.
        if self.index == start:
            return
        waiters, self._waiters = self._waiters, {}
        index = self.index
        for waiter in waiters:
            waiter.callback(index)
