"""
The epoll reactor's poll without the legacy log context (kvd/lean_poll.py): every ready
descriptor still reaches C{_doReadOrWrite}, one removed meanwhile is passed over, one whose
handling raises is logged without losing the others, and only an EPollReactor is changed.
"""

from __future__ import annotations

import errno
import select
from typing import Any

import pytest
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel

from kvd import lean_poll
from kvd.lean_poll import LeanEPollReactor

IN = select.EPOLLIN


class Poller:
    def __init__(self, events: list[tuple[int, int]] | OSError) -> None:
        self.events = events
        self.asked: list[tuple[float, int]] = []

    def poll(self, timeout: float, most: int) -> list[tuple[int, int]]:
        self.asked.append((timeout, most))
        if isinstance(self.events, OSError):
            raise self.events
        return self.events


def lean(events: list[tuple[int, int]] | OSError, selectables: dict[int, Any]) -> tuple[LeanEPollReactor, list[Any]]:
    """A LeanEPollReactor that never opened a descriptor, its poller and handler faked."""
    reactor = LeanEPollReactor.__new__(LeanEPollReactor)
    reactor._poller = Poller(events)
    reactor._selectables = selectables
    handled: list[Any] = []

    def handle(selectable: Any, fd: int, event: int) -> None:
        if selectable == "bad":
            raise RuntimeError("connectionLost raised")
        handled.append((selectable, fd, event))

    reactor._doReadOrWrite = handle  # type: ignore[method-assign]
    return reactor, handled


def test_every_ready_descriptor_is_handled_and_one_removed_meanwhile_is_passed_over() -> None:
    reactor, handled = lean([(5, IN), (6, IN), (7, IN | select.EPOLLOUT)], {5: "a", 7: "c"})
    reactor.doIteration(0.5)
    assert handled == [("a", 5, IN), ("c", 7, IN | select.EPOLLOUT)]
    assert reactor._poller.asked == [(0.5, 2)]


def test_no_timeout_waits_for_ever() -> None:
    reactor, _ = lean([], {})
    reactor.doPoll(None)
    assert reactor._poller.asked == [(-1, 0)]


def test_a_handler_that_raises_is_logged_and_the_other_events_still_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[dict[str, Any]] = []
    monkeypatch.setattr(lean_poll, "_log", Logger(observer=events.append))
    reactor, handled = lean([(5, IN), (7, IN)], {5: "bad", 7: "c"})
    reactor.doPoll(0)
    assert handled == [("c", 7, IN)]
    [event] = events
    assert event["log_level"] == LogLevel.critical
    assert event["log_failure"].check(RuntimeError)


def test_an_interrupted_poll_returns_and_another_error_is_raised() -> None:
    reactor, handled = lean(OSError(errno.EINTR, "interrupted"), {})
    reactor.doPoll(0)
    assert handled == []
    reactor, _ = lean(OSError(errno.EBADF, "bad descriptor"), {})
    with pytest.raises(OSError, match="bad descriptor"):
        reactor.doPoll(0)


def test_only_an_epoll_reactor_is_changed() -> None:
    epoll = EPollReactor.__new__(EPollReactor)
    lean_poll.lean_poll(epoll)
    assert type(epoll) is LeanEPollReactor
    clock = Clock()
    lean_poll.lean_poll(clock)
    assert type(clock) is Clock

    class Mine(EPollReactor):
        pass

    mine = Mine.__new__(Mine)
    lean_poll.lean_poll(mine)
    assert type(mine) is Mine  # a subclass of someone's own keeps its own poll
