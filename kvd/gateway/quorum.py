"""
Gathering a quorum: ask some replicas, replace each one that fails by the next candidate,
and stop waiting as soon as enough have answered.

Writes ask all N owners with the fallbacks as replacements and need W; reads ask the first
R candidates with the rest as replacements and need R. A replica that has not answered when
the quorum is reached is not waited for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from heapq import heapify, heappop, heappush
from typing import Any, Generic, Protocol, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.keys import Unavailable

_log = Logger()

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class QuorumFailed(Unavailable):
    """Fewer replicas than the quorum answered; says how many did."""

    def __init__(
        self,
        what: str,
        answered: int,
        needed: int,
        errors: list[str],
        receipt: Receipt | None = None,
    ) -> None:
        detail = f"; {'; '.join(errors[:3])}" if errors else ""
        super().__init__(f"{what} quorum not reached: {answered} of {needed} replicas answered{detail}")
        self.answered = answered
        self.needed = needed
        #: For a write: which replicas took it anyway, so the client knows it may still appear.
        self.receipt = receipt


@frozen
class Receipt:
    """Which replicas took a write, and which of them are fallbacks holding it for which owner."""

    replicas: list[str]
    hinted: dict[str, str]
    #: Whether the write may still become visible: some replica took it, or did not answer in time.
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        """A write answer's receipt: which replicas made it durable, which fallbacks hold it for whom."""
        return {"replicas": self.replicas, "hinted": self.hinted}


@define
class Gathered(Generic[T]):
    """
    The answers by node id (in the order they came), how many of them count toward the
    quorum, and what went wrong with the nodes that did not answer.
    """

    answers: dict[str, T] = field(factory=dict)
    errors: list[str] = field(factory=list)
    accepted: int = 0
    #: The nodes whose answers counted, in the order they came.
    accepted_by: list[str] = field(factory=list)
    #: For each spare asked: the node of the first ones it stands in for.
    standing_in: dict[str, str] = field(factory=dict)

    def receipt(self, uncertain: bool = False) -> Receipt:
        """Who took it so far (C{uncertain}: some replica's outcome is unknown)."""
        replicas = list(self.accepted_by)
        standing_in = self.standing_in
        hinted = {node: standing_in[node] for node in replicas if node in standing_in} if standing_in else {}
        return Receipt(replicas, hinted, bool(replicas) or uncertain)

    def require(self, what: str, needed: int, receipt: Receipt | None = None) -> Gathered[T]:
        """@raise QuorumFailed: when fewer than C{needed} answers counted."""
        if self.accepted < needed:
            raise QuorumFailed(what, self.accepted, needed, self.errors, receipt)
        return self


def _always(answer: object) -> bool:
    return True


#: How early a shared hedge timer may fire, and how far past a deadline it takes a hedge as due:
#: a timer set for a deadline from another moment may land an ulp either side of it.
_SLACK = 1e-6
#: The smallest heap of hedge moments that is swept of answered reads' ones.
_SWEEP_AT = 1024


class Hedges:
    """
    The hedges of all the gatherings on one clock under one timer, instead of a C{callLater}
    and a cancel for every read: a gathering due for a hedge is kept by a number, and its
    moment and number go in a heap; one timer, set for the earliest, hedges those due and
    still waiting when it fires and is set again for the next. A gathering answered first
    (nearly all) lets go of its number (L{forget}), and its moment is passed over when it
    comes: no timer to cancel. So the timer fires about once a hedge delay under load, not
    once a read. (The heap holds no gathering: one kept past its answer, with its request and
    all, cost a GET more than the timer it saved, by what the garbage collector then did.)
    """

    __slots__ = ("clock", "_due", "_waiting", "_timer", "_at", "_count", "_firing", "_sweep_at")

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._due: list[tuple[float, int]] = []
        self._waiting: dict[int, _Gathering[Any]] = {}
        self._timer: IDelayedCall | None = None
        self._at = 0.0
        self._count = 0
        self._firing = False
        #: The heap's size at which answered reads' moments are swept out of it (a long delay,
        #: such as a node's first reads wait, would otherwise keep every read's of that time).
        self._sweep_at = _SWEEP_AT

    def add(self, gathering: _Gathering[Any], delay: float) -> int:
        """Hedge C{gathering} (L{_Gathering._hedged}) C{delay} seconds from now; its number."""
        deadline = self.clock.seconds() + delay
        self._count = number = self._count + 1
        self._waiting[number] = gathering
        due = self._due
        heappush(due, (deadline, number))
        if len(due) >= self._sweep_at:
            waiting = self._waiting
            due[:] = [moment for moment in due if moment[1] in waiting]
            heapify(due)
            self._sweep_at = max(_SWEEP_AT, 2 * len(due))
        if self._firing:
            return number  # set when the firing is done
        timer = self._timer
        if timer is None:
            self._at = deadline
            self._timer = self.clock.callLater(delay, self._fire)
        elif deadline < self._at:
            self._at = deadline
            timer.reset(delay)
        return number

    def forget(self, number: int) -> None:
        """The gathering of C{number} is answered: no hedge for it."""
        self._waiting.pop(number, None)

    def _fire(self) -> None:
        self._timer = None
        due, waiting = self._due, self._waiting
        now = self.clock.seconds()
        self._firing = True
        try:
            while due and due[0][0] <= now + _SLACK:
                gathering = waiting.pop(heappop(due)[1], None)
                if gathering is not None and not gathering.finished:
                    try:
                        gathering._hedged()
                    except Exception:
                        _log.failure("hedging a read")
        finally:
            self._firing = False
        while due and due[0][1] not in waiting:
            heappop(due)
        if due:
            self._at = due[0][0]
            self._timer = self.clock.callLater(max(0.0, self._at - now - _SLACK), self._fire)

    def waiting(self) -> int:
        """How many gatherings wait for a hedge (answered ones are let go at once)."""
        return len(self._waiting)

    def moments(self) -> int:
        """How many moments are in the heap, answered reads' ones passed over when they come included."""
        return len(self._due)


