"""
The gateway's hot keys: which keys were requested most over the last minute, in bounded
memory, cheaply enough to stay on for every request.

Each slice of time (10 s by default) counts requests with the Misra-Gries summary: at most
C{counters} keys are counted; a request for an uncounted key when all counters are taken
lowers every counter by one (dropping those that reach zero) instead of adding the key.
Lowering costs one pass over the counters, but it removes as much count as it looks at,
so a request costs O(1) amortised. A count is never more than the truth and at most
C{requests / (counters + 1)} below it, so any key with more than that share of a slice's
requests is always counted. The last minute is the slices it overlaps, summed; memory is
C{counters} entries for each of those slices.

Domain code: it takes a clock (anything with C{seconds()}), and imports nothing of Twisted.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from attrs import frozen

__all__ = ["HotKey", "HotKeys"]

DEFAULT_COUNTERS = 512
DEFAULT_WINDOW = 60.0
DEFAULT_SLICES = 6


class _Clock(Protocol):
    def seconds(self) -> float: ...


@frozen
class HotKey:
    """A key, how many requests it had in the window (a lower bound), and their rate per second."""

    key: str
    requests: int
    rate: float

    def to_json(self) -> dict[str, object]:
        return {"key": self.key, "requests": self.requests, "rate": self.rate}


class HotKeys:
    """The heavy hitters of the last C{window} seconds, counted in C{slices} slices of C{counters} counters."""

    def __init__(
        self,
        clock: _Clock,
        counters: int = DEFAULT_COUNTERS,
        window: float = DEFAULT_WINDOW,
        slices: int = DEFAULT_SLICES,
    ) -> None:
        if counters < 1 or slices < 1 or window <= 0:
            raise ValueError("counters, slices and window must be positive")
        self._clock = clock
        self.counters = counters
        self.window = window
        self._slice = window / slices
        #: Finished slices, oldest first: (start time, counts).
        self._past: deque[tuple[float, dict[str, int]]] = deque(maxlen=slices)
        self._counts: dict[str, int] = {}
        self._start = clock.seconds()
        self._end = self._start + self._slice

    def record(self, key: str) -> None:
        """Count one request for C{key}."""
        counts = self._counts
        found = counts.get(key)
        if found is not None:
            counts[key] = found + 1
        elif len(counts) < self.counters:
            counts[key] = 1
        else:
            self._counts = {k: n - 1 for k, n in counts.items() if n > 1}
        # The clock once a request, after the counting: a request at a slice's edge may land in
        # either neighbour, which the rates cannot tell apart.
        if self._clock.seconds() >= self._end:
            self._rotate()

    def _rotate(self) -> None:
        now = self._clock.seconds()
        self._past.append((self._start, self._counts))
        self._counts = {}
        # Skip the slices in which nothing was requested (they would count nothing).
        skipped = (now - self._end) // self._slice
        self._start = self._end + skipped * self._slice
        self._end = self._start + self._slice

    def top(self, n: int) -> list[HotKey]:
        """The C{n} most requested keys of the last window, most requested first (ties by key)."""
        now = self._clock.seconds()
        if now >= self._end:
            self._rotate()
        since = now - self.window
        totals: dict[str, int] = dict(self._counts)
        oldest = self._start
        for start, counts in self._past:
            if start + self._slice > since:
                oldest = min(oldest, start)
                for key, count in counts.items():
                    totals[key] = totals.get(key, 0) + count
        # The rate over the slices summed, so a gateway up for 5 s is not diluted to a minute.
        span = max(now - oldest, 1.0)
        ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
        return [HotKey(key, count, count / span) for key, count in ranked]
