"""
Quorum writes and reads, as a gateway coordinates them.

A write gets a version from the gateway's hybrid logical clock and goes to all N owners of
its key; it is answered after W of them have made it durable. An owner that cannot be
reached is replaced by the next member clockwise (a I{fallback}): the write lands there,
counts toward W, and the repair sweep later hands it to the owner and drops it from the
fallback (hinted handoff, the hint being "a key held by a node that does not own it").

A read asks R replicas (falling back likewise), answers with the newest version, and writes
that version back to the owners it found stale (read repair). A read also hedges: when the
replicas it asked have not all answered after their usual worst latency, it asks the next
candidate too, and answers with the first R.

Members the gateway's failure detector judges unreachable (or the registry has down) are
not asked at all: their place goes to the next reachable members clockwise, and when too
few are left the answer is a 503 at once, without waiting on anyone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.gateway.cluster import Cluster, ClusterView, Route
from kvd.gateway.nodes import NodeClients, Written
from kvd.gateway.quorum import Gathered, Hedges, Receipt, Reply, gather, gather_to
from kvd.store import Entry
from kvd.transport import PeerTimeout
from kvd.ttl import with_expiry
from kvd.versions import HybridClock

_log = Logger()

#: How often a write goes again with a newer version before it gives up on a replica that
#: keeps holding newer ones (each round moves the clock past what the replicas hold).
MAX_WRITE_ROUNDS = 3


class _Written(NamedTuple):
    version: str
    live: bool


class WriteOutcome(_Written):
    """
    What a quorum write did: its version and whether the key was live before (a pair, as
    callers unpack it), and its receipt.
    """

    receipt: Receipt

    def __new__(cls, version: str, live: bool, receipt: Receipt) -> WriteOutcome:
        outcome = super().__new__(cls, version, live)
        outcome.receipt = receipt
        return outcome


class _Write:
    """
    One quorum write's rounds (see L{Coordinator.write}), its outcome given to C{reply}. A
    class, not closures: a nested function that calls itself again (the next round) holds its
    own closure cell, a reference cycle that made every PUT leave about 20 objects for the
    cyclic collector, which then ran some 30 times a second under load for 0.8-2.4 ms each,
    holding up every request in flight.
    """

    __slots__ = (
        "coordinator",
        "key",
        "value",
        "view",
        "route",
        "needed",
        "expires",
        "live",
        "timed_out",
        "reply",
        "version",
        "rounds",
    )

    def __init__(
        self,
        coordinator: Coordinator,
        key: str,
        value: str | None,
        view: ClusterView,
        route: Route,
        needed: int,
        expires: float | None,
        reply: Reply[WriteOutcome],
    ) -> None:
        self.coordinator = coordinator
        self.key, self.value, self.view, self.route = key, value, view, route
        self.needed, self.expires, self.reply = needed, expires, reply
        self.live: list[bool] = []
        self.timed_out: list[str] = []
        self.version = ""
        self.rounds = 0

    def failed(self, node_id: str, failure: Any) -> None:
        if failure.check(PeerTimeout):
            self.timed_out.append(node_id)  # it may have taken the write all the same

    def tell(self, node_id: str, reply: Reply[Written]) -> None:
        self.coordinator.nodes(self.view.members[node_id]).apply_key_to(reply, self.key, self.value, self.version)

    def taken(self, written: Written) -> bool:
        return written.held == self.version

    def attempt(self) -> None:
        coordinator, route = self.coordinator, self.route
        version = coordinator.clock.next()
        if self.expires is not None:
            version = with_expiry(version, self.expires)
        self.version = version
        self.rounds += 1
        # Nobody skipped (the usual route): no errors to name and no fallback standing in.
        skipped = bool(route.skipped)
        gather_to(
            self.answer,
            self.tell,
            route.targets,
            route.spares,
            self.needed,
            self.taken,
            errors=coordinator._skipped(route) if skipped else (),
            standing_in=route.hints() if skipped else None,
            usable=coordinator._usable(self.view),
            on_failure=self.failed,
        )

    def answer(self, gathered: Gathered[Written]) -> None:
        # Called by a node's answer being delivered: what goes wrong goes to the reply.
        try:
            outcome = self._outcome(gathered)
        except Exception:
            self.reply.errback(Failure())
            return
        if outcome is not None:
            self.reply.callback(outcome)

    def _outcome(self, gathered: Gathered[Written]) -> WriteOutcome | None:
        """The write's outcome; None when it goes again (a newer round answers then)."""
        live, newer, version = self.live, [], self.version
        for written in gathered.answers.values():
            live.append(written.live)
            if written.held > version:
                newer.append(written.held)
        if newer and self.rounds < MAX_WRITE_ROUNDS:
            self.coordinator.clock.observe(max(newer))
            _log.info(
                "a replica of {key!r} holds a version newer than this gateway's clock; writing again",
                key=self.key,
            )
            self.attempt()
            return None
        standing_in = gathered.standing_in
        if standing_in:
            for owner in self.route.owners:  # an owner asked as a spare holds the write for itself
                standing_in.pop(owner, None)
        receipt = gathered.receipt(uncertain=bool(self.timed_out))
        gathered.require("write", self.needed, receipt)
        return WriteOutcome(version, any(live), receipt)