class Reply(Protocol[T_contra]):
    """What takes one replica's answer: a L{Deferred}, or L{_Reply} (the same two methods)."""

    def callback(self, answer: T_contra) -> object: ...

    def errback(self, failure: Failure | BaseException) -> object: ...


class _Reply(Generic[T]):
    """
    One replica's answer delivered straight to its gathering: what a Deferred per replica
    asked did, without the Deferred (its making, its callbacks, its running them; several
    of each per GET and PUT).
    """

    __slots__ = ("gathering", "node_id")

    def __init__(self, gathering: _Gathering[T], node_id: str) -> None:
        self.gathering, self.node_id = gathering, node_id

    def callback(self, answer: T) -> None:
        self.gathering._answered(answer, self.node_id)

    def errback(self, failure: Failure | BaseException) -> None:
        self.gathering._failed(failure if isinstance(failure, Failure) else Failure(failure), self.node_id)


@define
class _Gathering(Generic[T]):
    ask: Callable[[str], Deferred[T]]
    spares: list[str]
    needed: int
    accept: Callable[[T], bool]
    result: Gathered[T] = field(factory=Gathered)
    #: Told the result once there is one: C{done}'s callback, or C{then} (L{gather_to}).
    done: Deferred[Gathered[T]] | None = None
    then: Callable[[Gathered[T]], object] | None = None
    finished: bool = False
    pending: int = 0
    launching: bool = True
    hedge: tuple[IReactorTime | Hedges, float] | None = None
    usable: Callable[[str], bool] = _always
    on_failure: Callable[[str, Failure], object] | None = None
    #: Asks a node with a L{Reply} to answer, instead of C{ask}'s Deferred.
    tell: Callable[[str, Reply[T]], object] | None = None
    _hedging: IDelayedCall | None = None
    #: The L{Hedges} this gathering waits in for a hedge, and its number there.
    _hedges: Hedges | None = None
    _hedge_number: int = 0

    def schedule_hedge(self) -> None:
        if self.hedge is not None and self.spares and not self.finished:
            clock, delay = self.hedge
            if isinstance(clock, Hedges):
                self._hedges, self._hedge_number = clock, clock.add(self, delay)
            else:
                self._hedging = clock.callLater(delay, self._hedged)

    def _hedged(self) -> None:
        self._hedging = self._hedges = None
        if self.spares and not self.finished:
            # A hedge is a bet on a node that can answer: one judged unreachable just now is
            # left among the spares (it may be back by the time a target fails), not spent.
            spare = next((node_id for node_id in self.spares if self.usable(node_id)), None)
            if spare is not None:
                self.spares.remove(spare)
                self.launch(spare)
            self.schedule_hedge()

    def _next_spare(self) -> str:
        spare = next((node_id for node_id in self.spares if self.usable(node_id)), self.spares[0])
        self.spares.remove(spare)
        return spare

    def launch(self, node_id: str) -> None:
        self.pending += 1
        if self.tell is not None:
            self.tell(node_id, _Reply(self, node_id))
            return
        self.ask(node_id).addCallbacks(self._answered, self._failed, callbackArgs=(node_id,), errbackArgs=(node_id,))

    def _answered(self, answer: T, node_id: str) -> None:
        self.pending -= 1
        result = self.result
        result.answers[node_id] = answer
        if self.accept(answer):
            result.accepted += 1
            result.accepted_by.append(node_id)
        # L{settle}'s test, without its call: of a write's three answers, only one settles it.
        if (result.accepted >= self.needed or self.pending == 0) and not (self.finished or self.launching):
            self._finish()

    def _failed(self, failure: Failure, node_id: str) -> None:
        self.pending -= 1
        if self.on_failure is not None:
            self.on_failure(node_id, failure)
        # One reason a node: an owner skipped at routing and then asked as a last resort
        # failed for the reason its own failure gives now.
        errors, prefix = self.result.errors, f"{node_id}: "
        errors[:] = [error for error in errors if not error.startswith(prefix)]
        errors.append(prefix + failure.getErrorMessage())
        if self.spares:
            # Even once the quorum is reached: a write still wants N copies (hinted handoff).
            spare = self._next_spare()
            self.result.standing_in[spare] = self.result.standing_in.pop(node_id, node_id)
            self.launch(spare)
        self.settle()

    def settle(self) -> None:
        if self.finished or self.launching:
            return
        if self.result.accepted >= self.needed or self.pending == 0:
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        if self._hedges is not None:
            self._hedges.forget(self._hedge_number)
            self._hedges = None
        elif self._hedging is not None and self._hedging.active():
            self._hedging.cancel()
        self._hedging = None
        if self.then is not None:
            self.then(self.result)
        else:
            assert self.done is not None
            self.done.callback(self.result)


