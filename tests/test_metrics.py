"""/metrics on every role: Prometheus text, requests counted by route template, state gauges."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from kvd.gateway import Cluster
from kvd.gateway.nodes import NodeClients
from kvd.gateway.repair import Repairer
from kvd.membership import NodeInfo
from kvd.metrics import Metrics, route_of
from kvd.registry import Registry
from kvd.resources import NodeAPI, RegistryAPI
from kvd.roles import gateway_metrics, node_metrics, registry_metrics
from kvd.store import Store
from kvd.transport import KeepAlivePool, Peers
from kvd.versions import HybridClock
from kvd.web import BoundedSite


def serve(site: BoundedSite, *requests: bytes) -> bytes:
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for raw in requests:
        protocol.dataReceived(raw)
    return transport.value()


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_keys_are_counted_under_their_route_template_never_by_key() -> None:
    assert route_of(b"/kv/some-secret-key") == "/kv/{key}"
    assert route_of(b"/cluster/owners/k") == "/cluster/owners/{key}"
    assert route_of(b"/registry/nodes/a") == "/registry/nodes/{id}"
    assert route_of(b"/registry/nodes") == "/registry/nodes"
    assert route_of(b"/whatever/else") == "other"


def test_a_node_counts_requests_and_shows_its_store(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), clock=HybridClock(Clock().seconds, "a"))
    try:
        api = NodeAPI("a", store, metrics=node_metrics(store))
        site = BoundedSite(api.resource(), metrics=api.metrics)
        serve(
            site,
            b"PUT /kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nv",
            b"GET /kv/k HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /kv/nope HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        answer = serve(site, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"text/plain; version=0.0.4" in answer
        found = samples(answer.split(b"\r\n\r\n", 1)[1])
        route = ("route", "/kv/{key}")
        assert found[("kvd_http_requests_total", (("method", "PUT"), route, ("status", "200")))] == 1
        assert found[("kvd_http_requests_total", (("method", "GET"), route, ("status", "200")))] == 1
        assert found[("kvd_http_requests_total", (("method", "GET"), route, ("status", "404")))] == 1
        assert found[("kvd_http_request_seconds_count", (route,))] == 3
        assert found[("kvd_keys", ())] == 1
        assert found[("kvd_journal_bytes", ())] == store.journal_bytes > 0
        assert found[("kvd_fsync_seconds_count", ())] == 1
        assert not any("nope" in str(labels) for _, labels in found)
    finally:
        store.abandon()


def test_refused_bodies_are_counted_as_413() -> None:
    metrics = Metrics()
    site = BoundedSite(RegistryAPI(Registry(10), Clock(), metrics).resource(), max_body=10, metrics=metrics)
    serve(site, b"PUT /registry/nodes/a HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    found = samples(metrics.render())
    assert (
        found[("kvd_http_requests_total", (("method", "PUT"), ("route", "/registry/nodes/{id}"), ("status", "413")))]
        == 1
    )


def test_the_registry_and_gateway_show_their_state() -> None:
    registry = Registry(10)
    registry.register("a", {"url": "http://a:1"}, 0)
    found = samples(registry_metrics(registry).render())
    assert found[("kvd_registry_leases", ())] == 1
    cluster = Cluster(vnodes=8)
    cluster.update({"a": NodeInfo("a", "http://a:1"), "b": NodeInfo("b", "http://b:1")})
    clock = Clock()
    repairer = Repairer(cluster, NodeClients(Peers(KeepAlivePool(clock), clock)), clock.seconds)
    found = samples(gateway_metrics(cluster, repairer).render())
    assert found[("kvd_ring_members", ())] == 2
