"""
Conditional writes through the gateway: single-decree Paxos per key over the key's N owners,
as Cassandra's lightweight transactions (see docs/consistency.md).

A round: mint a ballot (a version from the gateway's hybrid clock: milliseconds, counter,
gateway id, so unique per gateway and ordered); I{prepare} it at a majority of the owners;
their promises carry each one's accepted-but-uncommitted proposal and what its store holds
(whether the key is live, and its version: never the value, which a round does not need). An
accepted proposal newer than every current entry is a round some proposer left unfinished:
it is finished first (re-proposed under this ballot, then committed) and the round starts
again. Otherwise the precondition is checked against the newest current entry, and the new
entry, whose version is the ballot itself, is I{proposed} to the owners; once a majority
accepted, it is I{committed}: written to the owners as a replicated write, answered after W.

Prepares and accepts go to a majority of the owners (another in place of one that fails or
is slow: L{Proposer._gather}); the commit goes to every owner. All three travel in one
batched C{/internal/paxos} request per node (L{kvd.gateway.nodes.NodeClient.prepare}).

Fallbacks take no part: with fewer than a majority of owners answering, a conditional write
is a 503. A round that loses to a higher ballot goes again after a short random pause, at
most L{MAX_ROUNDS} times.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kvd.gateway.cluster import Cluster, ClusterView
from kvd.gateway.coordinator import WriteOutcome
from kvd.gateway.nodes import NodeClients, PromiseAnswer, Written
from kvd.gateway.quorum import Gathered, Receipt, gather
from kvd.keys import Precondition, Unavailable
from kvd.paxos import Proposal
from kvd.ttl import expired, with_expiry
from kvd.versions import HybridClock

_log = Logger()

T = TypeVar("T")

#: Rounds a conditional write tries before it answers 503.
MAX_ROUNDS = 12
#: The random pause before a round that lost to another proposer: up to this many seconds,
#: doubling with each lost round.
BACKOFF = 0.005
#: A prepare or accept asks one more owner once this many times the usual worst latency of
#: those asked has passed without a majority (L{Proposer._gather}).
HEDGE_AFTER = 2.0


class Contended(Unavailable):
    """Other proposers kept winning the key's rounds."""


