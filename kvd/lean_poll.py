"""
The epoll reactor's event loop without the legacy log context around each event.

Twisted's C{EPollReactor.doPoll} hands every ready descriptor to C{_doReadOrWrite} through
C{log.callWithLogger}: it asks the selectable for its C{logPrefix()}, copies the legacy log
context into a new dict with it as C{"system"}, and calls the handler inside that context,
so that a legacy C{log.msg} or C{log.err} made meanwhile is tagged with the connection. kvd
logs through C{twisted.logger}, whose events name their own namespace and never read that
context, and C{_doReadOrWrite} itself already logs what a C{doRead} or C{doWrite} raises and
drops that connection. So the wrapping is several microseconds a socket event spent on a tag
nobody reads: 4-8 % of a gateway's and a node's CPU per PUT under load (bench/vs_etcd.py,
see docs/performance.md).

L{lean_poll} changes an installed C{EPollReactor} (twistd's default on Linux) to
L{LeanEPollReactor}, the same class but for its poll; any other reactor is left alone, and
on a system without epoll this module is not imported (L{kvd.tap.lean_poll_if_epoll}).
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.logger import Logger

_log = Logger()


class LeanEPollReactor(epollreactor.EPollReactor):
    """C{EPollReactor}, each ready descriptor handled without C{log.callWithLogger}."""

    def doPoll(self, timeout: float | None) -> None:
        try:
            events = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        handle = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by a handler earlier in this same poll
            try:
                handle(selectable, fd, event)
            except Exception:
                # What callWithLogger would have caught: a connectionLost that raised while
                # the connection was dropped. Logged, and the other events still handled.
                _log.failure("handling an event of {selectable!r}", selectable=selectable)

    doIteration = doPoll


def lean_poll(reactor: Any) -> None:
    """Make C{reactor}, if it is exactly an C{EPollReactor}, a L{LeanEPollReactor}."""
    if type(reactor) is epollreactor.EPollReactor:
        reactor.__class__ = LeanEPollReactor
