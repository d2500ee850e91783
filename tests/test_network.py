"""The production transport against real twisted.web Sites over the in-memory network."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from kvd.keys import internal_message_limit
from kvd.testing.network import Network
from kvd.transport import Answer, PeerTimeout, PeerUnreachable


class Echo(Resource):
    """Answers with the method, path, Host header and body; chunked unless asked for a length."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        body = json.dumps(
            {
                "method": request.method.decode(),
                "path": request.uri.decode(),
                "host": request.getHeader("host"),
                "body": request.content.read().decode(),
            }
        ).encode()
        if b"length" in request.uri:
            return body
        for i in range(0, len(body), 7):
            request.write(body[i : i + 7])  # no Content-Length: the Site answers chunked
        request.finish()
        return NOT_DONE_YET


class Hang(Resource):
    isLeaf = True

    def render(self, request: Any) -> Any:
        return NOT_DONE_YET


def call(network: Network, peers: Any, method: str, url: str, body: bytes | None = None) -> list[Any]:
    results: list[Any] = []
    peers.call(method, url, body).addBoth(results.append)
    network.flush()
    return results


def test_calls_reach_a_real_site_and_its_chunked_and_sized_answers_are_read() -> None:
    network = Network(Clock())
    network.serve("a.test", Echo())
    peers = network.peers()
    for path in ("/internal/apply", "/internal/apply?length=1"):
        [answer] = call(network, peers, "POST", f"http://a.test{path}", b'{"items": []}')
        assert isinstance(answer, Answer) and answer.status == 200
        assert answer.json() == {"method": "POST", "path": path, "host": "a.test:80", "body": '{"items": []}'}
    assert len(network.links) == 1, "one kept-alive connection served both"


def test_a_host_that_is_down_refuses_and_its_open_connections_break() -> None:
    network = Network(Clock())
    network.serve("a.test", Echo())
    peers = network.peers()
    assert isinstance(call(network, peers, "GET", "http://a.test/kv/k")[0], Answer)
    network.down.add("a.test")
    [failure] = call(network, peers, "GET", "http://a.test/kv/k")
    assert failure.check(PeerUnreachable) and "a.test" in str(failure.value)
    assert network.links == []
    network.down.discard("a.test")
    assert isinstance(call(network, peers, "GET", "http://a.test/kv/k")[0], Answer)


def test_a_request_in_flight_to_a_host_that_goes_down_is_never_delivered() -> None:
    clock = Clock()
    network = Network(clock)
    seen: list[bytes] = []

    class Record(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request.content.read())
            return b"{}"

    network.serve("a.test", Record())
    peers = network.peers()
    call(network, peers, "POST", "http://a.test/internal/apply", b"first")
    results: list[Any] = []
    peers.call("POST", "http://a.test/internal/apply", b"second").addBoth(results.append)
    network.down.add("a.test")  # the process dies with the request on the wire
    network.flush()
    assert seen == [b"first"] and results[0].check(PeerUnreachable)


def test_a_paused_host_holds_calls_until_resumed_or_timed_out() -> None:
    clock = Clock()
    network = Network(clock)
    network.serve("a.test", Echo())
    peers = network.peers(timeout=2.0)
    network.pause("a.test")
    held = call(network, peers, "GET", "http://a.test/kv/k")
    assert held == []
    network.resume("a.test")
    network.flush()
    assert isinstance(held[0], Answer)
    network.pause("a.test")
    late = call(network, peers, "GET", "http://a.test/kv/k")
    clock.advance(2.1)
    assert late[0].check(PeerTimeout)


def test_a_hung_host_accepts_and_never_answers() -> None:
    clock = Clock()
    network = Network(clock)
    network.serve("slow.test", Hang())
    results = call(network, network.peers(timeout=1.0), "GET", "http://slow.test/kv/k")
    assert results == []
    clock.advance(1.1)
    assert results[0].check(PeerTimeout)


def test_a_cut_is_one_way() -> None:
    network = Network(Clock())
    network.serve("a.test", Echo())
    network.serve("b.test", Echo())
    from_a, from_b = network.peers("a.test"), network.peers("b.test")
    network.cut("a.test", "b.test")
    assert call(network, from_a, "GET", "http://b.test/kv/k")[0].check(PeerUnreachable)
    assert isinstance(call(network, from_b, "GET", "http://a.test/kv/k")[0], Answer)
    network.heal("a.test", "b.test")
    assert isinstance(call(network, from_a, "GET", "http://b.test/kv/k")[0], Answer)


def test_a_host_served_again_is_a_restart_and_old_connections_break() -> None:
    network = Network(Clock())
    network.serve("a.test", Echo())
    peers = network.peers()
    call(network, peers, "GET", "http://a.test/kv/k")
    network.serve("a.test", Echo())
    network.flush()
    assert network.links == []


def test_the_answer_cap_fits_one_entry_of_the_largest_value_of_control_characters() -> None:
    """A node's internal answer about one key, value all control characters, key the longest allowed."""
    clock = Clock()
    network = Network(clock)
    limit = 50_000
    answer = json.dumps(
        {"success": True, "entries": {"\u00e9" * 256: ["\x01" * limit, "0000000000000001-00000001-gw"]}}
    ).encode()

    class Big(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            return answer

    network.serve("a.test", Big())
    assert len(answer) > 6 * limit
    fits = call(network, network.peers(max_answer=internal_message_limit(limit)), "POST", "http://a.test/internal/read")
    assert isinstance(fits[0], Answer) and fits[0].body == answer
    tight = call(network, network.peers(max_answer=6 * limit), "POST", "http://a.test/internal/read")
    assert tight[0].check(PeerUnreachable) and "larger than" in str(tight[0].value)
