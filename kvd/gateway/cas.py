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
from collections.abc import Callable, Collection
from functools import partial
from typing import Any, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kvd.gateway.cluster import Cluster, ClusterView
from kvd.gateway.coordinator import WriteOutcome
from kvd.gateway.nodes import NodeClients, PromiseAnswer, Written
from kvd.gateway.quorum import Gathered, Receipt, Reply, gather
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

    def write(
        self, key: str, value: str | None, precondition: Precondition, ttl: float | None = None
    ) -> Deferred[WriteOutcome]:
        """
        Write C{value} (None: delete) if C{precondition} holds of the key's current entry;
        fires with the new version, whether the key was live before, and the commit's receipt.
        With C{ttl}, the new version carries the expiry C{ttl} seconds from now (L{kvd.ttl}),
        as a plain write's does.

        @raise PreconditionFailed: with the current version, when it does not hold.
        @raise QuorumFailed: when fewer than a majority of owners answer, or the commit misses W.
        @raise Contended: when other proposers won every round.
        @raise NoNodes: when there are no members (at once, as L{Coordinator.write}).
        """
        view = self.cluster.view()
        owners, _ = view.placement(key)
        expires = None if ttl is None else self.clock.now() + ttl
        return _Write(self, key, value, precondition, expires, view, owners).round()

    def _observe(self, versions: list[str]) -> None:
        for version in versions:
            self.clock.observe(version)

    def _gather(
        self,
        tell: Callable[[str, Reply[T]], object],
        owners: list[str],
        majority: int,
        accept: Callable[[T], bool],
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
        reachable = health.reachable
        ordered = owners if all(map(reachable, owners)) else sorted(owners, key=lambda node_id: not reachable(node_id))
        first, spares = ordered[:majority], ordered[majority:]
        delay = min(health.ceiling, HEDGE_AFTER * health.hedge_delay(first))
        return gather(_no_ask, first, spares, majority, accept, hedge=(health.clock, delay), tell=tell)


class _Write:
    """
    One conditional write's rounds (see L{Proposer.write}): plain callbacks, one object, no
    coroutine (each await of one was a generator step and a Deferred's callbacks) and no
    Deferred per node asked (each answer goes straight to its phase's gathering, as a plain
    PUT's do: L{kvd.gateway.coordinator}). A class, not closures: a nested function that
    calls itself again (the next round) would be a reference cycle.
    """

    __slots__ = (
        "proposer",
        "key",
        "value",
        "precondition",
        "expires",
        "view",
        "owners",
        "majority",
        "lost",
        "rounds",
        "mine",
    )

    def __init__(
        self,
        proposer: Proposer,
        key: str,
        value: str | None,
        precondition: Precondition,
        expires: float | None,
        view: ClusterView,
        owners: list[str],
    ) -> None:
        self.proposer, self.key, self.value, self.precondition = proposer, key, value, precondition
        self.expires, self.view, self.owners = expires, view, owners
        self.majority = len(owners) // 2 + 1
        self.lost = self.rounds = 0
        #: The versions this write proposed, and whether the key was live before each: one of
        #: them found chosen by a later round (another proposer finished it) is this write's success.
        self.mine: dict[str, bool] = {}

    def round(self) -> Deferred[WriteOutcome]:
        if self.rounds == MAX_ROUNDS:
            return fail(Contended(f"conditional write of {self.key!r}: other writers kept winning; try again"))
        self.rounds += 1
        ballot = self.proposer.clock.next()
        d = self.proposer._gather(partial(self._tell_prepare, ballot), self.owners, self.majority, _promised)
        return d.addCallback(self._promised, ballot)

    def _pause(self) -> Deferred[WriteOutcome]:
        """The next round, after a random pause: this one lost to another proposer."""
        self.lost += 1
        proposer = self.proposer
        proposer.conflicts += 1
        delay = proposer.random() * BACKOFF * (2 ** min(self.lost, 6))
        return deferLater(proposer.scheduler, delay, _nothing).addCallback(self._again)

    def _again(self, _: None) -> Deferred[WriteOutcome]:
        return self.round()

    def _promised(self, promises: Gathered[PromiseAnswer], ballot: str) -> Deferred[WriteOutcome] | WriteOutcome:
        proposer, majority, mine = self.proposer, self.majority, self.mine
        answers = promises.answers
        granted = [answer for answer in answers.values() if answer[0].promised]
        versions = [entry[1] for _, entry in answers.values() if entry is not None]
        versions += [p.accepted.version for p, _ in answers.values() if p.accepted is not None]
        if len(granted) < majority:
            if len(answers) < majority:
                # Nothing of this round was proposed; an earlier round's proposal may be
                # accepted somewhere, and the next proposer for the key would finish it.
                promises.require("conditional write (prepare)", majority, Receipt([], {}, partial=bool(mine)))
            proposer._observe(versions + [p.ballot for p, _ in answers.values()])
            return self._pause()
        if any(version >= ballot for version in versions):
            # The new entry's version is this ballot: it must be newer than any there is.
            proposer._observe(versions)
            return self.round()
        newest = max((e for _, e in granted if e is not None), key=_version_of, default=None)
        if newest is not None and newest[0] and expired(newest[1], proposer.clock.now()):
            newest = (False, newest[1])  # expired by this gateway's clock: absent, as a read here says
        newest_version = "" if newest is None else newest[1]
        unfinished = [p.accepted for p, _ in granted if p.accepted is not None and p.accepted.version > newest_version]
        if unfinished:
            left = max(unfinished, key=_ballot_of)
            _log.info("finishing an unfinished write of {key!r} ({version})", key=self.key, version=left.version)
            proposer.recovered += 1
            d = self._propose(Proposal(ballot, left.value, left.version))
            return d.addCallback(self._recovering, left)
        if newest_version in mine:
            # This write's own proposal was chosen (finished by another proposer): it took effect.
            return self._commit(self.value, newest_version, ()).addCallback(
                self._outcome, newest_version, mine[newest_version]
            )
        live = newest is not None and newest[0]
        self.precondition.check_current(newest_version if live else None)
        version = ballot if self.expires is None else with_expiry(ballot, self.expires)
        mine[version] = live
        return self._propose(Proposal(ballot, self.value, version)).addCallback(self._accepted, version, live)

    def _accepted(self, accepted_by: list[str] | None, version: str, live: bool) -> Deferred[WriteOutcome]:
        if accepted_by is None:
            return self._pause()
        return self._commit(self.value, version, accepted_by).addCallback(self._outcome, version, live)

    def _recovering(self, accepted_by: list[str] | None, left: Proposal) -> Deferred[WriteOutcome]:
        if accepted_by is None:
            return self._pause()
        return self._commit(left.value, left.version, accepted_by).addCallback(self._recovered, left)

    def _recovered(self, receipt: Receipt, left: Proposal) -> Deferred[WriteOutcome] | WriteOutcome:
        if left.version in self.mine:
            return WriteOutcome(left.version, self.mine[left.version], receipt)
        return self.round()

    @staticmethod
    def _outcome(receipt: Receipt, version: str, live: bool) -> WriteOutcome:
        return WriteOutcome(version, live, receipt)

    def _propose(self, proposal: Proposal) -> Deferred[list[str] | None]:
        """The owners that accepted C{proposal}, once a majority did; None when one refused."""
        d = self.proposer._gather(partial(self._tell_accept, proposal), self.owners, self.majority, _accepted)
        return d.addCallback(self._proposed)

    def _proposed(self, gathered: Gathered[tuple[bool, str]]) -> list[str] | None:
        if gathered.accepted >= self.majority:
            return gathered.accepted_by
        if len(gathered.answers) < self.majority:
            # An owner that did not answer may have accepted: the next round may finish it.
            gathered.require("conditional write (accept)", self.majority, Receipt([], {}, partial=True))
        self.proposer._observe([ballot for _, ballot in gathered.answers.values()])
        return None

    def _commit(self, value: str | None, version: str, accepted_by: Collection[str]) -> Deferred[Receipt]:
        """
        Write the chosen entry to the owners; fires once W (and a majority) hold it or newer.
        Those in C{accepted_by} accepted the very proposal: they are sent its key and version
        only (L{kvd.gateway.nodes.NodeClient.commit_accepted_to}).
        """
        owners = self.owners
        needed = min(len(owners), max(self.proposer.write_quorum, self.majority))
        tell = partial(self._tell_commit, value, version, accepted_by)
        d = gather(_no_ask, owners, (), needed, partial(_holds, version), tell=tell)
        return d.addCallback(self._committed, needed)

    @staticmethod
    def _committed(gathered: Gathered[Written], needed: int) -> Receipt:
        receipt = gathered.receipt()
        gathered.require("conditional write (commit)", needed, receipt)
        return receipt

    def _tell_prepare(self, ballot: str, node_id: str, reply: Reply[PromiseAnswer]) -> None:
        self.proposer.asked += 1
        self.proposer.nodes(self.view.members[node_id]).prepare_to(reply, self.key, ballot)

    def _tell_accept(self, proposal: Proposal, node_id: str, reply: Reply[tuple[bool, str]]) -> None:
        self.proposer.asked += 1
        self.proposer.nodes(self.view.members[node_id]).accept_to(reply, self.key, proposal)

    def _tell_commit(
        self, value: str | None, version: str, accepted_by: Collection[str], node_id: str, reply: Reply[Written]
    ) -> None:
        client = self.proposer.nodes(self.view.members[node_id])
        if node_id in accepted_by:
            client.commit_accepted_to(reply, self.key, value, version)
        else:
            client.commit_to(reply, self.key, value, version)


def _nothing() -> None:
    return None


def _no_ask(node_id: str) -> Deferred[Any]:
    raise AssertionError("asked through tell")


def _promised(answer: PromiseAnswer) -> bool:
    return answer[0].promised


def _accepted(answer: tuple[bool, str]) -> bool:
    return answer[0]


def _holds(version: str, written: Written) -> bool:
    return written.held >= version


def _version_of(entry: tuple[bool, str]) -> str:
    return entry[1]


def _ballot_of(proposal: Proposal) -> str:
    return proposal.ballot
