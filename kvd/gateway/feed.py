"""
The gateway's change feed (C{GET /changes}) and watches (C{GET /kv/{key}?wait=}), over every
node's write order (L{kvd.changes}).

The feed's cursor holds, for each node, its epoch and position; every member is asked for
what changed after its position, and the answers are merged (the newest version of a key
wins). A node that cannot be reached keeps its position, so it is asked again next time; a
node the cursor does not name (a new member, or one that was down when the cursor was
first made) is read from its beginning; a node that restarted has a new epoch and sends
everything again. So a write acknowledged after a cursor was handed out, which is on at
least one node, is in a later page.

Watches share one internal long poll per node: a L{_Follower} per member reads that node's
changes (keys and versions only) for as long as anybody watches, and wakes the watchers of
the keys it sees change. Idle watchers cost a Deferred and a timer each, no CPU.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kvd.changes import unchanged
from kvd.gateway.cluster import Cluster, NoNodes
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.nodes import ChangePage, Item, NodeClients
from kvd.keys import ClientError
from kvd.store import Entry

_log = Logger()

#: A node's place in its write order: (epoch, position).
Position = tuple[str, int]


def encode_cursor(positions: dict[str, Position]) -> str:
    """The opaque cursor for these node positions."""
    raw = json.dumps({node: list(at) for node, at in sorted(positions.items())}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> dict[str, Position]:
    """
    The node positions in a cursor; C{"0"} is the beginning of every node.

    @raise ClientError: when it is not a cursor this gateway hands out.
    """
    if cursor == "0":
        return {}
    try:
        found = json.loads(base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True))
    except (ValueError, binascii.Error, RecursionError):
        raise ClientError("not a cursor: pass the next of an earlier answer, or 0") from None
    if not isinstance(found, dict) or not all(
        isinstance(at, list) and len(at) == 2 and isinstance(at[0], str) and type(at[1]) is int and at[1] >= 0
        for at in found.values()
    ):
        raise ClientError("not a cursor: pass the next of an earlier answer, or 0")
    return {node: (at[0], at[1]) for node, at in found.items()}


@frozen
class FeedPage:
    """Changed keys, each once with its newest entry, in key order; and the cursor for the next page."""

    changes: list[Item]
    next: str


def _merge(pages: dict[str, ChangePage], positions: dict[str, Position | None], limit: int) -> list[Item]:
    """
    The newest entry of each key the pages hold, at most C{limit} keys: taken from the
    nodes in turn, each node's position moved on only past what was taken from it (the
    rest comes again in the next page).
    """
    newest: dict[str, Item] = {}
    taken = dict.fromkeys(pages, 0)
    # The node whose first change is the oldest goes first, so none is starved by a busy one.
    order = sorted((page.changes[0][2], node) for node, page in pages.items() if page.changes)
    going = True
    while going:
        going = False
        for _, node in order:
            page = pages[node]
            at = taken[node]
            if at == len(page.changes):
                continue
            item = page.changes[at]
            if item[0] not in newest and len(newest) >= limit:
                continue
            going = True
            taken[node] = at + 1
            known = newest.get(item[0])
            # At one version a value beats a tombstone, as reads and listings take it: the
            # tombstone a node with a fast clock made of an entry it thinks expired.
            if known is None or item[2] > known[2] or (item[2] == known[2] and known[1] is None):
                newest[item[0]] = item
    for node, page in pages.items():
        if taken[node] == len(page.changes):
            positions[node] = (page.epoch, page.next)
        elif taken[node]:
            positions[node] = (page.epoch, page.positions[taken[node] - 1])
        else:
            # Nothing of this page was taken: the node stays where it was asked from.
            positions[node] = (page.epoch, page.positions[0] - 1)
    return [newest[key] for key in sorted(newest)]


@define
class Feed:
    """The change feed over every member of the cluster."""

    cluster: Cluster
    nodes: NodeClients

    async def changes(self, cursor: str | None, prefix: str = "", limit: int = 100, wait: float = 0.0) -> FeedPage:
        """
        What changed since C{cursor} (None: from now on; "0": from the beginning), at most
        C{limit} keys; waits up to C{wait} seconds when nothing has.

        @raise ClientError: for a cursor that is not one.
        @raise NoNodes: when there are no members.
        """
        view = self.cluster.view()
        if not view.members:
            raise NoNodes()
        known = None if cursor is None else decode_cursor(cursor)
        # A member the cursor does not name is read from its beginning ("" is no epoch).
        positions: dict[str, Position | None] = {
            node: None if known is None else known.get(node, ("", 0)) for node in view.members
        }

        def ask(node: str, wait: float) -> Deferred[ChangePage]:
            return self.nodes(view.members[node]).changes(positions[node], prefix, limit, wait)

        pages: dict[str, ChangePage] = {}
        first = await DeferredList([ask(node, 0.0) for node in positions], consumeErrors=True)
        for node, (ok, page) in zip(list(positions), first, strict=True):
            if ok:
                pages[node] = page
        if wait > 0 and not any(page.changes or page.more for page in pages.values()):
            # Nothing yet: wait from where the first round ended.
            for node, page in pages.items():
                positions[node] = (page.epoch, page.next)
            pages.update(await self._first_news(list(positions), ask, wait))
        changes = _merge(pages, positions, limit)
        return FeedPage(changes, encode_cursor({n: at for n, at in positions.items() if at is not None}))

    @staticmethod
    async def _first_news(nodes: list[str], ask: Any, wait: float) -> dict[str, ChangePage]:
        """Long-poll every node at once; the first to tell of a change ends the wait for all."""
        done: Deferred[None] = Deferred()
        pending = {node: ask(node, wait) for node in nodes}
        pages: dict[str, ChangePage] = {}
        left = len(pending)

        def answered(page: ChangePage, node: str) -> None:
            pages[node] = page
            if (page.changes or page.more) and not done.called:
                done.callback(None)

        def finished(_: object) -> None:
            nonlocal left
            left -= 1
            if left == 0 and not done.called:
                done.callback(None)

        for node, d in pending.items():
            d.addCallbacks(answered, lambda _: None, callbackArgs=(node,))
            d.addBoth(finished)
        try:
            await done
        finally:
            for d in pending.values():
                if not d.called:
                    d.cancel()  # that node keeps its position: nothing of it was taken
        return pages


def _news(version: str, value: str | None, held: str) -> bool:
    """Whether a replica holding C{held} (C{value} None: a tombstone) differs from the watched C{version}."""
    return value is not None if version == "" else held > version


@define
class _Waiter:
    version: str
    #: Fires with (node id, what it holds) when a node holds a different version.
    woken: Deferred[tuple[str, Item]] = field(factory=Deferred)


@define
class _Follower:
    """One node's write order, read for the watchers (keys and versions only)."""

    node: str
    since: Position | None = None
    running: bool = False
    ready: bool = False
    readies: list[Deferred[None]] = field(factory=list)

    def set_ready(self) -> None:
        self.ready = True
        readies, self.readies = self.readies, []
        for d in readies:
            if not d.called:
                d.callback(None)


