"""
The lean HTTP/1.1 connection (L{kvd.lean_http}) answers exactly as twisted.web does.

Each test runs two identical worlds side by side, one served by L{BoundedSite} (twisted.web)
and one by L{LeanSite}, sends both the same bytes the same way, and compares what comes
back byte for byte (the Date header aside), what the metrics counted, and whether the
connection was closed.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from kvd.auth import Auth
from kvd.gateway import Cluster
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.nodes import NodeClients
from kvd.lean_http import LeanChannel, LeanSite
from kvd.membership import NodeInfo
from kvd.metrics import Metrics
from kvd.paxos import Acceptor
from kvd.resources import GatewayAPI, NodeAPI
from kvd.store import Store
from kvd.testing.network import Network
from kvd.versions import HybridClock
from kvd.web import BoundedSite

LIMIT = 64
DATE = re.compile(rb"\r\nDate: [^\r]*\r\n")
#: A node's change index has a random epoch: two worlds' differ.
EPOCH = re.compile(rb'"epoch": "[0-9a-f]+"')


class World:
    """A role's API on its own clock, behind a twisted.web site or a lean one."""

    def __init__(self, site: BoundedSite, clock: Clock, metrics: Metrics, settle: Callable[[], None]) -> None:
        self.site, self.clock, self.metrics, self.settle = site, clock, metrics, settle
        self.closers: list[Callable[[], None]] = []

    def connect(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def node_world(directory: Path, lean: bool, auth: Auth | None = None) -> World:
    clock = Clock()
    store = Store.open(str(directory), clock=HybridClock(clock.seconds, "a"))
    acceptor = Acceptor.in_store(store)
    api = NodeAPI("a", store, max_value_bytes=LIMIT, acceptor=acceptor, clock=clock, auth=auth or Auth())
    kind = LeanSite if lean else BoundedSite
    site = kind(api.resource(), max_body=LIMIT, reactor=clock, metrics=api.metrics)
    world = World(site, clock, api.metrics, _nothing)
    world.closers.append(store.abandon)
    return world


def gateway_world(directory: Path, lean: bool, auth: Auth | None = None) -> World:
    clock = Clock()
    network = Network(clock)
    stores = []
    for name in "abc":
        store = Store.open(str(directory / name), clock=HybridClock(clock.seconds, name))
        stores.append(store)
        network.serve(f"{name}.test", NodeAPI(name, store, clock=clock).resource())
    cluster = Cluster(vnodes=16, replicas=3)
    cluster.update({n: NodeInfo(n, f"http://{n}.test") for n in "abc"})
    coordinator = Coordinator(cluster, NodeClients(network.peers("gw")), HybridClock(clock.seconds, "gw"))
    api = GatewayAPI(cluster, coordinator, max_value_bytes=LIMIT, clock=clock, auth=auth or Auth())
    kind = LeanSite if lean else BoundedSite
    site = kind(api.resource(), max_body=LIMIT, reactor=clock, metrics=api.metrics)
    world = World(site, clock, api.metrics, network.flush)
    world.closers.extend(store.abandon for store in stores)
    return world


def _nothing() -> None:
    pass


class Pair:
    """The same world twice: C{old} on twisted.web, C{new} on the lean connection."""

    def __init__(self, make: Callable[[Path, bool], World], directory: Path) -> None:
        self.old = make(directory / "old", False)
        self.new = make(directory / "new", True)

    def exchange(self, chunks: list[bytes], then: Callable[[World], None] | None = None) -> tuple[bytes, bool]:
        """Send C{chunks} one after another to both; the answers (Date blanked) and whether each closed."""
        results = []
        for world in (self.old, self.new):
            protocol, transport = world.connect()
            for chunk in chunks:
                if transport.disconnecting:
                    break  # a transport reads nothing more once its connection is being closed
                protocol.dataReceived(chunk)
                world.settle()
            if then is not None and not transport.disconnecting:
                then(world)
                world.settle()
            answers = EPOCH.sub(b'"epoch": "-"', DATE.sub(b"\r\nDate: -\r\n", transport.value()))
            results.append((answers, transport.disconnecting))
            protocol.connectionLost(Failure(ConnectionDone()))
            world.settle()
        assert results[0] == results[1], f"twisted.web: {results[0]!r}\nlean:        {results[1]!r}"
        assert self.old.metrics.counts == self.new.metrics.counts
        return results[1]

    def close(self) -> None:
        for world in (self.old, self.new):
            for close in world.closers:
                close()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Pair]:
    pair = Pair(node_world, tmp_path)
    yield pair
    pair.close()


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Pair]:
    pair = Pair(gateway_world, tmp_path)
    yield pair
    pair.close()


