"""
How far this gateway's clock is from its nodes' clocks.

Versions are made from the coordinator's clock, and a replica that holds a newer version
than a write's makes the write go again (see L{kvd.gateway.coordinator}), so a skewed clock
costs round trips rather than lost writes; it is still something an operator must hear of.
Each node's answers to writes carry its clock; the skew is measured against them.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define, field
from twisted.logger import Logger

_log = Logger()

#: A skew larger than this (seconds) is logged.
NOTABLE_SKEW = 1.0


@define
class ClockSkew:
    """The skew to each node, from the clocks their answers carry; C{now} is this gateway's clock."""

    now: Callable[[], float]
    skews: dict[str, float] = field(factory=dict)
    _notable: set[str] = field(factory=set)

    def observe(self, node_id: str, node_now: float) -> None:
        skew = self.now() - node_now
        self.skews[node_id] = skew
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
