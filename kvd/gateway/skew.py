"""
How far this gateway's clock is from its nodes' clocks.

Versions are made from the coordinator's clock, and a replica that holds a newer version
than a write's makes the write go again (see L{kvd.gateway.coordinator}), so a skewed clock
costs round trips rather than lost writes; it is still something an operator must hear of.
Each node's answers to writes carry its clock; the skew is measured against them.

A gateway whose clock is off by more than L{NOTABLE_SKEW} from the low median of its
members' clocks (once a majority of them answered: one node, or two of five, never moves it)
reckons time by theirs (L{ClockSkew.cluster_now}): the expiry a TTL write carries and the
moment a read judges an entry expired would otherwise be off by the gateway's error (an hour
slow: a ten-minute TTL acknowledged already expired). The correction goes off again only
under half that, so a skew near it does not flap. Until its nodes have answered it, a
gateway has only its own clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

from attrs import define, field
from twisted.logger import Logger

_log = Logger()

#: A skew larger than this (seconds) is logged; a median skew larger than this is corrected.
NOTABLE_SKEW = 1.0
#: How often (seconds) the median skew is worked out again.
MEDIAN_EVERY = 1.0


@define
class ClockSkew:
    """The skew to each node, from the clocks their answers carry; C{now} is this gateway's clock."""

    now: Callable[[], float]
    skews: dict[str, float] = field(factory=dict)
    _notable: set[str] = field(factory=set)
    #: What L{cluster_now} takes off this gateway's clock, and when it was last worked out.
    _offset: float = 0.0
    _worked_out: float = float("-inf")
    #: The members (L{keep}); skews are corrected only once a majority of them answered.
    _members: frozenset[str] = frozenset()

    def cluster_now(self) -> float:
        """This gateway's clock, moved to its nodes' median when that is more than L{NOTABLE_SKEW} away."""
        return self.now() - self._offset

    def keep(self, members: Iterable[str]) -> None:
        """The membership now: skews of nodes that left are forgotten (they vote no more)."""
        self._members = frozenset(members)
        for node_id in list(self.skews):
            if node_id not in self._members:
                del self.skews[node_id]
                self._notable.discard(node_id)
        self._worked_out = float("-inf")

    def _work_out(self) -> float:
        """
        The offset: the low median of the members' skews once a majority of them answered (one
        node's clock, or two, never moves a gateway alone), switched on past L{NOTABLE_SKEW}
        and off again only under half of it, so a skew near the threshold does not flap.
        """
        members = self._members or frozenset(self.skews)
        known = [skew for node_id, skew in self.skews.items() if node_id in members]
        if len(known) < len(members) // 2 + 1:
            return self._offset
        median = statistics.median_low(known)
        limit = NOTABLE_SKEW / 2 if self._offset else NOTABLE_SKEW
        return median if abs(median) > limit else 0.0

    def observe(self, node_id: str, node_now: float) -> None:
        now = self.now()
        skew = now - node_now
        first = node_id not in self.skews
        self.skews[node_id] = skew
        # Worked out again each second, and at once for a node heard of first or newly far off.
        if first or now - self._worked_out >= MEDIAN_EVERY or node_id not in self._notable and abs(skew) > NOTABLE_SKEW:
            self._worked_out = now
            offset = self._work_out()
            if (offset == 0.0) != (self._offset == 0.0):
                _log.warn(
                    "reckoning time by the nodes' clocks, {offset:+.3f} s from this gateway's"
                    if offset
                    else "reckoning time by this gateway's clock again: it agrees with the nodes'",
                    offset=-offset,
                )
            self._offset = offset
        if abs(skew) > NOTABLE_SKEW and node_id not in self._notable:
            self._notable.add(node_id)
            _log.warn(
                "this gateway's clock is {skew:+.3f} s off node {node}'s: check NTP on both",
                skew=skew,
                node=node_id,
            )
        elif abs(skew) <= NOTABLE_SKEW and node_id in self._notable:
            self._notable.discard(node_id)
            _log.info("this gateway's clock agrees with node {node}'s again", node=node_id)

    def largest(self) -> float:
        """The skew of largest size, signed (positive: this gateway is ahead); 0 with no answers yet."""
        return max(self.skews.values(), key=abs, default=0.0)
