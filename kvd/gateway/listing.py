"""
Listing keys across the cluster (C{GET /kv?prefix=&after=&limit=}), one page at a time.

Each node keeps its keys sorted (L{kvd.store.Store.listing}) and answers its next C{limit}
keys under the prefix after C{after}, tombstones and expired entries included, at a cost of
O(log n + limit) whatever it holds. The gateway asks every member at once; with N replicas,
as long as fewer than N are unreachable every key has a replica among those that answer,
so the page is complete. (N or more unreachable: 503, rather than a page silently missing
keys.)

Merging: a node that stopped at its bound (C{more}) has said nothing about the keys after
its last one, so the page covers only the keys up to the smallest such last key. Within
that, each key's newest version wins across the answers; tombstones and expired entries
are dropped; the first C{limit} live keys make the page. C{next} is the last key the page
covered, or None once every node said it had nothing more. A page can therefore be short,
or even empty with a C{next}, when the nodes' answers were mostly tombstones: each page's
work stays bounded and the client just continues from C{next}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, frozen
from twisted.internet.defer import Deferred, DeferredList

from kvd.gateway.cluster import Cluster, NoNodes
from kvd.gateway.nodes import NodeClients
from kvd.keys import Unavailable
from kvd.store import Listed
from kvd.ttl import expired


@frozen
class Page:
    """One page of a listing: (key, value, version) of its live keys, and where the next starts."""

    items: list[tuple[str, str, str]]
    next: str | None


def merge(answers: list[Listed], limit: int, now: float) -> Page:
    """One page out of the nodes' answers (see the module docstring)."""
    bounds = [answer.entries[-1][0] for answer in answers if answer.more and answer.entries]
    bound = min(bounds) if bounds else None
    newest: dict[str, tuple[str | None, str]] = {}
    for answer in answers:
        for key, value, version in answer.entries:
            if bound is not None and key > bound:
                break
            held = newest.get(key)
            # At one version, a value beats the tombstone a node made of it when it expired by
            # that node's clock: this gateway's clock judges expiry (below), whichever answered.
            if held is None or version > held[1] or (version == held[1] and held[0] is None):
                newest[key] = (value, version)
    items: list[tuple[str, str, str]] = []
    for key in sorted(newest):
        value, version = newest[key]
        if value is None or expired(version, now):
            continue
        if len(items) == limit:
            return Page(items, items[-1][0])
        items.append((key, value, version))
    return Page(items, bound)


@define
class Lister:
    """Pages of the cluster's keys in byte order."""

    cluster: Cluster
    nodes: NodeClients
    now: Callable[[], float]

    def page(self, prefix: str, after: str | None, limit: int, values: bool) -> Deferred[Page]:
        """
        @raise Unavailable: when as many members as there are replicas could not answer
            (some keys may have no replica among those that did).
        @raise NoNodes: when there are no members.
        """
        view = self.cluster.view()
        if not view.members:
            raise NoNodes()
        asked = [self.nodes(node).listing(prefix, after, limit, values) for node in view.members.values()]

        def merged(results: list[tuple[bool, Any]]) -> Page:
            answers = [answer for ok, answer in results if ok and isinstance(answer, Listed)]
            failed = len(results) - len(answers)
            if failed >= view.replicas or not answers:
                raise Unavailable(f"listing needs all but {view.replicas - 1} nodes; {failed} did not answer")
            return merge(answers, limit, self.now())

        return DeferredList(asked, consumeErrors=True).addCallback(merged)
