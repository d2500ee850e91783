"""
Prometheus metrics: what each role counts, in one registry per served Site.

Requests are counted when they finish (the Site's log hook), by route template (never by
key: keys are unbounded), method and status, with a latency histogram per route. Gauges
that describe state (keys held, journal size, ring members, leases) are read when
/metrics is scraped, so the request path pays nothing for them.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvd import paths

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Path prefixes whose rest is a key or an id, and the route name they are counted under.
_TEMPLATES = (
    (paths.KV, "/kv/{key}"),
    (paths.OWNERS, "/cluster/owners/{key}"),
    (paths.CLUSTER_KEY, "/cluster/key/{key}"),
    (paths.REGISTRY_NODES, "/registry/nodes/{id}"),
    (paths.INTERNAL, "/internal/*"),
)
_KNOWN = {"/healthz", "/metrics", "/node", "/cluster", "/cluster/ring", "/ui", "/registry/nodes"}
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


class _Requests(Collector):
    """The request counter and latency histogram, built from plain counts at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        counts = CounterMetricFamily(
            "kvd_http_requests",
            "HTTP requests answered, by route, method and status.",
            labels=("route", "method", "status"),
        )
        for (route, method, status), count in sorted(self._metrics.counts.items()):
            counts.add_metric([route, method.decode("ascii", "replace"), str(status)], count)
        yield counts
        latency = HistogramMetricFamily(
            "kvd_http_request_seconds", "Time from a request's arrival to its answer, by route.", labels=("route",)
        )
        for route, histogram in sorted(self._metrics.latency.items()):
            buckets, total = histogram[:-1], histogram[-1]
            cumulative, running = [], 0.0
            for bound, in_bucket in zip((*_LATENCY_BUCKETS, float("inf")), buckets, strict=True):
                running += in_bucket
                cumulative.append((floatToGoString(bound), running))
            latency.add_metric([route], cumulative, total)
        yield latency


class Metrics:
    """One role's metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Plain counts on the request path (prometheus_client's own counters take a lock per
        # increment, which cost a tenth of a node's throughput); exported when scraped.
        self.counts: dict[tuple[str, bytes, int], int] = {}
        #: route -> a count per latency bucket, then the sum of the latencies
        self.latency: dict[str, list[float]] = {}
        self.registry.register(_Requests(self))

    def observe_request(self, path: bytes, method: bytes, status: int, seconds: float) -> None:
        route = route_of(path)
        key = (route, method, status)
        counts = self.counts
        if key not in counts and len(counts) > 1000:  # odd methods cannot grow this without bound
            key = (route, b"OTHER", status)
        counts[key] = counts.get(key, 0) + 1
        histogram = self.latency.get(route)
        if histogram is None:
            histogram = self.latency[route] = [0.0] * (len(_LATENCY_BUCKETS) + 2)
        histogram[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        histogram[-1] += seconds

    def gauges(self, *gauges: tuple[str, str, Callable[[], float]]) -> None:
        self.registry.register(_Gauges(gauges))

    def histogram(self, name: str, documentation: str, buckets: tuple[float, ...] = _LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, documentation, buckets=buckets, registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: The clock request latencies are measured with: the function itself, not one that calls it
#: (every request reads it twice).
now: Callable[[], float] = time.monotonic
