"""
The gateway's view of the cluster: who the members are, and which of them own a key.

The membership comes in from a L{kvd.membership.Watcher} (or a static list); the ring is
rebuilt when ids or weights change. The ring holds every member, up or down (a member whose
lease ran out is "down", not gone), so keys move only when a member joins or is removed;
L{Cluster.down} says which members the registry reports down. Work that spans many keys (a repair sweep) takes one
L{ClusterView}, so a membership change halfway through cannot mix two placements.

Building a ring takes time in proportion to its points (about 0.05 s at 10 nodes, 0.5 s at
100 and 5 s at 1,000 with the default vnodes), so given a L{Runner} (a thread, in a gateway)
the cluster builds it there: the view the gateway routes with stays the last complete one
(old membership and old ring together) until the new ring is ready, and a membership that
arrives meanwhile is taken once that build is done, so a burst of changes costs one more
build, not one each.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.keys import Unavailable
from kvd.membership import NodeInfo
from kvd.ring import DEFAULT_VNODES, Ring, node_points
from kvd.store import Runner, synchronous

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
    #: (needed, unusable members) -> ranges short of that many usable owners; see L{ranges_short_of}.
    _short: dict[tuple[int, frozenset[str]], int] = field(factory=dict, eq=False, repr=False)

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

    def usable(self, node_id: str, reachable: Callable[[str], bool]) -> bool:
        """Whether quorum traffic may go to the member: the registry has it up and C{reachable} says yes."""
        return self.members[node_id].status != "down" and reachable(node_id)

    def route(self, key: str, unreachable: Container[str]) -> Route:
        """
        Where a key's quorum traffic goes when the members in C{unreachable} (and those the
        registry has down) cannot be asked: its reachable owners, each unreachable owner
        replaced by the next reachable member clockwise.

        @raise NoNodes: when there are no members.
        """
        owners, fallbacks = self.placement(key)
        members = self.members
        # Each member looked at once, without a call (the write path's every PUT comes here);
        # when every member is usable (the usual case), one pass and no sorting out.
        for node_id in owners:
            if members[node_id].status == "down" or node_id in unreachable:
                break
        else:
            for node_id in fallbacks:
                if members[node_id].status == "down" or node_id in unreachable:
                    break
            else:
                return Route(owners, owners[:], fallbacks, [])
        live, last_resort, spares, skipped = [], [], [], []
        for node_id in owners:
            if members[node_id].status != "down" and node_id not in unreachable:
                live.append(node_id)
            else:
                last_resort.append(node_id)
                skipped.append(node_id)
        for node_id in fallbacks:
            if members[node_id].status != "down" and node_id not in unreachable:
                spares.append(node_id)
            else:
                skipped.append(node_id)
        missing = len(owners) - len(live)
        # The owners skipped now come last among the spares: a request outlives the moment it
        # was routed, and an owner judged unreachable for a moment (a slow answer on a loaded
        # machine) may be back when a target fails; if it is not, asking it fails at once.
        if not missing:
            return Route(owners, live, spares + last_resort, skipped)
        return Route(owners, live + spares[:missing], spares[missing:] + last_resort, skipped)

    def ranges_short_of(self, needed: int, reachable: Callable[[str], bool]) -> int:
        """
        How many ring ranges have fewer than C{needed} usable owners.

        A range has min(N, members) distinct owners, so while no more members are unusable than
        that leaves room for, no range can be short, and the answer is 0 without a walk. Only
        otherwise are the ranges walked (every point of the ring), once per set of unusable
        members: a readiness probe polled every second does not walk a large ring each time.
        """
        unusable = frozenset(node_id for node_id in self.members if not self.usable(node_id, reachable))
        if min(self.replicas, len(self.members)) - len(unusable) >= needed:
            return 0
        known = self._short.get((needed, unusable))
        if known is not None:
            return known
        short = 0
        for node_id, weight in self.ring.nodes.items():
            for point in node_points(node_id, weight * self.ring.vnodes):
                owners = self.ring.preference_list_at(point, self.replicas)
                if sum(owner not in unusable for owner in owners) < needed:
                    short += 1
        if len(self._short) >= 16:
            self._short.clear()
        self._short[needed, unusable] = short
        return short


@frozen
class Route:
    """A key's owners, and where its quorum traffic goes now (see L{ClusterView.route})."""

    owners: list[str]
    #: Reachable owners, then as many reachable fallbacks as there are unreachable owners.
    targets: list[str]
    #: The other reachable members in ring order, then the owners skipped: replacements for
    #: targets that fail (and, for reads, the nodes a hedge asks).
    spares: list[str]
    #: Members not asked at all, as they cannot be reached.
    skipped: list[str]

    def hints(self) -> dict[str, str]:
        """Each fallback among the targets, and the unreachable owner it stands in for."""
        if self.targets == self.owners:
            return {}
        missing = [node_id for node_id in self.owners if node_id not in self.targets]
        standing = [node_id for node_id in self.targets if node_id not in self.owners]
        return dict(zip(standing, missing, strict=False))


