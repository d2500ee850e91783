"""
Cluster membership as nodes and gateways take part in it.

A node's L{Heartbeat} registers it with the registry at start, renews every TTL/3 (each
renewal is a full registration, so a registry that restarted and forgot the node simply
learns it again), retries an unreachable registry with backoff while the node keeps serving,
and leaves when the node stops. A gateway's L{Watcher} follows the registry by long poll and
keeps the last membership it saw while the registry is down.

Each outage is logged once when it starts and once when it ends, not once per retry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.registry_client import RegistryClient
from kvd.transport import PeerError

_log = Logger()

MAX_BACKOFF = 10.0
#: A node's longest wait between tries before the registry has told it its TTL.
FIRST_CONTACT_BACKOFF = 3.0
#: How long a gateway waits in one long poll before asking again.
LONG_POLL_SECONDS = 30.0
#: How long a gateway keeps the members it knew when the registry restarts: longer than the
#: default TTL, so every live node has re-registered by then.
CARRY_SECONDS = 15.0


@frozen
class NodeInfo:
    """A member as gateways see it."""

    id: str
    url: str
    weight: int = 1
    #: "down" when the registry says the node's lease expired (it stays a member).
    status: str = "up"

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "url": self.url, "weight": self.weight}


def parse_members(listing: list[dict[str, Any]]) -> dict[str, NodeInfo]:
    """The registry's C{nodes} list as a dict; entries that are not well-formed are skipped."""
    members = {}
    for entry in listing:
        if not isinstance(entry, dict):
            continue
        node_id, url, weight = entry.get("id"), entry.get("url"), entry.get("weight", 1)
        if isinstance(node_id, str) and isinstance(url, str) and isinstance(weight, int) and weight >= 1:
            members[node_id] = NodeInfo(node_id, url.rstrip("/"), weight)
    return members


@define
class _Backoff:
    delay: float = 0.0

    def next(self) -> float:
        self.delay = min(MAX_BACKOFF, self.delay * 2 if self.delay else 0.5)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


def _unexpected(failure: Failure, what: str, backoff: _Backoff) -> float:
    """Keep a periodic task alive through a bug: log it and try again later."""
    if not failure.check(CancelledError):
        _log.failure("{what} failed unexpectedly; retrying", failure, what=what)
    return backoff.next()


@define
class Heartbeat:
    """Keeps one node registered."""

    registry: RegistryClient
    node_id: str
    url: str
    incarnation: int
    clock: IReactorTime
    weight: int = 1
    ttl: float | None = None
    _backoff: _Backoff = field(factory=_Backoff)
    _outage: str | None = None
    _pending: IDelayedCall | None = None
    _running: Deferred[Any] | None = None
    _stopped: bool = False

    def start(self) -> None:
        self._stopped = False
        self._beat()

    def _beat(self) -> None:
        self._pending = None
        d = self._running = Deferred.fromCoroutine(self.beat_once())
        d.addErrback(_unexpected, "heartbeat", self._backoff).addCallback(self._schedule)

    def _schedule(self, delay: float) -> None:
        self._running = None
        if not self._stopped:
            self._pending = self.clock.callLater(delay, self._beat)

    async def beat_once(self) -> float:
        """Register or renew once; return the seconds until the next beat."""
        try:
            status, body = await self.registry.register(self.node_id, self.url, self.weight, self.incarnation)
        except PeerError as e:
            return self._failed(e.reason)
        if status == 200 and isinstance(body, dict) and isinstance(body.get("ttl"), (int, float)):
            if self._outage is not None:
                _log.info(
                    "registry {registry} reachable again; {node_id} registered",
                    registry=self.registry.base_url,
                    node_id=self.node_id,
                )
            elif self.ttl is None:
                _log.info(
                    "registered {node_id} as {url} with {registry}",
                    node_id=self.node_id,
                    url=self.url,
                    registry=self.registry.base_url,
                )
            self._outage = None
            self._backoff.reset()
            self.ttl = float(body["ttl"])
            return self.ttl / 3
        error = body.get("error") if isinstance(body, dict) else None
        return self._failed(f"registration refused with {status}: {error or 'no reason given'}")

    def _failed(self, reason: str) -> float:
        if self._outage is None:
            _log.warn(
                "cannot register {node_id} with {registry}: {reason}; retrying with backoff, serving meanwhile",
                node_id=self.node_id,
                registry=self.registry.base_url,
                reason=reason,
            )
        self._outage = reason
        # Never wait longer than a renewal period, so the node is back within one TTL of
        # the registry's return (before the first answer, within the default TTL's third).
        return min(self._backoff.next(), self.ttl / 3 if self.ttl else FIRST_CONTACT_BACKOFF)

    async def stop(self) -> None:
        """Stop renewing and leave the registry (best effort: it forgets us after the TTL anyway)."""
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self.ttl is None:
            return
        try:
            await self.registry.leave(self.node_id, self.incarnation)
        except PeerError as e:
            _log.warn("could not leave {registry}: {reason}", registry=self.registry.base_url, reason=e.reason)
        else:
            _log.info("{node_id} left {registry}", node_id=self.node_id, registry=self.registry.base_url)


