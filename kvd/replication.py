"""
Replication as the gateway coordinates it: quorum writes and reads, hinted handoff, and the
repair sweep that moves keys to their owners.

A write gets a version from the gateway's hybrid logical clock and goes to all N owners of
its key; it is answered after W of them have made it durable. An owner that cannot be
reached is replaced by the next live node clockwise (a *fallback*): the write lands there,
counts toward W, and the repair sweep later hands it to the owner and drops it from the
fallback (hinted handoff, with the hint being "a key held by a node that does not own it").

A read asks R owners (falling back likewise), answers with the newest version, and writes
that version back to the owners it found stale (read repair).

The L{Repairer} compares per-range digests of every node with what it last reconciled and,
for ranges that differ, lists (key, version) on every node, pushes the newest entry to each
owner lacking it, drops keys from nodes that no longer own them once every owner has them,
and collects tombstones every owner holds once they are older than the grace period. One
mechanism serves anti-entropy, catch-up after a node returns, handoff delivery and
rebalancing after joins and leaves.

Traffic to each node is batched: while one request to a node is in flight, the items for it
queue and go together in the next.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from kvd.gateway import Cluster, NoNodes
from kvd.keys import Unavailable
from kvd.membership import NodeInfo
from kvd.store import BUCKETS, Entry
from kvd.transport import Answer, PeerError, Peers
from kvd.versions import HybridClock, milliseconds

_log = Logger()

#: Items per internal request: keeps each batch well under the internal body limit.
MAX_BATCH = 512


class QuorumFailed(Unavailable):
    """Fewer replicas than the quorum answered; says how many did."""

    def __init__(self, what: str, answered: int, needed: int, errors: list[str]) -> None:
        detail = f"; {'; '.join(errors[:3])}" if errors else ""
        super().__init__(f"{what} quorum not reached: {answered} of {needed} replicas answered{detail}")
        self.answered = answered
        self.needed = needed


@define
class NodeLink:
    """Batched internal calls to one node: one request in flight per kind, the rest queued."""

    node: NodeInfo
    peers: Peers
    _queues: dict[str, list[tuple[Any, Deferred[Any]]]] = field(factory=dict)
    _busy: set[str] = field(factory=set)

    def apply(self, key: str, value: str | None, version: str) -> Deferred[bool]:
        """Fires with whether the key was live on the node before, once durable there."""
        return self._enqueue("apply", [key, value, version])

    def read(self, key: str) -> Deferred[Entry | None]:
        return self._enqueue("read", key)

    def _enqueue(self, kind: str, item: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queues.setdefault(kind, []).append((item, d))
        if kind not in self._busy:
            self._send(kind)
        return d

    def _send(self, kind: str) -> None:
        queue = self._queues.get(kind, [])
        batch, self._queues[kind] = queue[:MAX_BATCH], queue[MAX_BATCH:]
        if not batch:
            self._busy.discard(kind)
            return
        self._busy.add(kind)
        field_name = "items" if kind == "apply" else "keys"
        body = json.dumps({field_name: [item for item, _ in batch]}, ensure_ascii=False).encode()
        call = self.peers.call("POST", f"{self.node.url}/internal/{kind}", body)
        call.addBoth(self._answered, kind, batch)

    def _answered(self, result: Answer | Any, kind: str, batch: list[tuple[Any, Deferred[Any]]]) -> None:
        try:
            if not isinstance(result, Answer):
                result.raiseException()
            body = result.json() if result.status == 200 else None
            if not isinstance(body, dict):
                raise PeerError(self.node.url, f"internal {kind} answered {result.status}")
            outcomes: list[Any]
            if kind == "apply":
                outcomes = [bool(live) for live in body["live"]]
            else:
                entries = body["entries"]
                outcomes = [tuple(entries[key]) if key in entries else None for key, _ in batch]
        except Exception as e:
            error = e if isinstance(e, PeerError) else PeerError(self.node.url, str(e))
            for _, d in batch:
                d.errback(error)
        else:
            for (_, d), outcome in zip(batch, outcomes, strict=True):
                d.callback(outcome)
        self._send(kind)


@define
class Replicator:
    """Quorum reads and writes for one gateway."""

    cluster: Cluster
    peers: Peers
    clock: HybridClock
    write_quorum: int = 2
    read_quorum: int = 2
    links: dict[str, NodeLink] = field(factory=dict)
    #: Called with (node id, key, value, version) for each background repair write.
    on_repair: Callable[[str, str, str | None, str], None] | None = None

    def link(self, node: NodeInfo) -> NodeLink:
        link = self.links.get(node.id)
        if link is None or link.node != node:
            link = self.links[node.id] = NodeLink(node, self.peers)
        return link

    def _candidates(self, key: str) -> tuple[list[str], list[str]]:
        """(owners, fallbacks in ring order) among the current members."""
        order = self.cluster.ring.preference_list(key, len(self.cluster.members))
        if not order:
            raise NoNodes()
        replicas = min(self.cluster.replicas, len(order))
        return order[:replicas], order[replicas:]

    async def write(self, key: str, value: str | None) -> tuple[str, bool]:
        """
        Write (C{value} None: delete) to W replicas; return the version and whether any
        replica that answered held the key live before.

        @raise QuorumFailed: when fewer than W replicas made it durable.
        """
        version = self.clock.next()
        owners, fallbacks = self._candidates(key)
        needed = min(self.write_quorum, self.cluster.replicas)
        acks: list[bool] = []
        errors: list[str] = []
        done: Deferred[None] = Deferred()
        pending = [0]

        def launch(node_id: str) -> None:
            pending[0] += 1
            d = self.link(self.cluster.members[node_id]).apply(key, value, version)
            d.addCallbacks(acked, failed, errbackArgs=(node_id,))

        def acked(live: bool) -> None:
            pending[0] -= 1
            acks.append(live)
            settle()

        def failed(failure: Any, node_id: str) -> None:
            pending[0] -= 1
            errors.append(f"{node_id}: {failure.getErrorMessage()}")
            if fallbacks:
                launch(fallbacks.pop(0))  # hinted handoff: the next live node holds it for now
            settle()

        launching = [True]

        def settle() -> None:
            if done.called or launching[0]:
                return
            if len(acks) >= needed or pending[0] == 0:
                done.callback(None)

        for node_id in owners:
            launch(node_id)
        launching[0] = False
        settle()
        await done
        if len(acks) < needed:
            raise QuorumFailed("write", len(acks), needed, errors)
        return version, any(acks)

    def read(self, key: str) -> Deferred[Entry | None]:
        """
        The newest entry among R replicas (None: no replica knows the key); stale replicas
        that answered are repaired in the background.

        @raise QuorumFailed: when fewer than R replicas answered.
        """
        owners, fallbacks = self._candidates(key)
        needed = min(self.read_quorum, self.cluster.replicas)
        targets = owners[:needed]
        if len(targets) < needed:
            return Deferred.fromCoroutine(self._read(key, owners, fallbacks, needed, owners + fallbacks))
        # The common case without a coroutine (this is the gateway's busiest path): ask the
        # first R owners at once; only if one fails, ask the others in turn.
        result: Deferred[Entry | None] = Deferred()
        answers: dict[str, Entry | None] = {}
        errors: list[str] = []
        pending = [len(targets)]

        def settle() -> None:
            pending[0] -= 1
            if pending[0]:
                return
            if len(answers) == needed:
                result.callback(self._newest(key, owners, answers))
            else:
                rest = [n for n in owners + fallbacks if n not in targets]
                again = self._read(key, owners, fallbacks, needed, rest, errors, answers)
                Deferred.fromCoroutine(again).chainDeferred(result)

        def answered(entry: Entry | None, node_id: str) -> None:
            answers[node_id] = entry
            settle()

        def failed(failure: Any, node_id: str) -> None:
            errors.append(f"{node_id}: {failure.getErrorMessage()}")
            settle()

        for node_id in targets:
            d = self.link(self.cluster.members[node_id]).read(key)
            d.addCallbacks(answered, failed, callbackArgs=(node_id,), errbackArgs=(node_id,))
        return result

    async def _read(
        self,
        key: str,
        owners: list[str],
        fallbacks: list[str],
        needed: int,
        candidates: list[str],
        errors: list[str] | None = None,
        answers: dict[str, Entry | None] | None = None,
    ) -> Entry | None:
        answers = {} if answers is None else answers
        errors = [] if errors is None else errors
        while len(answers) < needed and candidates:
            batch, candidates = candidates[: needed - len(answers)], candidates[needed - len(answers) :]
            results: list[tuple[bool, Any]] = await DeferredList(
                [self.link(self.cluster.members[n]).read(key) for n in batch], consumeErrors=True
            )
            for node_id, (ok, result) in zip(batch, results, strict=True):
                if ok:
                    answers[node_id] = result
                else:
                    errors.append(f"{node_id}: {result.getErrorMessage()}")
        if len(answers) < needed:
            raise QuorumFailed("read", len(answers), needed, errors)
        return self._newest(key, owners, answers)

    def _newest(self, key: str, owners: list[str], answers: dict[str, Entry | None]) -> Entry | None:
        """The newest of the answers; owners that answered with less are repaired."""
        known = [entry for entry in answers.values() if entry is not None]
        if not known:
            return None
        newest = max(known, key=lambda entry: entry[1])
        self.clock.observe(newest[1])
        for node_id, entry in answers.items():
            if node_id in owners and (entry is None or entry[1] < newest[1]):
                self._repair(node_id, key, newest)
        return newest

    def _repair(self, node_id: str, key: str, entry: Entry) -> None:
        node = self.cluster.members.get(node_id)
        if node is None:
            return
        if self.on_repair is not None:
            self.on_repair(node_id, key, entry[0], entry[1])
        self.link(node).apply(key, entry[0], entry[1]).addErrback(
            lambda f: _log.info(
                "read repair of {key!r} on {node} failed: {why}", key=key, node=node_id, why=f.getErrorMessage()
            )
        )


@define
class RepairProgress:
    """What the last sweeps did; shown in the gateway's /cluster."""

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
class Repairer:
    """
    The sweep that makes every key end on exactly its N owners with the newest version.

    Call L{sweep} periodically (a TimerService in the gateway). Each sweep handles at most
    C{ranges_per_sweep} key ranges whose digests changed, which throttles the traffic; a
    range is remembered as reconciled only when every step for it succeeded, so a sweep
    cut short by a crash or an error is simply done again.
    """

    cluster: Cluster
    peers: Peers
    now: Callable[[], float]
    tombstone_grace: float = 3600.0
    ranges_per_sweep: int = BUCKETS
    progress: RepairProgress = field(factory=RepairProgress)
    #: Seconds between full passes over every range, changed or not: they find tombstones
    #: whose grace has run out, and anything a digest collision could hide.
    full_pass_interval: float = 300.0
    _reconciled: dict[tuple[str, int], str] = field(factory=dict)
    _members: dict[str, NodeInfo] = field(factory=dict)
    _next_full_pass: float = 0.0
    _running: bool = False
    _owners: Callable[[str], list[str]] = lambda key: []

    async def sweep(self) -> None:
        if self._running:
            return
        self._running = True
        try:
            await self._sweep()
        except PeerError as e:
            if str(e) != self.progress.last_error:
                _log.warn("repair sweep incomplete: {error}", error=str(e))
            self.progress.last_error = str(e)
        except Exception:
            # Never let a bug stop the sweeps for good (a failure would end the TimerService).
            _log.failure("repair sweep failed")
            self.progress.last_error = "repair sweep failed unexpectedly; see the gateway's log"
        else:
            self.progress.last_error = None
        finally:
            self._running = False

    async def _json(self, node: NodeInfo, method: str, path: str, body: object = None) -> Any:
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        answer = await self.peers.call(method, f"{node.url}{path}", payload)
        if answer.status != 200:
            raise PeerError(node.url, f"{path} answered {answer.status}")
        return answer.json()

    async def _sweep(self) -> None:
        # One view of the cluster for the whole sweep: membership can change while it runs.
        members, ring = dict(self.cluster.members), self.cluster.ring
        if not members:
            return
        replicas = min(self.cluster.replicas, len(members))
        self._owners = lambda key: ring.preference_list(key, replicas)
        now = self.now()
        if members != self._members or now >= self._next_full_pass:
            self._reconciled.clear()  # new owners, or time for a full pass: look at every range again
            self._members = members
            self._next_full_pass = now + min(self.full_pass_interval, self.tombstone_grace / 2 or 1.0)
        self.progress.rounds += 1
        digests: dict[str, list[str]] = {}
        for node_id, node in members.items():
            digests[node_id] = (await self._json(node, "GET", "/internal/digests"))["digests"]
        stale = [b for b in range(BUCKETS) if any(self._reconciled.get((n, b)) != digests[n][b] for n in members)][
            : self.ranges_per_sweep
        ]
        if not stale:
            return
        self.progress.ranges_checked += len(stale)
        listings: dict[str, dict[str, str]] = {}
        tombstones: set[tuple[str, str]] = set()
        for node_id, node in members.items():
            answer = await self._json(node, "POST", "/internal/versions", {"buckets": stale})
            listings[node_id] = answer["versions"]
            tombstones.update((key, answer["versions"][key]) for key in answer["tombstones"])
        progress: dict[str, dict[str, Any]] = {n: {"keys_to_send": 0, "sent": 0, "dropped": 0} for n in members}
        try:
            await self._reconcile(members, listings, tombstones, progress)
        except PeerError as e:
            for report in progress.values():
                report["last_error"] = str(e)
            raise
        else:
            for node_id in members:
                for b in stale:
                    self._reconciled[(node_id, b)] = digests[node_id][b]
        finally:
            await self._report(members, progress)

    async def _report(self, members: dict[str, NodeInfo], progress: dict[str, dict[str, Any]]) -> None:
        """Tell each node what this sweep moved for it (its GET /node shows it)."""
        for node_id, report in progress.items():
            report.setdefault("last_error", None)
            try:
                await self._json(members[node_id], "POST", "/internal/progress", report)
            except PeerError:
                pass  # the sweep's own error says enough

    async def _reconcile(
        self,
        members: dict[str, NodeInfo],
        listings: dict[str, dict[str, str]],
        tombstones: set[tuple[str, str]],
        progress: dict[str, dict[str, Any]],
    ) -> None:
        keys: set[str] = set()
        for listing in listings.values():
            keys.update(listing)
        pushes: dict[str, list[str]] = {}  # target node -> keys it lacks
        sources: dict[str, str] = {}  # key -> a node holding its newest version
        newest: dict[str, str] = {}
        drops: dict[str, list[list[str]]] = {}
        collect: dict[str, list[list[str]]] = {}
        grace_ms = (self.now() - self.tombstone_grace) * 1000
        for key in keys:
            holders = {n: listing[key] for n, listing in listings.items() if key in listing}
            top = max(holders.values())
            newest[key] = top
            sources[key] = next(n for n, v in holders.items() if v == top)
            owners = self._owners(key)
            lacking = [o for o in owners if holders.get(o, "") < top]
            for owner in lacking:
                pushes.setdefault(owner, []).append(key)
            for holder, version in holders.items():
                if holder not in owners:
                    drops.setdefault(holder, []).append([key, version])
            if (
                not lacking
                and set(holders) == set(owners)
                and (key, top) in tombstones
                and milliseconds(top) < grace_ms
            ):
                # Every replica has the tombstone and it is old enough: it has done its work.
                for owner in owners:
                    collect.setdefault(owner, []).append([key, top])
        self.progress.keys_to_send = sum(len(v) for v in pushes.values())
        for wanted in pushes.values():
            for key in wanted:
                progress[sources[key]]["keys_to_send"] += 1
        failed_targets: set[str] = set()
        for target, wanted in pushes.items():
            for start in range(0, len(wanted), MAX_BATCH):
                chunk = wanted[start : start + MAX_BATCH]
                items = await self._entries(members, sources, chunk)
                try:
                    await self._json(members[target], "POST", "/internal/apply", {"items": items})
                except PeerError as e:
                    self.progress.last_error = str(e)
                    progress[target]["last_error"] = str(e)
                    failed_targets.add(target)
                    break
                self.progress.sent += len(items)
                self.progress.keys_to_send -= len(items)
                for key in chunk:
                    progress[sources[key]]["sent"] += 1
        for holder, items in drops.items():
            # Only once every owner of the key has it (no push to an owner failed).
            safe = [item for item in items if not any(o in failed_targets for o in self._owners(item[0]))]
            for start in range(0, len(safe), MAX_BATCH):
                answer = await self._json(
                    members[holder], "POST", "/internal/drop", {"items": safe[start : start + MAX_BATCH]}
                )
                self.progress.dropped += answer["dropped"]
                progress[holder]["dropped"] += answer["dropped"]
        for owner, items in collect.items():
            if owner in failed_targets:
                continue
            for start in range(0, len(items), MAX_BATCH):
                answer = await self._json(
                    members[owner], "POST", "/internal/drop", {"items": items[start : start + MAX_BATCH]}
                )
                self.progress.tombstones_collected += answer["dropped"]
        if failed_targets:
            raise PeerError(", ".join(sorted(failed_targets)), "could not take repaired keys")

    async def _entries(self, members: dict[str, NodeInfo], sources: dict[str, str], keys: list[str]) -> list[list[Any]]:
        by_source: dict[str, list[str]] = {}
        for key in keys:
            by_source.setdefault(sources[key], []).append(key)
        items: list[list[Any]] = []
        for source, wanted in by_source.items():
            entries = (await self._json(members[source], "POST", "/internal/read", {"keys": wanted}))["entries"]
            items.extend([key, *entries[key]] for key in wanted if key in entries)
        return items
