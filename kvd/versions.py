"""
Write versions: a hybrid logical clock whose values order every pair of writes.

A version is a string, ``MMMMMMMMMMMMCCCCCC.origin``: twelve hex digits of milliseconds
since the epoch, six of a counter within that millisecond, and the id of the process that
coordinated the write. Plain string comparison orders versions: by time, then counter, then
origin, so two writes never tie and every replica keeps the same winner whatever order
writes arrive in. The empty string is older than every version (data written before
versions existed).

A clock never goes backwards: it follows the wall clock when that moves ahead and counts
within the last millisecond otherwise, and it moves past every version it observes, so a
coordinator whose wall clock lags still orders its writes after the ones it has seen.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define

_WIDTH = 18  # 12 hex digits of milliseconds, 6 of counter


def encode(milliseconds: int, counter: int, origin: str) -> str:
    return f"{milliseconds:012x}{counter:06x}.{origin}"


def parts(version: str) -> tuple[int, int]:
    """The (milliseconds, counter) of a version; (0, 0) for one that is not well-formed."""
    try:
        return int(version[:12], 16), int(version[12:_WIDTH], 16)
    except ValueError:
        return 0, 0


def is_version(value: object) -> bool:
    if not (isinstance(value, str) and len(value) > _WIDTH + 1 and value[_WIDTH] == "."):
        return False
    # L{parts} != (0, 0), without its call: a node checks every item of every batch.
    try:
        return (int(value[:12], 16), int(value[12:_WIDTH], 16)) != (0, 0)
    except ValueError:
        return False


def milliseconds(version: str) -> int:
    return parts(version)[0]


@define
class HybridClock:
    """Hands out versions for the writes one process coordinates."""

    now: Callable[[], float]
    origin: str
    _milliseconds: int = 0
    _counter: int = 0

    def next(self) -> str:
        wall = int(self.now() * 1000)
        if wall > self._milliseconds:
            self._milliseconds, self._counter = wall, 0
        else:
            self._counter += 1
            if self._counter > 0xFFFFFF:
                self._milliseconds, self._counter = self._milliseconds + 1, 0
        return f"{self._milliseconds:012x}{self._counter:06x}.{self.origin}"  # L{encode}, without its call

    def observe(self, version: str) -> None:
        """Move past a version seen elsewhere, so the next one is newer."""
        seen = parts(version)
        if seen > (self._milliseconds, self._counter):
            self._milliseconds, self._counter = seen