@define
class Watches:
    """Watchers of single keys, woken by one shared long poll per node."""

    cluster: Cluster
    coordinator: Coordinator
    clock: IReactorTime
    #: How long each internal long poll is held by the node.
    poll_seconds: float = 30.0
    #: How long to wait before asking a node that failed again.
    retry_seconds: float = 1.0
    _waiters: dict[str, list[_Waiter]] = field(factory=dict)
    _followers: dict[str, _Follower] = field(factory=dict)
    watching: int = 0

    async def watch(self, key: str, version: str, wait: float) -> Entry | None:
        """
        The key's entry once some replica holds a version other than C{version} ("":
        absent), or its current one (a quorum read) after C{wait} seconds.
        """
        waiter = _Waiter(version)
        self._waiters.setdefault(key, []).append(waiter)
        self.watching += 1
        try:
            # Follow every node first, then read: a write after the read is seen by a follower.
            await self._followed()
            entry = await self.coordinator.read(key)
            if not unchanged(entry, version) or wait <= 0:
                return entry
            waiter.woken.addTimeout(wait, self.clock)
            try:
                node, (_, value, held) = await waiter.woken
            except TimeoutError:
                return await self.coordinator.read(key)
            if value is None:
                return (None, held)
            try:
                found: Entry | None = await self.coordinator.nodes(self.cluster.view().members[node]).read_key(key)
            except (CancelledError, KeyError):
                raise
            except Exception:
                found = None
            return found if found is not None else await self.coordinator.read(key)
        finally:
            self.watching -= 1
            waiting = self._waiters.get(key, [])
            if waiter in waiting:
                waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(key, None)

    async def _followed(self) -> None:
        """Once every member is followed (or has failed to answer once)."""
        waits = []
        for node in self.cluster.view().members:
            follower = self._followers.get(node)
            if follower is None:
                follower = self._followers[node] = _Follower(node)
            if not follower.running:
                follower.running = True
                Deferred.fromCoroutine(self._follow(follower))
            if not follower.ready:
                d: Deferred[None] = Deferred()
                follower.readies.append(d)
                waits.append(d)
        for d in waits:
            await d

    async def _follow(self, follower: _Follower) -> None:
        try:
            while self.watching:
                node = self.cluster.view().members.get(follower.node)
                if node is None:
                    break
                quick = follower.since is None
                try:
                    page = await self.coordinator.nodes(node).changes(
                        follower.since, "", 1000, 0.0 if quick else self.poll_seconds, values=False
                    )
                except Exception as e:
                    _log.debug("following {node}'s changes failed: {why}", node=follower.node, why=str(e))
                    follower.set_ready()
                    await deferLater(self.clock, self.retry_seconds, lambda: None)
                    continue
                if follower.since is not None and page.epoch != follower.since[0]:
                    # The node restarted: start again from its now (its other replicas tell of
                    # what it took meanwhile), rather than reading it all.
                    follower.since = None
                    continue
                follower.since = (page.epoch, page.next)
                follower.set_ready()
                self._wake(follower.node, page.changes)
        except Exception:
            _log.failure("following {node}'s changes stopped", node=follower.node)
        finally:
            follower.running = False
            follower.ready = False
            follower.since = None
            follower.set_ready()
            follower.ready = False

    def _wake(self, node: str, changes: list[Item]) -> None:
        for item in changes:
            for waiter in self._waiters.get(item[0], ()):
                if not waiter.woken.called and _news(waiter.version, item[1], item[2]):
                    waiter.woken.callback((node, item))
