"""The consistent-hash ring: which nodes hold which keys.

This module owns placement and nothing else: given a membership (node id ->
weight) it answers, for any key, the ordered list of distinct nodes that hold
it. It does no I/O; gateways build a new ``Ring`` whenever membership changes.

Hashing. A key's point is the first 64 bits, big-endian, of BLAKE2s-256 over
its UTF-8 bytes (``key_point``; BLAKE2s is the cheapest stdlib hash call on
short inputs). A node's points are the 64-bit words of counter-mode
BLAKE2b-512, personalised ``kvd.ring``, over its UTF-8 id (``node_points``);
a node of weight ``w`` takes the first ``w * vnodes`` words. Both are fixed by
the BLAKE2 specification, so every process, Python version and machine builds
the same ring, and equal points are ordered by node id, so dict order never
matters. A node's points depend only on its own id, weight and ``vnodes``: a
join only adds points (keys move only onto the joiner), a leave only removes
the leaver's, and a weight change only adds or removes the tail of that
node's own sequence.

Placement. A node's share of the ring is the sum of the gaps in front of its
points. While each node places its points without looking at the others
(which is what keeps bystanders' keys still on a join), those gaps are
independent and the share's relative spread is about ``1/sqrt(points)``;
smarter independent placements do not escape this (one point per equal slice
of the ring measured within noise of plain hashing), and coordinated ones
move keys between bystanders. So the default buys balance with points. Over
300 random sets of 10 equal node ids, the busiest node's share of the ring
over the mean was: 160 points, about 1.13; 2000 points, median 1.035 and 37
sets over 1.05; 3000, median 1.028 and 8 over; 4000, median 1.024, 99th
percentile 1.047, 1 set at 1.0503. Hence 4000. Extra points cost a lookup
almost nothing (see below) and cost construction about 0.5 s at 100 nodes.

Lookups. Points sit in a sorted list with a parallel list of owners. Two
tables indexed by the top bits of a point (at least four buckets per point,
capped at 2**20) give the owner and the segment directly for the buckets that
hold no point, four lookups in five or more, and bisection answers the rest.
Preference lists are computed once per segment and length, then read from a
table, so ``preference_list`` costs little more than ``owner``.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from bisect import bisect_left
from collections.abc import Mapping
from itertools import repeat
from types import MappingProxyType

__all__ = ["DEFAULT_VNODES", "POINT_SPACE", "Ring", "key_point", "node_points"]

DEFAULT_VNODES: int = 4000
"""Points per unit of weight; the module docstring has the measurements."""

POINT_SPACE: int = 1 << 64
"""Ring positions are the integers in ``range(POINT_SPACE)``."""

_NODE_PERSON = b"kvd.ring"
_WORDS_PER_BLOCK = 8
_MAX_BUCKET_BITS = 20
_unpack_block = struct.Struct(">8Q").unpack
_first_word = struct.Struct(">Q").unpack_from
_blake2b = hashlib.blake2b
_blake2s = hashlib.blake2s


def key_point(key: str) -> int:
    """Return the key's position on the ring (UnicodeEncodeError if the key is not valid UTF-8 text)."""
    point: int = _first_word(_blake2s(key.encode()).digest())[0]
    return point


