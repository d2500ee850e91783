"""A L{kvd.store.Runner} for tests: jobs wait until the test runs them (a write + fsync, a ring build)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


class ManualRunner:
    """Queues blocking jobs instead of running them, so a test decides when they happen."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, d))
        return d

    def run_one(self) -> None:
        """Run the oldest job and fire its Deferred with what it returned or raised."""
        f, d = self.jobs.pop(0)
        try:
            result = f()
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.jobs:
            self.run_one()
