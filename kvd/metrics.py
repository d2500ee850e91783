"""
Prometheus metrics: what each role counts, in one registry per served Site.

Requests are counted when they finish (the Site's log hook), by route template (never by
key: keys are unbounded), method and status, with a latency histogram per route. Gauges
that describe state (keys held, journal size, ring members, leases) are read when
/metrics is scraped, so the request path pays nothing for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Path prefixes whose rest is a key or an id, and the route name they are counted under.
_TEMPLATES = (
    (b"/kv/", "/kv/{key}"),
    (b"/cluster/owners/", "/cluster/owners/{key}"),
    (b"/registry/nodes/", "/registry/nodes/{id}"),
    (b"/internal/", "/internal/*"),
)
_KNOWN = {"/healthz", "/metrics", "/node", "/cluster", "/registry/nodes"}
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def route_of(path: bytes) -> str:
    """The route a request path is counted under."""
    for prefix, template in _TEMPLATES:
        if path.startswith(prefix):
            return template
    text = path.decode("ascii", "replace")
    return text if text in _KNOWN else "other"


class _Gauges(Collector):
    """Gauges computed at scrape time from callables."""

    def __init__(self, gauges: Iterable[tuple[str, str, Callable[[], float]]]) -> None:
        self._gauges = list(gauges)

    def collect(self) -> Iterable[Any]:
        for name, documentation, read in self._gauges:
            yield GaugeMetricFamily(name, documentation, value=read())


class Metrics:
    """One role's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kvd_http_requests",
            "HTTP requests answered, by route, method and status.",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "kvd_http_request_seconds",
            "Time from a request's arrival to its answer, by route.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._latency_by_route: dict[str, Any] = {}
        self._requests_by_key: dict[tuple[str, bytes, int], Any] = {}

    def observe_request(self, path: bytes, method: bytes, status: int, seconds: float) -> None:
        route = route_of(path)
        # labels() looks children up under a lock; remembering them keeps the hot path short.
        key = (route, method, status)
        counter = self._requests_by_key.get(key)
        if counter is None:
            if len(self._requests_by_key) > 1000:  # odd methods cannot grow this without bound
                key = (route, b"OTHER", status)
            counter = self._requests_by_key.setdefault(
                key, self.requests.labels(route, key[1].decode("ascii", "replace"), str(status))
            )
        counter.inc()
        histogram = self._latency_by_route.get(route)
        if histogram is None:
            histogram = self._latency_by_route.setdefault(route, self.latency.labels(route))
        histogram.observe(seconds)

    def gauges(self, *gauges: tuple[str, str, Callable[[], float]]) -> None:
        self.registry.register(_Gauges(gauges))

    def histogram(self, name: str, documentation: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, documentation, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def now() -> float:
    """The clock request latencies are measured with."""
    return time.monotonic()
