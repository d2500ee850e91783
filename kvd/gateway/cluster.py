"""
The gateway's view of the cluster: who the members are, and which of them own a key.

The membership comes in from a L{kvd.membership.Watcher} (or a static list); the ring is
rebuilt when ids or weights change. The ring holds every member, up or down (a member whose
lease ran out is "down", not gone), so keys move only when a member joins or is removed;
L{Cluster.down} says which members the registry reports down. Work that spans many keys (a repair sweep) takes one
L{ClusterView}, so a membership change halfway through cannot mix two placements.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import define, field, frozen
from twisted.logger import Logger

from kvd.keys import Unavailable
from kvd.membership import NodeInfo
from kvd.ring import DEFAULT_VNODES, Ring

_log = Logger()

DEFAULT_REPLICAS = 3


class NoNodes(Unavailable):
    def __init__(self) -> None:
        super().__init__("no storage nodes are registered")


@frozen
class ClusterView:
    """One membership and its ring, as they were at one moment."""

    members: Mapping[str, NodeInfo]
    ring: Ring
    replicas: int
    #: The members the registry reports down (still on the ring).
    down: frozenset[str] = frozenset()

    def owners(self, key: str) -> list[str]:
        """The key's preference list, first owner first."""
        return self.ring.preference_list(key, self.replicas)

    def placement(self, key: str) -> tuple[list[str], list[str]]:
        """
        (owners, fallbacks): the key's N owners, then every other member in ring order, the
        nodes that hold its writes for an owner that cannot be reached.

        @raise NoNodes: when there are no members.
        """
        order = self.ring.preference_list(key, len(self.members))
        if not order:
            raise NoNodes()
        return order[: self.replicas], order[self.replicas :]


@define
class Cluster:
    """The members a gateway routes to, placed on a consistent-hash ring."""

    vnodes: int = DEFAULT_VNODES
    replicas: int = DEFAULT_REPLICAS
    members: dict[str, NodeInfo] = field(factory=dict)
    ring: Ring = field(init=False)
    #: The members the registry reports down: still members, still on the ring.
    down: frozenset[str] = field(init=False, default=frozenset())
    _view: ClusterView = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.ring = Ring({}, vnodes=self.vnodes)
        self.update(self.members, quiet=True)

    def update(self, members: Mapping[str, NodeInfo], quiet: bool = False) -> None:
        """
        Take a new membership, members up and down alike; the ring is rebuilt only when ids or
        weights changed (never for a change of status).
        """
        weights = {m.id: m.weight for m in members.values()}
        if weights != dict(self.ring.nodes):
            self.ring = Ring(weights, vnodes=self.vnodes)
        self.members = dict(members)
        self.down = frozenset(m.id for m in members.values() if not m.up)
        self._view = ClusterView(
            self.members, self.ring, min(self.replicas, len(self.members)) or self.replicas, self.down
        )
        if not quiet:
            _log.info(
                "cluster membership: {nodes}",
                nodes=", ".join(f"{m.id}={m.url}{'' if m.up else ' (down)'}" for m in self.sorted()) or "none",
            )

    def view(self) -> ClusterView:
        """The membership as it is now; it does not change when the cluster does."""
        return self._view

    def sorted(self) -> list[NodeInfo]:
        return [self.members[i] for i in sorted(self.members)]

    def owners(self, key: str) -> list[str]:
        """The key's preference list, first owner first."""
        return self.ring.preference_list(key, self.replicas)

    def placement(self, key: str) -> tuple[list[str], list[str]]:
        """(owners, fallbacks in ring order) among the current members; see L{ClusterView.placement}."""
        return self._view.placement(key)
