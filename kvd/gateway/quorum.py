"""
Gathering a quorum: ask some replicas, replace each one that fails by the next candidate,
and stop waiting as soon as enough have answered.

Writes ask all N owners with the fallbacks as replacements and need W; reads ask the first
R candidates with the rest as replacements and need R. A replica that has not answered when
the quorum is reached is not waited for. With a hedge (a clock and a delay), one more
candidate is asked each time the delay passes without the quorum: a slow replica is
outvoted rather than waited for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kvd.keys import Unavailable

T = TypeVar("T")


class QuorumFailed(Unavailable):
    """Fewer replicas than the quorum answered; says how many did."""

    def __init__(self, what: str, answered: int, needed: int, errors: list[str]) -> None:
        detail = f"; {'; '.join(errors[:3])}" if errors else ""
        super().__init__(f"{what} quorum not reached: {answered} of {needed} replicas answered{detail}")
        self.answered = answered
        self.needed = needed


@define
class Gathered(Generic[T]):
    """The answers by node id (in the order they came) and what went wrong with the others."""

    answers: dict[str, T] = field(factory=dict)
    errors: list[str] = field(factory=list)

    def require(self, what: str, needed: int) -> Gathered[T]:
        """@raise QuorumFailed: when fewer than C{needed} answered."""
        if len(self.answers) < needed:
            raise QuorumFailed(what, len(self.answers), needed, self.errors)
        return self


@define
class _Gathering(Generic[T]):
    ask: Callable[[str], Deferred[T]]
    spares: list[str]
    needed: int
    result: Gathered[T] = field(factory=Gathered)
    done: Deferred[Gathered[T]] = field(factory=Deferred)
    pending: int = 0
    launching: bool = True
    hedge: tuple[IReactorTime, float] | None = None
    _hedging: IDelayedCall | None = None

    def schedule_hedge(self) -> None:
        if self.hedge is not None and self.spares and not self.done.called:
            clock, delay = self.hedge
            self._hedging = clock.callLater(delay, self._hedged)

    def _hedged(self) -> None:
        self._hedging = None
        if self.spares and not self.done.called:
            self.launch(self.spares.pop(0))
            self.schedule_hedge()

    def launch(self, node_id: str) -> None:
        self.pending += 1
        self.ask(node_id).addCallbacks(self._answered, self._failed, callbackArgs=(node_id,), errbackArgs=(node_id,))

    def _answered(self, answer: T, node_id: str) -> None:
        self.pending -= 1
        self.result.answers[node_id] = answer
        self.settle()

    def _failed(self, failure: Failure, node_id: str) -> None:
        self.pending -= 1
        self.result.errors.append(f"{node_id}: {failure.getErrorMessage()}")
        if self.spares:
            # Even once the quorum is reached: a write still wants N copies (hinted handoff).
            self.launch(self.spares.pop(0))
        self.settle()

    def settle(self) -> None:
        if self.done.called or self.launching:
            return
        if len(self.result.answers) >= self.needed or self.pending == 0:
            if self._hedging is not None and self._hedging.active():
                self._hedging.cancel()
            self._hedging = None
            self.done.callback(self.result)


def gather(
    ask: Callable[[str], Deferred[T]],
    first: Sequence[str],
    spares: Sequence[str],
    needed: int,
    hedge: tuple[IReactorTime, float] | None = None,
    errors: Sequence[str] = (),
) -> Deferred[Gathered[T]]:
    """
    Ask every node of C{first}; replace each that fails by the next of C{spares}, and with
    C{hedge} (clock, delay) also ask the next spare each time the delay passes. Fires once
    C{needed} have answered, or once nobody is left to wait for (the caller checks with
    L{Gathered.require}, which names C{errors} too: the nodes skipped beforehand); never fails.
    """
    gathering: _Gathering[T] = _Gathering(ask, list(spares), needed, hedge=hedge)
    gathering.result.errors.extend(errors)
    for node_id in first:
        gathering.launch(node_id)
    gathering.launching = False
    gathering.settle()
    gathering.schedule_hedge()
    return gathering.done