def node_points(node_id: str, count: int) -> list[int]:
    """Return the first ``count`` ring positions of ``node_id``.

    The sequence depends on the id alone, so a shorter count gives a prefix
    of a longer one.
    """
    seed = node_id.encode()
    points: list[int] = []
    for block in range((count + _WORDS_PER_BLOCK - 1) // _WORDS_PER_BLOCK):
        # The fixed-width counter after the id keeps (id, block) -> input
        # injective, so no two nodes ever hash the same input.
        digest = _blake2b(seed + block.to_bytes(4, "big"), digest_size=64, person=_NODE_PERSON).digest()
        points.extend(_unpack_block(digest))
    del points[count:]
    return points


def _check_positive(what: str, value: object) -> int:
    # bool is an int subclass, but a weight of True is a caller's bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, not {value!r}")
    return value


def _check_point(point: int) -> None:
    if not 0 <= point < POINT_SPACE:
        raise ValueError(f"ring point {point!r} is outside [0, 2**64)")


class Ring:
    """A consistent-hash ring over weighted nodes.

    Immutable: build a new ``Ring`` when membership changes.
    """

    __slots__ = ("_nodes", "_vnodes", "_points", "_owners", "_shift", "_segments", "_bucket_owners", "_tables")

    def __init__(self, nodes: Mapping[str, int], vnodes: int = DEFAULT_VNODES) -> None:
        """Place every node of ``nodes`` (id -> weight) on the ring.

        Each node gets ``weight * vnodes`` points. Raise ``ValueError`` if a
        weight or ``vnodes`` is not a positive integer.
        """
        self._vnodes = _check_positive("vnodes", vnodes)
        members = {node_id: _check_positive(f"weight of node {node_id!r}", weight) for node_id, weight in nodes.items()}
        self._nodes: Mapping[str, int] = MappingProxyType(members)

        ids = sorted(members)
        # Sorting ints that carry (point, rank of the id) is about three
        # times cheaper than sorting tuples, and orders equal points by id.
        rank_bits = max(len(ids) - 1, 1).bit_length()
        tagged: list[int] = []
        for rank, node_id in enumerate(ids):
            count = members[node_id] * self._vnodes
            tagged.extend([(point << rank_bits) | rank for point in node_points(node_id, count)])
        tagged = _sorted(tagged, 64 + rank_bits)
        rank_mask = (1 << rank_bits) - 1
        self._points: list[int] = [tag >> rank_bits for tag in tagged]
        self._owners: list[str] = [ids[tag & rank_mask] for tag in tagged]
        _let_go(tagged)
        self._shift, self._segments, self._bucket_owners = _bucket_tables(self._points, self._owners)
        # n -> (segment -> first n distinct owners), filled on demand; the
        # hot path only reads it.
        self._tables: dict[int, list[tuple[str, ...] | None]] = {}

    @property
    def nodes(self) -> Mapping[str, int]:
        """The membership, node id -> weight, as given (read-only)."""
        return self._nodes

    @property
    def vnodes(self) -> int:
        """Points per unit of weight."""
        return self._vnodes

    def __len__(self) -> int:
        """The number of nodes."""
        return len(self._nodes)

    def __repr__(self) -> str:
        return f"Ring({dict(self._nodes)!r}, vnodes={self._vnodes!r})"

    def owner(self, key: str) -> str | None:
        """Return the first node clockwise from the key, or None if the ring is empty."""
        # key_point and owner_at are inlined: this is the per-request hot path.
        point: int = _first_word(_blake2s(key.encode()).digest())[0]
        owner = self._bucket_owners[point >> self._shift]
        if owner is None and self._points:
            owner = self._owners[self._bisect(point)]
        return owner

    def owner_at(self, point: int) -> str | None:
        """Return the first node at or clockwise from ``point``, or None if the ring is empty."""
        _check_point(point)
        owner = self._bucket_owners[point >> self._shift]
        if owner is None and self._points:
            owner = self._owners[self._bisect(point)]
        return owner

    def preference_list(self, key: str, n: int) -> list[str]:
        """Return the first ``n`` distinct nodes clockwise from the key.

        The first is ``owner(key)``. Fewer come back when the ring has fewer
        than ``n`` nodes; an empty ring gives ``[]``. Raise ``ValueError`` if
        ``n`` is negative.
        """
        # key_point and the segment search are inlined: this is a hot path.
        point: int = _first_word(_blake2s(key.encode()).digest())[0]
        segment = self._segments[point >> self._shift]
        if segment < 0:
            segment = self._bisect(point)
        table = self._tables.get(n)
        if table is not None:
            found = table[segment]
            if found is not None:
                return list(found)
        return self._preference(segment, n)

    def preference_list_at(self, point: int, n: int) -> list[str]:
        """Return the first ``n`` distinct nodes at or clockwise from ``point``."""
        _check_point(point)
        segment = self._segments[point >> self._shift]
        if segment < 0:
            segment = self._bisect(point)
        return self._preference(segment, n)

    def _bisect(self, point: int) -> int:
        segment = bisect_left(self._points, point)
        # Past the last point the ring wraps to the first.
        return 0 if segment == len(self._points) else segment

    def _preference(self, segment: int, n: int) -> list[str]:
        if n < 0:
            raise ValueError(f"n must not be negative, not {n!r}")
        count = min(n, len(self._nodes))
        if count == 0:
            return []
        table = self._tables.get(n)
        if table is None:
            # Asking for more nodes than the ring has is asking for all of
            # them: share that table.
            table = self._tables.get(count) or [None] * len(self._points)
            self._tables[n] = self._tables[count] = table
        found = table[segment]
        if found is None:
            found = table[segment] = self._walk(segment, count)
        return list(found)

    def _walk(self, segment: int, n: int) -> tuple[str, ...]:
        owners = self._owners
        size = len(self._points)
        found: list[str] = []
        seen: set[str] = set()
        # Terminates: every node has at least one point and n <= len(nodes).
        while len(found) < n:
            node_id = owners[segment]
            if node_id not in seen:
                seen.add(node_id)
                found.append(node_id)
            segment += 1
            if segment == size:
                segment = 0
        return tuple(found)


def _sorted(tagged: list[int], bits: int) -> list[int]:
    """
    ``sorted(tagged)``, for ints below ``2**bits`` spread evenly (hashes), emptying
    ``tagged``. One sort, like freeing one big list, holds the GIL from start to end (0.2 s
    at 400,000 points), so a ring built on a thread would stall the reactor that long; this
    sorts a slice of the range at a time and lets go of lists a chunk at a time.
    """
    slice_bits = max(0, (len(tagged) >> 12).bit_length())
    if slice_bits == 0:
        done = sorted(tagged)
        tagged.clear()
        return done
    shift = bits - slice_bits
    slices: list[list[int] | None] = [[] for _ in range(1 << slice_bits)]
    for tag in tagged:
        slices[tag >> shift].append(tag)  # type: ignore[union-attr]
    _let_go(tagged)
    done = []
    for index, part in enumerate(slices):
        assert part is not None
        slices[index] = None
        part.sort()
        done.extend(part)
    return done


def _let_go(items: list[int]) -> None:
    """Empty C{items} a chunk at a time (see L{_sorted})."""
    while items:
        del items[-65536:]


def _bucket_tables(points: list[int], owners: list[str]) -> tuple[int, array[int], list[str | None]]:
    """Index the sorted ``points`` by the top bits of the point space.

    Return ``(shift, segments, owners_by_bucket)``. For every p in bucket
    ``b = p >> shift`` that holds no point, ``segments[b]`` is the segment of
    p (the index of the first point >= p, wrapping to 0) and
    ``owners_by_bucket[b]`` its owner; where a point falls inside the bucket
    only bisection can tell, and they hold -1 and None.
    """
    if not points:
        # Every point lands in bucket 0, which answers "no owner".
        return 64, array("i", [-1]), [None]
    # Four buckets or more per point leave bisection to a fifth of lookups
    # or fewer; the cap bounds memory (12 bytes a bucket) on huge rings.
    bits = min((4 * len(points) - 1).bit_length(), _MAX_BUCKET_BITS)
    shift = 64 - bits
    # A C int array takes 4 bytes a bucket with no int objects behind it,
    # and being denser in cache it reads faster than a list.
    segments = array("i")
    owners_by_bucket: list[str | None] = []
    filled = 0
    for segment, point in enumerate(points):
        bucket = point >> shift
        if bucket >= filled:
            segments.extend(repeat(segment, bucket - filled))
            segments.append(-1)
            owners_by_bucket.extend(repeat(owners[segment], bucket - filled))
            owners_by_bucket.append(None)
            filled = bucket + 1
    # Past the last point the ring wraps to the first.
    segments.extend(repeat(0, (1 << bits) - filled))
    owners_by_bucket.extend(repeat(owners[0], (1 << bits) - filled))
    return shift, segments, owners_by_bucket