def gather(
    ask: Callable[[str], Deferred[T]],
    first: Sequence[str],
    spares: Sequence[str],
    needed: int,
    accept: Callable[[T], bool] = _always,
    hedge: tuple[IReactorTime | Hedges, float] | None = None,
    errors: Sequence[str] = (),
    standing_in: dict[str, str] | None = None,
    usable: Callable[[str], bool] = _always,
    on_failure: Callable[[str, Failure], object] | None = None,
    tell: Callable[[str, Reply[T]], object] | None = None,
) -> Deferred[Gathered[T]]:
    """
    Ask every node of C{first}; replace each that fails by the next of C{spares}, and with
    C{hedge} (clock, delay) also ask the next spare each time the delay passes (the clock
    may be a L{Hedges}, one timer for many gatherings). Spares that
    C{usable} says no to (judged unreachable) are passed over while others are left, and a
    hedge never asks one. Fires once
    C{needed} answers are accepted, or once nobody is left to wait for (the caller checks
    with L{Gathered.require}, which names C{errors} too: the nodes skipped beforehand);
    never fails. An answer that is not accepted still answers: it is no reason to ask a spare.
    C{on_failure} is told (node id, failure) of every replica that fails, even after the
    quorum is reached. With C{tell}, each node is asked by C{tell(node_id, reply)} instead,
    its answer (or failure) given to C{reply} (L{Reply}) rather than to a Deferred.
    """
    done: Deferred[Gathered[T]] = Deferred()
    gathering: _Gathering[T] = _Gathering(
        ask, list(spares), needed, accept, done=done, hedge=hedge, usable=usable, on_failure=on_failure, tell=tell
    )
    _start(gathering, first, errors, standing_in)
    return done


def _start(
    gathering: _Gathering[Any], first: Sequence[str], errors: Sequence[str], standing_in: dict[str, str] | None
) -> None:
    if errors:
        gathering.result.errors.extend(errors)
    if standing_in:
        gathering.result.standing_in.update(standing_in)
    for node_id in first:
        gathering.launch(node_id)
    gathering.launching = False
    gathering.settle()
    gathering.schedule_hedge()


def _no_ask(node_id: str) -> Deferred[Any]:
    raise AssertionError("asked through tell")


def gather_to(
    then: Callable[[Gathered[T]], object],
    tell: Callable[[str, Reply[T]], object],
    first: Sequence[str],
    spares: Sequence[str],
    needed: int,
    accept: Callable[[T], bool] = _always,
    hedge: tuple[IReactorTime | Hedges, float] | None = None,
    errors: Sequence[str] = (),
    standing_in: dict[str, str] | None = None,
    usable: Callable[[str], bool] = _always,
    on_failure: Callable[[str, Failure], object] | None = None,
) -> None:
    """
    L{gather} with C{tell}, its result given to C{then} rather than to a Deferred: for a
    caller that goes on in plain callbacks (a conditional write's three phases, a quorum
    write's and read's answer). C{then} is called once, maybe before this returns; what it
    raises is its caller's (a node's answer being delivered), so it should raise nothing.
    """
    gathering: _Gathering[T] = _Gathering(
        _no_ask, list(spares), needed, accept, then=then, hedge=hedge, usable=usable, on_failure=on_failure, tell=tell
    )
    _start(gathering, first, errors, standing_in)