def req(method: str, target: str, body: bytes | None = None, headers: tuple[str, ...] = ()) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers)
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def internal(path: str, body: object) -> bytes:
    return req("POST", path, json.dumps(body).encode())


#: What the differential tests send: good and bad keys, bad methods, over the limit,
#: preconditions, TTLs, raw values, the internal batches and what twisted.web keeps.
KV_REQUESTS = [
    req("PUT", "/kv/a", b"v1"),
    req("GET", "/kv/a"),
    req("GET", "/kv/a?raw=true"),
    req("GET", "/kv/a?raw=maybe"),
    req("GET", "/kv/missing"),
    req("PUT", "/kv/a", b"v2", ('If-Match: "nope"',)),
    req("PUT", "/kv/a", b"v3", ("If-None-Match: *",)),
    req("PUT", "/kv/new", b"v3", ("If-None-Match: *",)),
    req("PUT", "/kv/t?ttl=30", b"short-lived"),
    req("PUT", "/kv/t?ttl=soon", b"x"),
    req("PUT", "/kv/bin", b"\x00\xff\xfe", ("Content-Type: application/octet-stream",)),
    req("GET", "/kv/bin?raw=1"),
    req("GET", "/kv/bin"),
    req("PUT", "/kv/big", b"x" * (LIMIT + 1)),
    req("PUT", "/kv/a", b"v" * LIMIT),
    req("GET", "/kv/%FF%FE"),
    req("GET", "/kv/" + "k" * 2000),
    req("GET", "/kv/a%2Fb"),
    req("PATCH", "/kv/a", b"x"),
    req("HEAD", "/kv/a"),
    req("GET", "/kv/"),
    req("GET", "/kv"),
    req("GET", "/kv?limit=2"),
    req("GET", "/healthz"),
    req("GET", "/nowhere"),
    req("DELETE", "/kv/a", None, ('If-Match: "nope"',)),
    req("DELETE", "/kv/a"),
    req("DELETE", "/kv/a"),
    req("PUT", "/kv/nolength"),
    b"GET /kv/a HTTP/1.0\r\n\r\n",
    b"GET /kv/a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    req("PUT", "/kv/chunked", None, ("Transfer-Encoding: chunked",)) + b"2\r\nab\r\n0\r\n\r\n",
    req("PUT", "/kv/e", b"xy", ("Expect: 100-continue",)),
    req("GET", "/kv/a", None, ("X-Thing: one", "X-Thing: two")),
    req("GET", "/kv/a", None, ("Content-Length: 1x",)),
    b"GET /kv/a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /kv/a  HTTP/1.1\r\n\r\n",
    b"GET /kv/\x7f HTTP/1.1\r\n\r\n",
    b"\r\nGET /kv/a HTTP/1.1\r\n\r\n",
    b"GET /kv/a HTTP/1.1\r\nBad Header: x\r\n\r\n",
    b"GET /kv/a HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"garbage\r\n\r\n",
    req("PUT", "http://127.0.0.1:8000/kv/absolute", b"v"),
    req("GET", "HTTP://x/kv/absolute?raw=true"),
    req("GET", "https://x:1/kv/a"),
    req("GET", "http://x"),
    req("GET", "http://x?limit=1"),
    req("GET", "http:/kv/a"),
    req("GET", "ftp://x/kv/a"),
]
NODE_REQUESTS = [
    internal("/internal/apply", {"items": [["i1", "v", "0000018c2f4e5a6b0001-gw1"]]}),
    internal("/internal/read", {"keys": ["i1", "nothing"], "max_chars": 100}),
    internal("/internal/read", {"keys": "not a list"}),
    req("POST", "/internal/read", b"{not json"),
    internal("/internal/paxos", {"items": [["p", "i1", "018f00000000000001.gw2"]]}),
    internal("/internal/paxos", {"items": [["x"]]}),
    internal("/internal/list", {"prefix": "", "after": None, "limit": 10, "values": True}),
    req("POST", "/internal/read", b'{"keys": []}', ("Content-Type: application/x-www-form-urlencoded",)),
    req("GET", "/internal/read"),
    req("GET", "/node"),
]
SCRIPT = [
    req("PUT", "/kv/s", b"one"),
    req("GET", "/kv/s?raw=true"),
    req("GET", "/kv/nope"),
    req("DELETE", "/kv/s"),
]


