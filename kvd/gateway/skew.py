"""
How far this gateway's clock is from its nodes' clocks.

Versions are made from the coordinator's clock, and a replica that holds a newer version
than a write's makes the write go again (see L{kvd.gateway.coordinator}), so a skewed clock
costs round trips rather than lost writes; it is still something an operator must hear of.
Each node's answers to writes carry its clock; the skew is measured against them.

A gateway whose clock is off by more than L{NOTABLE_SKEW} from the median of its nodes'
reckons time by theirs (L{ClockSkew.cluster_now}): the expiry a TTL write carries and the
moment a read judges an entry expired would otherwise be off by the gateway's error (an hour
slow: a ten-minute TTL acknowledged already expired). Until its nodes have answered it once,
a gateway has only its own clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

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

    def cluster_now(self) -> float:
        """This gateway's clock, moved to its nodes' median when that is more than L{NOTABLE_SKEW} away."""
        return self.now() - self._offset

    def observe(self, node_id: str, node_now: float) -> None:
        now = self.now()
        skew = now - node_now
        self.skews[node_id] = skew
        if now - self._worked_out >= MEDIAN_EVERY or node_id not in self._notable and abs(skew) > NOTABLE_SKEW:
            self._worked_out = now
            median = statistics.median(self.skews.values())
            offset = median if abs(median) > NOTABLE_SKEW else 0.0
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
