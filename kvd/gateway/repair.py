"""
The repair sweep: every key ends on exactly its N owners with the newest version.

The L{Repairer} compares per-range digests of every node with what it last reconciled and,
for ranges that differ, lists (key, version) on every node, pushes the newest entry to each
owner lacking it, drops keys from nodes that no longer own them once every owner has them,
and collects tombstones every owner holds once they are older than the grace period. One
mechanism serves anti-entropy, catch-up after a node returns, handoff delivery and
rebalancing after joins and leaves.

A member the registry reports down is left out of a sweep: nothing is pushed to it or asked of
it, and no key it owns is dropped from another node (its fallbacks keep the hinted copies until
it is back and has them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from attrs import define, field
from twisted.logger import Logger

from kvd.gateway.cluster import Cluster, ClusterView
from kvd.gateway.nodes import Item, NodeClient, NodeClients, split
from kvd.internal import RepairReport
from kvd.store import BUCKETS
from kvd.transport import PeerError
from kvd.ttl import MARK, expired
from kvd.versions import milliseconds

_log = Logger()

T = TypeVar("T")

#: Key ranges listed and reconciled together within a sweep: a sweep holds every node's
#: (key, version) listing of this many ranges at a time, not of all it found changed, so
#: while a node's keys change (an import, a write-heavy load: every range's digest moves
#: between sweeps) the gateway's memory is 1/32 of a listing of every key, not all of it.
RANGES_PER_STEP = 8


@define
class RepairProgress:
    """What the sweeps did so far; shown in the gateway's /cluster and /metrics."""

    rounds: int = 0
    ranges_checked: int = 0
    keys_to_send: int = 0
    sent: int = 0
    dropped: int = 0
    tombstones_collected: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "rounds": self.rounds,
            "ranges_checked": self.ranges_checked,
            "keys_to_send": self.keys_to_send,
            "sent": self.sent,
            "dropped": self.dropped,
            "tombstones_collected": self.tombstones_collected,
            "last_error": self.last_error,
        }


@define
class _Tally:
    """What one sweep moved for one node, as it goes."""

    keys_to_send: int = 0
    sent: int = 0
    dropped: int = 0
    last_error: str | None = None

    def report(self) -> RepairReport:
        return RepairReport(self.keys_to_send, self.sent, self.dropped, self.last_error)


def _chunks(items: list[T]) -> list[list[T]]:
    return split(items, lambda item: 0)