@pytest.mark.parametrize("request_bytes", KV_REQUESTS + NODE_REQUESTS, ids=lambda r: r[:40].decode("latin-1"))
def test_a_node_answers_each_request_as_twisted_web_does(nodes: Pair, request_bytes: bytes) -> None:
    nodes.exchange([req("PUT", "/kv/a", b"held"), req("PUT", "/kv/bin", b"b", ("Content-Type: image/png",))])
    nodes.exchange([request_bytes])
    nodes.exchange([request_bytes, req("GET", "/kv/a")])  # and the connection after it


@pytest.mark.parametrize("request_bytes", KV_REQUESTS, ids=lambda r: r[:40].decode("latin-1"))
def test_a_gateway_answers_each_request_as_twisted_web_does(gateways: Pair, request_bytes: bytes) -> None:
    gateways.exchange([req("PUT", "/kv/a", b"held")])
    gateways.exchange([request_bytes])
    gateways.exchange([request_bytes + req("GET", "/kv/a")])


def test_the_hot_requests_are_the_lean_connection_s_own(nodes: Pair, gateways: Pair) -> None:
    """The differential tests are not vacuous: the good requests never reach twisted.web."""
    lent: list[Any] = []
    site: Any = nodes.new.site
    twisted_channel = site.twisted_channel
    site.twisted_channel = lambda addr: lent.append(addr) or twisted_channel(addr)
    protocol, _ = nodes.new.connect()
    assert isinstance(protocol, LeanChannel)
    for request_bytes in SCRIPT + NODE_REQUESTS[:7] + [req("GET", "/kv/a?raw=maybe"), req("GET", "/kv/%FF")]:
        protocol.dataReceived(request_bytes)
    assert protocol.fallen is None
    assert lent == [], "no request was lent to a twisted.web channel either"
    protocol.dataReceived(req("GET", "/healthz"))
    assert len(lent) == 1, "and one of another route is"
    gateway: Any = gateways.new.site
    gateway_channel = gateway.twisted_channel
    gateway.twisted_channel = lambda addr: lent.append(addr) or gateway_channel(addr)
    protocol, transport = gateways.new.connect()
    protocol.dataReceived(b"".join(SCRIPT) + req("GET", "/kv?limit=2"))
    gateways.new.settle()
    assert transport.value().count(b"HTTP/1.1 ") == 5 and len(lent) == 1, "a gateway lends none of them"
    assert nodes.new.metrics.counts[("/kv/{key}", b"GET", 200)] == 1


def test_a_request_of_another_route_is_lent_to_twisted_web_and_the_connection_stays_lean(nodes: Pair) -> None:
    protocol, transport = nodes.new.connect()
    protocol.dataReceived(req("GET", "/healthz") + req("GET", "/internal/digests") + req("PUT", "/kv/l", b"1"))
    assert transport.value().count(b"HTTP/1.1 200 OK") == 3
    assert protocol.fallen is None and protocol._lent is None
    assert transport.producer is protocol, "the lean connection is the transport's producer again"
    protocol.dataReceived(req("GET", "/kv/l", None, ("Connection: close",)))
    assert protocol.fallen is not None, "a request that ends the connection: twisted.web's for good"
    assert transport.value().count(b"HTTP/1.1 200 OK") == 4 and transport.disconnecting


def test_pipelined_requests_are_answered_in_order(nodes: Pair, gateways: Pair) -> None:
    for pair in (nodes, gateways):
        answer, closed = pair.exchange([b"".join(SCRIPT * 3)])
        assert answer.count(b"HTTP/1.1 ") == 12 and not closed
        # Pipelined into a request twisted.web takes, and beyond it.
        pair.exchange([b"".join(SCRIPT) + req("GET", "/healthz") + b"".join(SCRIPT)])
        pair.exchange([b"".join(SCRIPT) + req("GET", "/kv/x", None, ("Connection: close",)) + b"".join(SCRIPT)])