@define
class Coordinator:
    """Quorum reads and writes for one gateway."""

    cluster: Cluster
    nodes: NodeClients
    clock: HybridClock
    write_quorum: int = 2
    read_quorum: int = 2
    #: The reads' hedges, one timer for all (made on the failure detector's clock).
    _hedges: Hedges | None = field(default=None, init=False)

    def write(self, key: str, value: str | None, ttl: float | None = None) -> Deferred[WriteOutcome]:
        """
        Write (C{value} None: delete) to W replicas; fires with the version, whether any
        replica that answered held the key live before, and which replicas took it. With
        C{ttl}, the version carries the expiry C{ttl} seconds from now (L{kvd.ttl}).

        A replica that already holds a newer version than this write's (minted by a
        coordinator whose clock runs ahead) says so; the clock then moves past it and the
        write goes again with a newer version, so a write acknowledged after another always
        wins over it, whatever the clocks say.

        @raise QuorumFailed: when fewer than W replicas made it durable.
        @raise NoNodes: when there are no members.
        """
        d: Deferred[WriteOutcome] = Deferred()
        self.write_to(d, key, value, ttl)
        return d

    def write_to(self, reply: Reply[WriteOutcome], key: str, value: str | None, ttl: float | None = None) -> None:
        """
        L{write}, its outcome (or failure) given to C{reply} rather than to a Deferred: for a
        caller that answers in plain callbacks (the PUT handler). C{reply} is told once, maybe
        before this returns; what the routing raises (L{NoNodes}) is raised here.
        """
        view = self.cluster.view()
        route = view.route(key, self.nodes.health.judged_unreachable)
        needed = min(self.write_quorum, view.replicas)
        expires = None if ttl is None else self.clock.now() + ttl
        _Write(self, key, value, view, route, needed, expires, reply).attempt()

    def write_version(
        self, key: str, value: str | None, version: str, asked: list[Deferred[None]] | None = None
    ) -> Deferred[bool]:
        """
        Write with a version given (an import, L{kvd.gateway.export}) instead of one from the
        clock, to W replicas, in one round: a replica keeps the newer of what it holds and
        this, so writing the same entry twice, or under newer data, changes nothing newer.
        Fires with True when the W replicas hold this very version, False when one that
        answered holds a newer one (the entry is superseded). The clock moves past the
        version, so the gateway's later writes order after it. Every replica call made is
        added to C{asked} when given: a caller bounding its writes in flight waits for those
        too, or a replica slower than the quorum would see its queue grow without bound.

        @raise QuorumFailed: when fewer than W replicas made it (or something newer) durable.
        @raise NoNodes: when there are no members.
        """
        view = self.cluster.view()
        route = view.route(key, self.nodes.health.judged_unreachable)
        needed = min(self.write_quorum, view.replicas)
        self.clock.observe(version)

        def ask(node_id: str) -> Deferred[Written]:
            d = self.nodes(view.members[node_id]).apply_key(key, value, version)
            if asked is not None:
                settled: Deferred[None] = Deferred()

                def answered(result: Any) -> Any:
                    settled.callback(None)
                    return result

                d.addBoth(answered)
                asked.append(settled)
            return d

        def taken(written: Written) -> bool:
            return written.held >= version

        def answer(gathered: Gathered[Written]) -> bool:
            gathered.require("write", needed)
            return all(w.held == version for w in gathered.answers.values())

        skipped = self._skipped(route)
        d = gather(ask, route.targets, route.spares, needed, taken, errors=skipped, usable=self._usable(view))
        return d.addCallback(answer)

    def read(self, key: str) -> Deferred[Entry | None]:
        """
        The newest entry among R replicas (None: no replica knows the key); stale owners
        that answered are repaired in the background.

        @raise QuorumFailed: when fewer than R replicas answered.
        @raise NoNodes: when there are no members.
        """
        d: Deferred[Entry | None] = Deferred()
        self.read_to(d, key)
        return d

    def read_to(self, reply: Reply[Entry | None], key: str) -> None:
        """
        L{read}, its entry (or failure) given to C{reply} rather than to a Deferred (the GET
        handler's way). C{reply} is told once, maybe before this returns; what the routing
        raises (L{NoNodes}) is raised here.
        """
        view = self.cluster.view()
        route = view.route(key, self.nodes.health.judged_unreachable)
        owners = route.owners
        needed = min(self.read_quorum, view.replicas)
        candidates = route.targets + route.spares

        def tell(node_id: str, reply: Reply[Entry | None]) -> None:
            self.nodes(view.members[node_id]).read_key_to(reply, key)

        def newest_of(gathered: Gathered[Entry | None]) -> Entry | None:
            answers = gathered.require("read", needed).answers
            # At one version, a value beats the tombstone a replica made of it when it expired by
            # that replica's clock (a fast one): expiry is judged once, by this gateway's clock,
            # whichever replicas answered, so reads do not flap between 200 and 404. (max() by
            # that rank, the first of equals kept, in one pass without a key function.)
            newest: Entry | None = None
            rank: tuple[str, bool] = ("", False)
            for entry in answers.values():
                if entry is not None:
                    ranked = (entry[1], entry[0] is not None)
                    if newest is None or ranked > rank:
                        newest, rank = entry, ranked
            if newest is None:
                return None
            self.clock.observe(newest[1])
            for node_id, entry in answers.items():
                if node_id in owners and (entry is None or entry[1] < newest[1]):
                    self._repair(view.members[node_id], key, newest)
            return newest

        def answer(gathered: Gathered[Entry | None]) -> None:
            # Called by a node's answer being delivered: what goes wrong goes to the reply.
            try:
                newest = newest_of(gathered)
            except Exception:
                reply.errback(Failure())
                return
            reply.callback(newest)

        first = candidates[:needed]
        health = self.nodes.health
        hedges = self._hedges
        if hedges is None or hedges.clock is not health.clock:
            hedges = self._hedges = Hedges(health.clock)
        hedge = (hedges, health.hedge_delay(first))
        gather_to(
            answer,
            tell,
            first,
            candidates[needed:],
            needed,
            hedge=hedge,
            errors=self._skipped(route),
            usable=self._usable(view),
        )

    def _usable(self, view: ClusterView) -> Callable[[str], bool]:
        """Whether quorum traffic may go to a member now (a request outlives its routing)."""
        reachable = self.nodes.health.reachable
        return lambda node_id: view.usable(node_id, reachable)

    @staticmethod
    def _skipped(route: Route) -> list[str]:
        if not route.skipped:
            return []
        return [f"{node_id}: unreachable from this gateway" for node_id in route.skipped if node_id in route.owners]

    def _repair(self, node: Any, key: str, entry: Entry) -> None:
        def failed(failure: Any) -> None:
            _log.info(
                "read repair of {key!r} on {node} failed: {why}", key=key, node=node.id, why=failure.getErrorMessage()
            )

        self.nodes(node).apply_key(key, entry[0], entry[1]).addErrback(failed)
