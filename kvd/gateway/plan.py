"""
Dry runs of membership changes: which share of the key space a join or a removal would
move, from which node to which, computed from the ring alone (nothing is changed).

Pure code over L{kvd.ring}: no I/O, no Twisted. The key space is cut at every point of both
rings (the one now and the one after the change); each piece is owned by the same
preference list in each ring from end to end, so comparing the two lists piece by piece
gives the exact fractions of the hash space, with no sampling.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from attrs import frozen

from kvd.registry import MAX_WEIGHT
from kvd.ring import POINT_SPACE, Ring, node_points
from kvd.validate import Invalid, shown

__all__ = ["Change", "Move", "Plan", "parse_change", "plan", "shares"]

#: A node id, as the registry accepts it.
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@frozen
class Change:
    """A member joining (or changing weight: C{weight} set) or leaving (C{weight} None)."""

    node_id: str
    weight: int | None


@frozen
class Move:
    """C{share} of the hash space whose replica would move from C{source} to C{target}."""

    source: str
    target: str
    share: float

    def to_json(self) -> dict[str, object]:
        return {"from": self.source, "to": self.target, "share": self.share}


@frozen
class Plan:
    """
    What a change would move: each (from, to) pair of nodes with the share of the hash space
    whose copy would go from one to the other, and C{moved_share}, the share of the hash
    space whose keys would be copied to a node that does not hold them now (each key counted
    once). A removal that leaves every key on owners that already hold it moves nothing.
    """

    moves: tuple[Move, ...]
    moved_share: float

    def to_json(self) -> dict[str, object]:
        return {"moves": [m.to_json() for m in self.moves], "moved_share": self.moved_share}


def parse_change(join: str | None, remove: str | None, members: Mapping[str, int]) -> Change:
    """
    C{join=ID[:WEIGHT]} or C{remove=ID}, exactly one of them, checked against the
    membership (id -> weight). @raise Invalid: with a sentence saying what is wrong.
    """
    if (join is None) == (remove is None):
        raise Invalid("give exactly one of join=ID[:WEIGHT] or remove=ID")
    if remove is not None:
        if remove not in members:
            raise Invalid(f"{remove!r} is not a member")
        return Change(remove, None)
    assert join is not None
    node_id, _, weight_text = join.partition(":") if ":" in join else (join, "", "1")
    if _NODE_ID.fullmatch(node_id) is None:
        raise Invalid(f"a node id is 1 to 128 letters, digits, '.', '_' or '-', not {shown(node_id)}")
    well_formed = len(weight_text) <= 3 and weight_text.isascii() and weight_text.isdigit()
    if not well_formed or not 1 <= int(weight_text) <= MAX_WEIGHT:
        raise Invalid(f"the weight must be a whole number from 1 to {MAX_WEIGHT}, not {shown(weight_text)}")
    return Change(node_id, int(weight_text))


def changed(ring: Ring, change: Change) -> Ring:
    """The ring with C{change} made."""
    members = dict(ring.nodes)
    if change.weight is None:
        members.pop(change.node_id, None)
    else:
        members[change.node_id] = change.weight
    return Ring(members, vnodes=ring.vnodes)


def _cuts(ring: Ring) -> set[int]:
    return {p for node_id, weight in ring.nodes.items() for p in node_points(node_id, weight * ring.vnodes)}


def _pieces(*rings: Ring) -> list[tuple[int, int]]:
    """(end point, length) of each piece of the hash space the rings' points cut it into."""
    cuts = sorted(set().union(*(_cuts(r) for r in rings)))
    if not cuts:
        return []
    # The piece ending at the first cut starts after the last one, across the wrap.
    lengths = [POINT_SPACE - cuts[-1] + cuts[0]] + [b - a for a, b in zip(cuts, cuts[1:], strict=False)]
    return list(zip(cuts, lengths, strict=True))


def plan(ring: Ring, change: Change, replicas: int) -> Plan:
    """What C{change} would move on C{ring} with C{replicas} copies of each key."""
    after = changed(ring, change)
    moved: dict[tuple[str, str], int] = {}
    total = 0
    for point, length in _pieces(ring, after):
        old = ring.preference_list_at(point, replicas)
        new = after.preference_list_at(point, replicas)
        if old == new:
            continue
        gone = [n for n in old if n not in new]
        came = [n for n in new if n not in old]
        if not came:
            continue  # the same owners, or fewer of them: nothing is copied
        total += length
        # A piece whose owners only grew (a ring with fewer members than replicas) is copied
        # from its first owner.
        sources = gone or old[:1] * len(came)
        # A weight change within a small ring can change the number of owners: pair what pairs.
        for source, target in zip(sources, came, strict=False):
            moved[(source, target)] = moved.get((source, target), 0) + length
    moves = tuple(Move(s, t, n / POINT_SPACE) for (s, t), n in sorted(moved.items(), key=lambda kv: (-kv[1], kv[0])))
    return Plan(moves, total / POINT_SPACE)


def shares(ring: Ring) -> dict[str, float]:
    """Each node's share of the hash space: the keys it is first owner of."""
    owned = dict.fromkeys(ring.nodes, 0)
    for point, length in _pieces(ring):
        owner = ring.owner_at(point)
        assert owner is not None
        owned[owner] += length
    return {node_id: n / POINT_SPACE for node_id, n in owned.items()}