def test_what_follows_a_lent_request_waits_for_its_answer(nodes: Pair) -> None:
    """A long poll of another route (twisted.web's) with requests pipelined behind it."""
    poll = internal("/internal/changes", {"since": None, "wait": 5})

    def later(world: World) -> None:
        world.clock.advance(6)  # the first poll's wait is over; then the second's
        world.settle()
        world.clock.advance(6)

    answer, closed = nodes.exchange([poll + b"".join(SCRIPT) + poll + req("GET", "/kv/a")], then=later)
    assert answer.count(b"HTTP/1.1 ") == 7 and not closed
    answer, _ = nodes.exchange([poll + req("GET", "/kv/a")])
    assert answer == b"", "nothing is answered before the long poll is"


def test_requests_split_at_every_byte_boundary_are_answered_the_same(nodes: Pair) -> None:
    data = b"".join(SCRIPT) + NODE_REQUESTS[1]
    for split in range(1, len(data)):
        nodes.exchange([data[:split], data[split:]])
    nodes.exchange([data[i : i + 1] for i in range(len(data))])


def test_a_gateway_split_at_every_byte_boundary_answers_the_same(gateways: Pair) -> None:
    data = b"".join(SCRIPT[:2])
    for split in range(1, len(data), 3):
        gateways.exchange([data[:split], data[split:]])


def _written(pair: Pair, key: str) -> str:
    """PUT C{key} through both worlds of C{pair}, and the version a GET of it answers."""
    pair.exchange([req("PUT", f"/kv/{key}", b"1")])
    answer, _ = pair.exchange([req("GET", f"/kv/{key}")])
    version = re.search(rb'"version": "([^"]+)"', answer)
    assert version is not None
    return version[1].decode()


def test_a_watch_answers_when_the_key_changes_and_what_follows_it_waits(nodes: Pair, gateways: Pair) -> None:
    for pair in (nodes, gateways):
        version = _written(pair, "w")
        pair.exchange([req("GET", "/kv/w?wait=10&version=nope")])  # differs from what it holds: answered at once
        waiting = req("GET", "/kv/w?wait=10&version=" + version)

        def later(world: World) -> None:
            world.clock.advance(11)

        answer, _ = pair.exchange([waiting + req("GET", "/kv/nope")], then=later)
        assert answer.count(b"HTTP/1.1 ") == 2 and answer.index(b"200 OK") < answer.index(b"404")
        answer, _ = pair.exchange([waiting])  # not answered before the wait is over
        assert answer == b""


def test_a_pending_answer_is_cancelled_when_its_client_goes(nodes: Pair) -> None:
    version = _written(nodes, "c")
    protocol, transport = nodes.new.connect()
    protocol.dataReceived(req("GET", "/kv/c?wait=100&version=" + version))
    current = protocol._current
    assert current is not None and current._pending is not None
    protocol.connectionLost(None)
    assert current._pending is None and current._disconnected
    nodes.new.clock.advance(200)
    assert transport.value() == b""


def test_bearer_tokens_are_checked_on_the_lean_path_as_on_twisted_web(tmp_path: Path) -> None:
    auth = Auth(client_token=b"tok", cluster_secret=b"sec")
    pair = Pair(lambda d, lean: node_world(d, lean, auth), tmp_path)
    try:
        for token in (None, "nope", "tok", "sec"):
            headers = () if token is None else (f"Authorization: Bearer {token}",)
            pair.exchange([req("PUT", "/kv/a", b"v", headers), req("GET", "/kv/a", None, headers)])
            pair.exchange([internal("/internal/read", {"keys": ["a"]})])
        answer, _ = pair.exchange([req("GET", "/kv/a")])
        assert b"401 Unauthorized" in answer and b"WWW-Authenticate: Bearer" in answer
    finally:
        pair.close()


def test_an_absolute_form_target_is_served_as_its_origin_form(nodes: Pair, gateways: Pair) -> None:
    """RFC 9112: a server MUST accept GET http://host/kv/a as it does GET /kv/a."""
    for pair in (nodes, gateways):
        answer, closed = pair.exchange([req("PUT", "http://127.0.0.1:8000/kv/abs", b"v")])
        assert answer.startswith(b"HTTP/1.1 200 OK") and not closed, answer
        answer, _ = pair.exchange([req("GET", "http://127.0.0.1:8000/kv/abs?raw=true")])
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\nv"), answer
    assert nodes.new.metrics.counts[("/kv/{key}", b"GET", 200)] == 1, "counted under its route"
    protocol, transport = nodes.new.connect()
    protocol.dataReceived(req("GET", "http://127.0.0.1:8000/kv/abs"))
    assert b"200 OK" in transport.value() and protocol.fallen is None, "on the lean path, not handed over"