@define
class Proposer:
    """The proposer of one gateway."""

    cluster: Cluster
    nodes: NodeClients
    clock: HybridClock
    scheduler: IReactorTime
    write_quorum: int = 2
    random: Callable[[], float] = field(factory=lambda: random.Random().random)
    #: Counters, for tests and /metrics: rounds lost to another ballot, unfinished rounds
    #: finished, and prepares and accepts sent (more than a majority each: hedges, failures).
    conflicts: int = 0
    recovered: int = 0
    asked: int = 0

    async def write(
        self, key: str, value: str | None, precondition: Precondition, ttl: float | None = None
    ) -> WriteOutcome:
        """
        Write C{value} (None: delete) if C{precondition} holds of the key's current entry;
        fires with the new version, whether the key was live before, and the commit's receipt.
        With C{ttl}, the new version carries the expiry C{ttl} seconds from now (L{kvd.ttl}),
        as a plain write's does.

        @raise PreconditionFailed: with the current version, when it does not hold.
        @raise QuorumFailed: when fewer than a majority of owners answer, or the commit misses W.
        @raise Contended: when other proposers won every round.
        """
        view = self.cluster.view()
        owners, _ = view.placement(key)
        majority = len(owners) // 2 + 1
        lost = 0
        expires = None if ttl is None else self.clock.now() + ttl
        #: The versions this write proposed, and whether the key was live before each: one of
        #: them found chosen by a later round (another proposer finished it) is this write's success.
        mine: dict[str, bool] = {}
        for _round in range(MAX_ROUNDS):
            ballot = self.clock.next()
            promises = await self._prepare(view, owners, key, ballot, majority)
            granted = {n: p for n, p in promises.answers.items() if p[0].promised}
            versions = [entry[1] for _, entry in promises.answers.values() if entry is not None]
            versions += [p.accepted.version for p, _ in promises.answers.values() if p.accepted is not None]
            if len(granted) < majority:
                if len(promises.answers) < majority:
                    # Nothing of this round was proposed; an earlier round's proposal may be
                    # accepted somewhere, and the next proposer for the key would finish it.
                    promises.require("conditional write (prepare)", majority, Receipt([], {}, partial=bool(mine)))
                lost += 1
                self._observe(versions + [p.ballot for p, _ in promises.answers.values()])
                await self._pause(lost)
                continue
            if any(version >= ballot for version in versions):
                # The new entry's version is this ballot: it must be newer than any there is.
                self._observe(versions)
                continue
            newest = max((e for _, e in granted.values() if e is not None), key=lambda e: e[1], default=None)
            if newest is not None and newest[0] and expired(newest[1], self.clock.now()):
                newest = (False, newest[1])  # expired by this gateway's clock: absent, as a read here says
            newest_version = "" if newest is None else newest[1]
            unfinished = [p.accepted for p, _ in granted.values() if p.accepted is not None]
            unfinished = [a for a in unfinished if a.version > newest_version]
            if unfinished:
                left = max(unfinished, key=lambda a: a.ballot)
                _log.info("finishing an unfinished write of {key!r} ({version})", key=key, version=left.version)
                self.recovered += 1
                if await self._propose(view, owners, key, Proposal(ballot, left.value, left.version), majority):
                    receipt = await self._commit(view, owners, key, left.value, left.version)
                    if left.version in mine:
                        return WriteOutcome(left.version, mine[left.version], receipt)
                else:
                    lost += 1
                    await self._pause(lost)
                continue
            if newest_version in mine:
                # This write's own proposal was chosen (finished by another proposer): it took effect.
                receipt = await self._commit(view, owners, key, value, newest_version)
                return WriteOutcome(newest_version, mine[newest_version], receipt)
            live = newest is not None and newest[0]
            precondition.check_current(newest_version if live else None)
            version = with_expiry(ballot, expires)
            mine[version] = live
            if not await self._propose(view, owners, key, Proposal(ballot, value, version), majority):
                lost += 1
                await self._pause(lost)
                continue
            receipt = await self._commit(view, owners, key, value, version)
            return WriteOutcome(version, live, receipt)
        raise Contended(f"conditional write of {key!r}: other writers kept winning; try again")

    def _observe(self, versions: list[str]) -> None:
        for version in versions:
            self.clock.observe(version)

    async def _pause(self, lost: int) -> None:
        self.conflicts += 1
        delay = self.random() * BACKOFF * (2 ** min(lost, 6))
        await deferLater(self.scheduler, delay, lambda: None)

    def _gather(
        self, ask: Callable[[str], Deferred[T]], owners: list[str], majority: int, accept: Callable[[T], bool]
    ) -> Deferred[Gathered[T]]:
        """
        Ask a majority of the owners (those the failure detector deems reachable first); ask
        another in place of one that fails, and also once L{HEDGE_AFTER} times the usual
        worst latency of those asked has passed without a majority. Any majority will do for
        Paxos, and the owners not asked cost nothing.

        Later than a read hedges: a hedged prepare or accept is a durable write (a group
        commit) at one more node, and an item often waits in its node's queue for the batch
        in flight before its own leaves (L{kvd.gateway.nodes}: one batch at a time per node),
        so twice a batch's usual worst is what an item of a node behaving as usual may take.
        """
        health = self.nodes.health
        ordered = sorted(owners, key=lambda node_id: not health.reachable(node_id))
        first, spares = ordered[:majority], ordered[majority:]
        delay = min(health.ceiling, HEDGE_AFTER * health.hedge_delay(first))
        return gather(ask, first, spares, majority, accept, hedge=(health.clock, delay))

    def _prepare(
        self, view: ClusterView, owners: list[str], key: str, ballot: str, majority: int
    ) -> Deferred[Gathered[PromiseAnswer]]:
        def ask(node_id: str) -> Deferred[PromiseAnswer]:
            self.asked += 1
            return self.nodes(view.members[node_id]).prepare(key, ballot)

        return self._gather(ask, owners, majority, lambda answer: answer[0].promised)

    async def _propose(self, view: ClusterView, owners: list[str], key: str, proposal: Proposal, majority: int) -> bool:
        """Whether a majority of owners accepted C{proposal}."""

        def ask(node_id: str) -> Deferred[tuple[bool, str]]:
            self.asked += 1
            return self.nodes(view.members[node_id]).accept(key, proposal)

        gathered = await self._gather(ask, owners, majority, lambda answer: answer[0])
        if gathered.accepted >= majority:
            return True
        if len(gathered.answers) < majority:
            # An owner that did not answer may have accepted: the next round may finish it.
            gathered.require("conditional write (accept)", majority, Receipt([], {}, partial=True))
        self._observe([ballot for _, ballot in gathered.answers.values()])
        return False

    async def _commit(self, view: ClusterView, owners: list[str], key: str, value: str | None, version: str) -> Receipt:
        """Write the chosen entry to the owners; return once W (and a majority) hold it or newer."""
        needed = min(len(owners), max(self.write_quorum, len(owners) // 2 + 1))

        def ask(node_id: str) -> Deferred[Written]:
            return self.nodes(view.members[node_id]).commit_key(key, value, version)

        gathered = await gather(ask, owners, [], needed, lambda written: written.held >= version)
        receipt = gathered.receipt()
        gathered.require("conditional write (commit)", needed, receipt)
        return receipt
