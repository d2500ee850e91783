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
is slow: L{Proposer._gather_to}); the commit goes to every owner, by key and version only to
those that accepted the very proposal (they hold its value). All three travel in one
batched C{/internal/paxos} request per node (L{kvd.gateway.nodes.NodeClient.prepare_to}).
A write's rounds are plain callbacks on one L{_Write}, each phase's gathering calling the next
step, and its one Deferred is its outcome.

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
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.gateway.cluster import Cluster, ClusterView
from kvd.gateway.coordinator import WriteOutcome
from kvd.gateway.nodes import NodeClients, PromiseAnswer, Written
from kvd.gateway.quorum import Gathered, Receipt, Reply, gather_to
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
#: those asked has passed without a majority (L{Proposer._gather_to}).
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
        return _Write(self, key, value, precondition, expires, view, owners).start()

    def _observe(self, versions: list[str]) -> None:
        for version in versions:
            self.clock.observe(version)

    def _gather_to(
        self,
        then: Callable[[Gathered[T]], object],
        tell: Callable[[str, Reply[T]], object],
        owners: list[str],
        accept: Callable[[T], bool],
    ) -> None:
        """
        Ask a majority of the owners (those the failure detector deems reachable first); ask
        another in place of one that fails, and also once L{HEDGE_AFTER} times the usual
        worst latency of those asked has passed without a majority. Any majority will do for
        Paxos, and the owners not asked cost nothing. C{then} is given what was gathered.

        Later than a read hedges: a hedged prepare or accept is a durable write (a group
        commit) at one more node, and an item often waits in its node's queue for the batch
        in flight before its own leaves (L{kvd.gateway.nodes}: one batch at a time per node),
        so twice a batch's usual worst is what an item of a node behaving as usual may take.
        """
        health = self.nodes.health
        reachable = health.reachable
        ordered = owners if all(map(reachable, owners)) else sorted(owners, key=lambda node_id: not reachable(node_id))
        majority = len(owners) // 2 + 1
        first, spares = ordered[:majority], ordered[majority:]
        delay = min(health.ceiling, HEDGE_AFTER * health.hedge_delay(first))
        gather_to(then, tell, first, spares, majority, accept, hedge=(health.clock, delay))


class _Write:
    """
    One conditional write's rounds (see L{Proposer.write}): plain callbacks on one object
    and one Deferred, the outcome's. No coroutine (each await was a generator step and a
    Deferred's callbacks), no Deferred per phase (each phase's gathering calls the next step:
    L{gather_to}) and none per node asked (each answer goes straight to its phase's gathering,
    as a plain PUT's do: L{kvd.gateway.coordinator}). A class, not closures: a nested function
    that calls itself again (the next round) would be a reference cycle.
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
        "done",
        "proposal",
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
        self.done: Deferred[WriteOutcome] = Deferred()
        #: The proposal of the round's accept phase.
        self.proposal: Proposal | None = None

    def start(self) -> Deferred[WriteOutcome]:
        self.round()
        return self.done

    def _step(self, step: Callable[[Gathered[Any]], None], gathered: Gathered[Any]) -> None:
        """Run a step; what it raises (a 412, a 503) is the write's outcome."""
        try:
            step(gathered)
        except Exception:
            if self.done.called:
                _log.failure("conditional write of {key!r} after its outcome", key=self.key)
            else:
                self.done.errback(Failure())

    def round(self) -> None:
        try:
            if self.rounds == MAX_ROUNDS:
                raise Contended(f"conditional write of {self.key!r}: other writers kept winning; try again")
            self.rounds += 1
            ballot = self.proposer.clock.next()
            tell = partial(self._tell_prepare, ballot)
            self.proposer._gather_to(partial(self._step, partial(self._promised, ballot)), tell, self.owners, _promised)
        except Exception:
            self.done.errback(Failure())

    def _pause(self) -> None:
        """The next round, after a random pause: this one lost to another proposer."""
        self.lost += 1
        proposer = self.proposer
        proposer.conflicts += 1
        delay = proposer.random() * BACKOFF * (2 ** min(self.lost, 6))
        proposer.scheduler.callLater(delay, self.round)

    def _promised(self, ballot: str, promises: Gathered[PromiseAnswer]) -> None:
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
            self._pause()
            return
        if any(version >= ballot for version in versions):
            # The new entry's version is this ballot: it must be newer than any there is.
            proposer._observe(versions)
            self.round()
            return
        newest = max((e for _, e in granted if e is not None), key=_version_of, default=None)
        if newest is not None and newest[0] and expired(newest[1], proposer.clock.now()):
            newest = (False, newest[1])  # expired by this gateway's clock: absent, as a read here says
        newest_version = "" if newest is None else newest[1]
        unfinished = [p.accepted for p, _ in granted if p.accepted is not None and p.accepted.version > newest_version]
        if unfinished:
            left = max(unfinished, key=_ballot_of)
            _log.info("finishing an unfinished write of {key!r} ({version})", key=self.key, version=left.version)
            proposer.recovered += 1
            self._propose(Proposal(ballot, left.value, left.version))
            return
        if newest_version in mine:
            # This write's own proposal was chosen (finished by another proposer): it took effect.
            self._commit(self.value, newest_version, ())
            return
        live = newest is not None and newest[0]
        self.precondition.check_current(newest_version if live else None)
        version = ballot if self.expires is None else with_expiry(ballot, self.expires)
        mine[version] = live
        self._propose(Proposal(ballot, self.value, version))

    def _propose(self, proposal: Proposal) -> None:
        """Ask a majority of owners to accept C{proposal}; commit it once they did."""
        self.proposal = proposal
        tell = partial(self._tell_accept, proposal)
        self.proposer._gather_to(partial(self._step, self._proposed), tell, self.owners, _accepted)

    def _proposed(self, gathered: Gathered[tuple[bool, str]]) -> None:
        proposal = self.proposal
        assert proposal is not None
        if gathered.accepted >= self.majority:
            self._commit(proposal.value, proposal.version, gathered.accepted_by)
            return
        if len(gathered.answers) < self.majority:
            # An owner that did not answer may have accepted: the next round may finish it.
            gathered.require("conditional write (accept)", self.majority, Receipt([], {}, partial=True))
        self.proposer._observe([ballot for _, ballot in gathered.answers.values()])
        self._pause()

    def _commit(self, value: str | None, version: str, accepted_by: Collection[str]) -> None:
        """
        Write the chosen entry to the owners, until W (and a majority) hold it or newer. Those
        in C{accepted_by} accepted the very proposal: they are sent its key and version only
        (L{kvd.gateway.nodes.NodeClient.commit_accepted_to}).
        """
        owners = self.owners
        needed = min(len(owners), max(self.proposer.write_quorum, self.majority))
        tell = partial(self._tell_commit, value, version, accepted_by)
        then = partial(self._step, partial(self._committed, version, needed))
        gather_to(then, tell, owners, (), needed, partial(_holds, version))

    def _committed(self, version: str, needed: int, gathered: Gathered[Written]) -> None:
        receipt = gathered.receipt()
        gathered.require("conditional write (commit)", needed, receipt)
        if version in self.mine:
            self.done.callback(WriteOutcome(version, self.mine[version], receipt))
        else:
            self.round()  # an unfinished write of another, finished: now this one's round

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