def test_a_body_without_its_token_is_refused_from_its_head_on_both_paths(tmp_path: Path) -> None:
    """
    A request with a body but not its token (client token for /kv/ and /batch, the cluster
    secret for /internal/) is answered 401 as soon as its head is in, before its body comes,
    and the connection is closed (the body is never read); with its token, the body is awaited.
    """
    auth = Auth(client_token=b"tok", cluster_secret=b"sec")
    nodes = Pair(lambda d, lean: node_world(d, lean, auth), tmp_path / "nodes")
    gateways = Pair(lambda d, lean: gateway_world(d, lean, auth), tmp_path / "gateways")
    refused = [
        (nodes, "PUT", "/kv/a", (), "tok"),
        (nodes, "PUT", "/kv/a?ttl=5", ("Authorization: Bearer nope",), "sec"),
        (nodes, "POST", "/internal/apply", ("Authorization: Bearer tok",), "sec"),
        (nodes, "POST", "/internal/read", (), "sec"),
        (gateways, "POST", "/batch", ("Authorization: Bearer nope",), "tok"),
        (gateways, "PUT", "/kv/a", (), "sec"),
        (gateways, "PUT", "http://gw/kv/a", (), "tok"),
    ]
    try:
        for pair, method, target, headers, token in refused:
            head = req(method, target, None, (*headers, f"Content-Length: {LIMIT}"))
            answer, closed = pair.exchange([head + b"{"])
            assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), (target, answer)
            body = answer.split(b"\r\n\r\n", 1)[1]
            assert json.loads(body) == {"success": False, "error": "this needs a valid Authorization: Bearer token"}
            assert b'WWW-Authenticate: Bearer realm="kvd"' in answer and closed, target
            good = req(method, target, None, (f"Authorization: Bearer {token}", f"Content-Length: {LIMIT}"))
            assert pair.exchange([good + b"{"]) == (b"", False), "with its token, its body is awaited"
        chunked = req("PUT", "/kv/a", None, ("Transfer-Encoding: chunked",)) + b"40\r\n{"
        answer, closed = nodes.exchange([chunked])
        assert answer.startswith(b"HTTP/1.1 401 ") and closed, "a chunked body too"
    finally:
        nodes.close()
        gateways.close()


def test_the_idle_timeout_closes_a_lean_connection_as_it_does_twisted_web_s(nodes: Pair) -> None:
    for world in (nodes.old, nodes.new):
        protocol, transport = world.connect()
        world.clock.advance(59)
        protocol.dataReceived(req("GET", "/kv/a"))
        world.clock.advance(59)
        assert not transport.disconnecting, "each request starts the idle period again"
        protocol.dataReceived(b"GET /kv/a HTTP/1.1\r\n")  # dribbled, never finished
        world.clock.advance(61)
        assert transport.disconnecting
        protocol.connectionLost(None)


def test_a_slow_answer_is_not_cut_off_by_the_idle_timeout(nodes: Pair) -> None:
    version = _written(nodes, "i")
    for world in (nodes.old, nodes.new):
        protocol, transport = world.connect()
        protocol.dataReceived(req("GET", "/kv/i?wait=200&version=" + version))
        world.clock.advance(150)
        assert not transport.disconnecting
        world.clock.advance(51)
        assert b"200 OK" in transport.value() and not transport.disconnecting
        world.clock.advance(59)
        assert not transport.disconnecting, "the idle period starts when the answer is written"
        world.clock.advance(2)
        assert transport.disconnecting
        protocol.connectionLost(None)


def test_a_client_that_pipelines_much_is_read_no_further(nodes: Pair) -> None:
    version = _written(nodes, "p")
    protocol, transport = nodes.new.connect()
    protocol.dataReceived(req("GET", "/kv/p?wait=100&version=" + version))
    protocol.dataReceived(req("GET", "/kv/p") * 10)
    assert transport.producerState == "producing"
    protocol.dataReceived(req("GET", "/kv/p") * 1000)
    assert transport.producerState == "paused"
    nodes.new.clock.advance(101)
    assert transport.producerState == "producing"
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1011, "all answered once the first is"
    protocol.connectionLost(None)