@define
class Watcher:
    """
    Follows the registry's membership for a gateway.

    C{on_change} is called with the new membership whenever it changes. While the registry
    cannot be reached, nothing is called: the gateway serves from what it last saw. When the
    registry comes back restarted (a new epoch, or a lower index) and is relearning its
    members, the previous members are kept alongside the new listing for L{CARRY_SECONDS},
    so requests keep flowing while nodes re-register.
    """

    registry: RegistryClient
    clock: IReactorTime
    on_change: Callable[[dict[str, NodeInfo]], None]
    wait: float = LONG_POLL_SECONDS
    members: dict[str, NodeInfo] = field(factory=dict)
    index: int | None = None
    #: Changes when the registry restarts, even if its index comes back the same.
    epoch: str | None = None
    _backoff: _Backoff = field(factory=_Backoff)
    _outage: str | None = None
    _carry: dict[str, NodeInfo] = field(factory=dict)
    _carry_until: float = 0.0
    _pending: IDelayedCall | None = None
    _running: Deferred[Any] | None = None
    _stopped: bool = False

    def start(self) -> None:
        self._stopped = False
        self._poll()

    def stop(self) -> None:
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self._running is not None:
            self._running.cancel()

    def _poll(self) -> None:
        self._pending = None
        d = self._running = Deferred.fromCoroutine(self.poll_once())
        d.addErrback(_unexpected, "registry watch", self._backoff).addCallback(self._schedule)

    def _schedule(self, delay: float) -> None:
        self._running = None
        if not self._stopped:
            self._pending = self.clock.callLater(delay, self._poll)

    async def poll_once(self) -> float:
        """Ask the registry once (a long poll once an index is known); return the delay before the next ask."""
        # While carrying old members, and once more when that ends, ask without waiting.
        try:
            if self.index is None or self._carry:
                index, listing, epoch = await self.registry.nodes()
            else:
                index, listing, epoch = await self.registry.nodes(self.index, self.wait)
        except PeerError as e:
            if self._outage is None:
                _log.warn(
                    "registry {registry} unreachable: {reason}; serving from the last membership ({count} nodes)",
                    registry=self.registry.base_url,
                    reason=e.reason,
                    count=len(self.members),
                )
            self._outage = e.reason
            return self._backoff.next()
        if self._outage is not None:
            _log.info("registry {registry} reachable again", registry=self.registry.base_url)
        self._outage = None
        self._backoff.reset()
        now = self.clock.seconds()
        restarted = self.epoch is not None and epoch != self.epoch
        if self.index is not None and (restarted or index < self.index):
            _log.info(
                "registry {registry} restarted; keeping the last members while nodes re-register",
                registry=self.registry.base_url,
            )
            self._carry = dict(self.members)
            self._carry_until = now + CARRY_SECONDS
        self.index, self.epoch = index, epoch
        members = parse_members(listing)
        delay = 0.0
        if now < self._carry_until:
            members = {**self._carry, **members}
            delay = min(1.0, self._carry_until - now)
        else:
            self._carry = {}
        if members != self.members:
            self.members = members
            self.on_change(members)
        return delay