@define
class Cluster:
    """The members a gateway routes to, placed on a consistent-hash ring."""

    vnodes: int = DEFAULT_VNODES
    replicas: int = DEFAULT_REPLICAS
    members: dict[str, NodeInfo] = field(factory=dict)
    #: Where rings are built (and other work in proportion to the ring, such as a plan's dry
    #: run): at once by default; a gateway gives a thread, so the reactor never waits for one.
    run: Runner[Any] = synchronous
    #: Told each membership once it is in use (its ring built): what follows the members (the
    #: failure detector's probes, the clock skews) must not drop one the gateway still routes to.
    adopted: Callable[[Mapping[str, NodeInfo]], object] | None = None
    ring: Ring = field(init=False)
    #: The members the registry reports down: still members, still on the ring.
    down: frozenset[str] = field(init=False, default=frozenset())
    _view: ClusterView = field(init=False)
    #: While a ring is being built: the newest membership that came in, taken once it is done.
    _waiting: tuple[dict[str, NodeInfo], bool] | None = field(init=False, default=None)
    _building: bool = field(init=False, default=False)
    #: Waiting for the first membership given to L{update} to be in use; None once it is.
    _ready: list[Deferred[None]] | None = field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        given, self.ring = self.members, Ring({}, vnodes=self.vnodes)
        self._adopt(self.ring, {}, quiet=True, given=False)
        if given:
            self.update(given, quiet=True)

    def update(self, members: Mapping[str, NodeInfo], quiet: bool = False) -> None:
        """
        Take a new membership, members up and down alike; the ring is rebuilt only when ids or
        weights changed (never for a change of status). With a ring to build, the membership
        is taken once its ring is ready (see the module's docstring).
        """
        members = dict(members)
        if self._building:
            self._waiting = members, quiet
            return
        weights = {m.id: m.weight for m in members.values()}
        if weights == dict(self.ring.nodes):
            self._adopt(self.ring, members, quiet)
            return
        self._building = True
        vnodes = self.vnodes
        self.run(lambda: Ring(weights, vnodes=vnodes)).addBoth(self._built, members, quiet)

    def _built(self, result: object, members: dict[str, NodeInfo], quiet: bool) -> None:
        self._building = False
        if isinstance(result, Failure):
            _log.failure("building the ring failed; building it here instead", result)
            result = Ring({m.id: m.weight for m in members.values()}, vnodes=self.vnodes)
        assert isinstance(result, Ring)
        self._adopt(result, members, quiet)
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.update(*waiting)

    def ready(self) -> Deferred[None]:
        """Fires once the first membership given to L{update} is in use (its ring built)."""
        if self._ready is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def _adopt(self, ring: Ring, members: dict[str, NodeInfo], quiet: bool, given: bool = True) -> None:
        """Route with C{ring} and C{members} (the membership it was built for) from now on."""
        self.ring = ring
        self.members = members
        self.down = frozenset(m.id for m in members.values() if not m.up)
        self._view = ClusterView(
            self.members, self.ring, min(self.replicas, len(self.members)) or self.replicas, self.down
        )
        if not quiet:
            _log.info(
                "cluster membership: {nodes}",
                nodes=", ".join(f"{m.id}={m.url}{'' if m.up else ' (down)'}" for m in self.sorted()) or "none",
            )
        if given and self.adopted is not None:
            self.adopted(members)
        if given and self._ready is not None:
            waiting, self._ready = self._ready, None
            for d in waiting:
                d.callback(None)

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
