"""
The gateway's view of the cluster: who the members are, and which of them own a key.

Pure domain: the membership comes in from a L{kvd.membership.Watcher} (or a static list),
the ring is rebuilt on every change, and the HTTP layer asks for a key's owners.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import define, field
from twisted.logger import Logger

from kvd.keys import Unavailable
from kvd.membership import NodeInfo
from kvd.ring import DEFAULT_VNODES, Ring

_log = Logger()

DEFAULT_REPLICAS = 3


class NoNodes(Unavailable):
    def __init__(self) -> None:
        super().__init__("no storage nodes are registered")


@define
class Cluster:
    """The members a gateway routes to, placed on a consistent-hash ring."""

    vnodes: int = DEFAULT_VNODES
    replicas: int = DEFAULT_REPLICAS
    members: dict[str, NodeInfo] = field(factory=dict)
    ring: Ring = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.ring = Ring({}, vnodes=self.vnodes)
        if self.members:
            self.update(self.members)

    def update(self, members: Mapping[str, NodeInfo]) -> None:
        """Take a new membership; the ring is rebuilt only when ids or weights changed."""
        weights = {m.id: m.weight for m in members.values()}
        if weights != dict(self.ring.nodes):
            self.ring = Ring(weights, vnodes=self.vnodes)
        self.members = dict(members)
        _log.info("cluster membership: {nodes}", nodes=", ".join(f"{m.id}={m.url}" for m in self.sorted()) or "none")

    def sorted(self) -> list[NodeInfo]:
        return [self.members[i] for i in sorted(self.members)]

    def owners(self, key: str) -> list[str]:
        """The key's preference list, first owner first."""
        return self.ring.preference_list(key, self.replicas)
