"""
The dashboard the gateway serves at C{GET /ui}: one self-contained HTML page (inline CSS, JS
and SVG; no build step, nothing fetched from elsewhere), shipped as package data, and the
compact description of the ring it draws (L{ring_arcs}).

The page holds no data: it fetches the gateway's JSON (C{/cluster}, C{/cluster/ring},
C{/cluster/hot}, C{/cluster/owners/{key}}, C{/cluster/key/{key}}, C{/metrics}) every two
seconds and draws it, sending a bearer token when one is typed into it.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from kvd.ring import POINT_SPACE, Ring

#: How finely C{/cluster/ring} samples the ring by default, and at most.
DEFAULT_SEGMENTS = 360
MAX_SEGMENTS = 4096

#: What the page may load: only itself and the gateway's JSON (no other origin, no plugins).
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@cache
def page() -> bytes:
    """The dashboard's HTML."""
    return files(__name__).joinpath("index.html").read_bytes()


def ring_arcs(ring: Ring, segments: int = DEFAULT_SEGMENTS) -> list[tuple[int, str]]:
    """
    The ring's ownership sampled into C{segments} equal slices, as runs: (first slice, node)
    for each slice whose owner differs from the slice before it. Slice C{i} covers
    C{[i, i + 1) * 2**64 / segments} and is owned by the node owning its middle point.
    An empty ring gives C{[]}.
    """
    if not 1 <= segments <= MAX_SEGMENTS:
        raise ValueError(f"segments must be from 1 to {MAX_SEGMENTS}, not {segments!r}")
    runs: list[tuple[int, str]] = []
    for i in range(segments):
        owner = ring.owner_at((2 * i + 1) * POINT_SPACE // (2 * segments))
        if owner is None:
            return []
        if not runs or runs[-1][1] != owner:
            runs.append((i, owner))
    return runs


def shares(runs: list[tuple[int, str]], segments: int) -> dict[str, float]:
    """Each node's share of the slices in C{runs} (from L{ring_arcs}), from 0 to 1."""
    counts: dict[str, int] = {}
    for (start, node), end in zip(runs, [*(start for start, _ in runs[1:]), segments], strict=True):
        counts[node] = counts.get(node, 0) + end - start
    return {node: count / segments for node, count in sorted(counts.items())}