@define
class Repairer:
    """
    Call L{sweep} periodically (a TimerService in the gateway). Each sweep handles at most
    C{ranges_per_sweep} key ranges whose digests changed, which throttles the traffic,
    C{ranges_per_step} at a time, which bounds the memory; a range is remembered as
    reconciled only when every step for it succeeded, so a sweep cut short by a crash or
    an error is simply done again.
    """

    cluster: Cluster
    nodes: NodeClients
    now: Callable[[], float]
    tombstone_grace: float = 3600.0
    ranges_per_sweep: int = BUCKETS
    ranges_per_step: int = RANGES_PER_STEP
    progress: RepairProgress = field(factory=RepairProgress)
    #: Seconds between full passes over every range, changed or not: they find tombstones
    #: whose grace has run out, and anything a digest collision could hide.
    full_pass_interval: float = 300.0
    _reconciled: dict[tuple[str, int], str] = field(factory=dict)
    _members: object = None
    _next_full_pass: float = 0.0
    _running: bool = False

    async def sweep(self) -> None:
        """One sweep; never fails (a failure would end the TimerService that calls it)."""
        if self._running:
            return
        self._running = True
        try:
            await self._sweep(self.cluster.view())
        except PeerError as e:
            if str(e) != self.progress.last_error:
                _log.warn("repair sweep incomplete: {error}", error=str(e))
            self.progress.last_error = str(e)
        except Exception:
            _log.failure("repair sweep failed")
            self.progress.last_error = "repair sweep failed unexpectedly; see the gateway's log"
        else:
            self.progress.last_error = None
        finally:
            self._running = False

    async def _sweep(self, view: ClusterView) -> None:
        # One view of the cluster for the whole sweep: membership can change while it runs.
        if not view.members:
            return
        clients = {node_id: self.nodes(node) for node_id, node in view.members.items() if node_id not in view.down}
        if not clients:
            return
        now = self.now()
        if view.members != self._members or now >= self._next_full_pass:
            self._reconciled.clear()  # new owners, or time for a full pass: look at every range again
            self._members = view.members
            self._next_full_pass = now + min(self.full_pass_interval, self.tombstone_grace / 2 or 1.0)
        self.progress.rounds += 1
        digests = {node_id: await client.digests() for node_id, client in clients.items()}
        if any(len(d) != BUCKETS for d in digests.values()):
            bad = next(node_id for node_id, d in digests.items() if len(d) != BUCKETS)
            raise PeerError(view.members[bad].url, f"internal digests has not {BUCKETS} ranges")
        stale = [b for b in range(BUCKETS) if any(self._reconciled.get((n, b)) != digests[n][b] for n in clients)]
        stale = stale[: self.ranges_per_sweep]
        if not stale:
            return
        self.progress.ranges_checked += len(stale)
        self.progress.keys_to_send = 0
        tallies = {node_id: _Tally() for node_id in clients}
        try:
            for first in range(0, len(stale), self.ranges_per_step):
                step = stale[first : first + self.ranges_per_step]
                listings, tombstones = await self._listings(clients, step)
                try:
                    await self._reconcile(view, clients, listings, tombstones, tallies)
                except PeerError as e:
                    for tally in tallies.values():
                        tally.last_error = str(e)
                    raise
                del listings, tombstones
                for node_id in clients:
                    for b in step:
                        self._reconciled[(node_id, b)] = digests[node_id][b]
        finally:
            for node_id, tally in tallies.items():
                try:
                    await clients[node_id].report(tally.report())
                except PeerError:
                    pass  # the sweep's own error says enough

    async def _listings(
        self, clients: dict[str, NodeClient], buckets: list[int]
    ) -> tuple[dict[str, dict[str, str]], dict[tuple[str, str], set[str]]]:
        """
        Every node's key -> version in the given ranges, and the (key, version) pairs that are
        tombstones, each with the nodes that say so.
        """
        listings: dict[str, dict[str, str]] = {}
        tombstones: dict[tuple[str, str], set[str]] = {}
        for node_id, client in clients.items():
            versions, dead = await client.versions(buckets)
            listings[node_id] = versions
            for key in dead:
                tombstones.setdefault((key, versions[key]), set()).add(node_id)
        return listings, tombstones

    async def _reconcile(
        self,
        view: ClusterView,
        clients: dict[str, NodeClient],
        listings: dict[str, dict[str, str]],
        tombstones: dict[tuple[str, str], set[str]],
        tallies: dict[str, _Tally],
    ) -> None:
        keys: set[str] = set()
        for listing in listings.values():
            keys.update(listing)
        pushes: dict[str, list[str]] = {}  # target node -> keys it lacks
        sources: dict[str, str] = {}  # key -> a node holding its newest version
        drops: dict[str, list[tuple[str, str]]] = {}
        collect: dict[str, list[tuple[str, str]]] = {}
        now = self.now()
        grace_ms = (now - self.tombstone_grace) * 1000
        for key in keys:
            holders = {n: listing[key] for n, listing in listings.items() if key in listing}
            top = max(holders.values())
            # A node whose clock runs ahead reports an entry of an expiring version dead before
            # its time (a tombstone of that same version): the value comes from one that holds it.
            dead = tombstones.get((key, top), set())
            newest = [n for n, v in holders.items() if v == top]
            sources[key] = next((n for n in newest if n not in dead), newest[0])
            owners = view.owners(key)
            lacking = [o for o in owners if o not in view.down and holders.get(o, "") < top]
            for owner in lacking:
                pushes.setdefault(owner, []).append(key)
            for holder, version in holders.items():
                if holder not in owners:
                    drops.setdefault(holder, []).append((key, version))
            if (
                not lacking
                and set(holders) == set(owners)
                and dead
                and milliseconds(top) < grace_ms
                # An expiring version is gone once this gateway's clock says so, as reads judge
                # it, not because one node's clock did: collecting it would drop the live copies.
                and (MARK not in top or expired(top, now))
            ):
                # Every replica has the tombstone and it is old enough: it has done its work.
                for owner in owners:
                    collect.setdefault(owner, []).append((key, top))
        self.progress.keys_to_send += sum(len(v) for v in pushes.values())
        for wanted in pushes.values():
            for key in wanted:
                tallies[sources[key]].keys_to_send += 1
        failed_targets: set[str] = set()
        for target, wanted in pushes.items():
            for chunk in _chunks(wanted):
                items = await self._entries(clients, sources, chunk)
                try:
                    await clients[target].apply(items)
                except PeerError as e:
                    self.progress.last_error = tallies[target].last_error = str(e)
                    failed_targets.add(target)
                    break
                self.progress.sent += len(items)
                self.progress.keys_to_send -= len(items)
                for key in chunk:
                    tallies[sources[key]].sent += 1
        unsure = failed_targets | view.down
        for holder, held in drops.items():
            # Only once every owner of the key has it (no push to an owner failed, no owner is down).
            safe = [item for item in held if not unsure.intersection(view.owners(item[0]))]
            for part in _chunks(safe):
                dropped = await clients[holder].drop(part)
                self.progress.dropped += dropped
                tallies[holder].dropped += dropped
        for owner, collected in collect.items():
            if owner in failed_targets:
                continue
            for part in _chunks(collected):
                self.progress.tombstones_collected += await clients[owner].drop(part)
        if failed_targets:
            raise PeerError(", ".join(sorted(failed_targets)), "could not take repaired keys")

    async def _entries(self, clients: dict[str, NodeClient], sources: dict[str, str], keys: list[str]) -> list[Item]:
        by_source: dict[str, list[str]] = {}
        for key in keys:
            by_source.setdefault(sources[key], []).append(key)
        items: list[Item] = []
        for source, wanted in by_source.items():
            entries = await clients[source].read(wanted)
            items.extend((key, *entries[key]) for key in wanted if key in entries)
        return items