#: Pieces hypothesis builds requests of: the hot ones, and what can go wrong in them.
_PIECES = st.sampled_from(
    [
        *SCRIPT,
        *NODE_REQUESTS[:3],
        b"GET /kv/a HTTP/1.1\r\n",
        b"GET /healthz HTTP/1.1\r\n\r\n",
        b"HEAD /kv/s HTTP/1.1\r\n\r\n",
        b"PUT /kv/",
        b"Content-Length: 3\r\n",
        b"Content-Length: 99999\r\n",
        b"Transfer-Encoding: chunked\r\n",
        b"Connection: close\r\n",
        b"If-Match: *\r\n",
        b"\r\n",
        b"\r\n\r\n",
        b"abc",
        b"?wait=1",
        b"%",
        b" ",
        b"\n",
        b"\x00",
    ]
)


def _answers_as_twisted_web_does(world: Any, data: bytes, cut: int) -> None:
    """C{data}, cut in two at C{cut}, after a first request: the answers twisted.web gives, and no error logged."""
    with tempfile.TemporaryDirectory() as directory:
        pair = Pair(world, Path(directory))
        try:
            with capturedLogs() as events:
                try:
                    pair.exchange([SCRIPT[0], data[:cut], data[cut:]], then=lambda world: world.clock.advance(2))
                except AssertionError as e:
                    raise AssertionError(f"sent {data!r} cut at {cut}") from e
        finally:
            pair.close()
    assert not [e for e in events if "log_failure" in e], "no error was logged"


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.one_of(_PIECES, st.binary(max_size=12)), max_size=8), cut=st.integers(0, 400))
def test_any_bytes_get_the_answers_twisted_web_gives_and_never_an_error(pieces: list[bytes], cut: int) -> None:
    _answers_as_twisted_web_does(node_world, b"".join(pieces), cut)


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.one_of(_PIECES, st.binary(max_size=12)), max_size=8), cut=st.integers(0, 400))
def test_a_gateway_given_any_bytes_answers_as_twisted_web_and_never_errs(pieces: list[bytes], cut: int) -> None:
    _answers_as_twisted_web_does(gateway_world, b"".join(pieces), cut)


class _FullTransport(StringTransport):
    """A transport whose send buffer can be full: it pauses its producer at each write then, as a TCP one does."""

    full = False
    paused_producer = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None and self.streaming:
            self.paused_producer = True
            self.producer.pauseProducing()

    def drain(self) -> None:
        """The client read it all: the transport tells its producer, if it paused it."""
        self.full = False
        if self.producer is not None and self.paused_producer:
            self.paused_producer = False
            self.producer.resumeProducing()


def test_a_connection_reads_again_when_its_answers_drain_after_a_lent_one(nodes: Pair) -> None:
    """
    A client pipelines a hot request and one of another route while it reads nothing: the
    transport's buffer is full at both answers. Once it drains, the connection reads again,
    as twisted.web's does (it once stayed paused for good, the next request never read).
    """
    nodes.exchange([req("PUT", "/kv/f", b"1")])
    for world in (nodes.old, nodes.new):
        protocol = world.site.buildProtocol(None)
        transport = _FullTransport()
        protocol.makeConnection(transport)
        transport.full = True
        protocol.dataReceived(req("GET", "/kv/f") + req("GET", "/healthz"))
        assert transport.value().count(b"HTTP/1.1 200 OK") == 2
        transport.drain()
        assert transport.producerState == "producing", f"{type(protocol).__name__} reads again"
        protocol.connectionLost(Failure(ConnectionDone()))


def test_a_head_through_the_gateway_answers_as_its_get_would(gateways: Pair) -> None:
    # HEAD goes through Klein, which takes the handler's answer as a Deferred, not written by the front door.
    gateways.exchange([req("PUT", "/kv/h", b"v")])
    present, _ = gateways.exchange([req("HEAD", "/kv/h")])
    absent, _ = gateways.exchange([req("HEAD", "/kv/absent")])
    assert present.startswith(b"HTTP/1.1 200 ") and b'ETag: "' in present
    assert absent.startswith(b"HTTP/1.1 404 ")
