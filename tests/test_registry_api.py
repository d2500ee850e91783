"""The registry's HTTP API, exactly as DESIGN.md gives it, through StubTreq on a Clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from kvd.registry import Registry
from kvd.resources import RegistryAPI

BASE = "http://registry.test"


class Client:
    def __init__(self) -> None:
        self.clock = Clock()
        self.registry = Registry(10.0)
        self.stub = StubTreq(RegistryAPI(self.registry, self.clock).resource())

    def start(self, method: str, path: str, body: object = None) -> list[Any]:
        """Start a request; the returned list gets (status, JSON) when it completes."""

        async def go() -> tuple[int, Any]:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            response = await self.stub.request(method, BASE + path, data=data)
            return response.code, json.loads(await response.content())

        results: list[Any] = []
        d: Deferred[Any] = ensureDeferred(go())
        d.addBoth(results.append)
        self.stub.flush()
        return results

    def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        results = self.start(method, path, body)
        assert results, "no answer"
        return results[0]  # type: ignore[no-any-return]

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.stub.flush()


@pytest.fixture
def client() -> Client:
    return Client()


def test_register_answers_the_ttl_and_lists_the_member(client: Client) -> None:
    assert client.call("PUT", "/registry/nodes/a", {"url": "http://127.0.0.1:5001", "weight": 1}) == (
        200,
        {"success": True, "ttl": 10.0},
    )
    status, body = client.call("GET", "/registry/nodes")
    assert status == 200
    assert body["success"] is True and isinstance(body["index"], int)
    assert body["nodes"] == [{"id": "a", "url": "http://127.0.0.1:5001", "weight": 1, "status": "up"}]


@pytest.mark.parametrize(
    "body",
    [b"not json", {"weight": 1}, {"url": "ftp://x"}, {"url": "http://x", "weight": 0}, [1, 2]],
)
def test_bad_registrations_get_400_and_change_nothing(client: Client, body: object) -> None:
    status, answer = client.call("PUT", "/registry/nodes/a", body)
    assert status == 400 and answer["success"] is False and answer["error"]
    assert client.call("GET", "/registry/nodes")[1]["nodes"] == []


def test_a_bad_node_id_gets_400(client: Client) -> None:
    assert client.call("PUT", "/registry/nodes/..", {"url": "http://x:1"})[0] == 400


def test_a_heartbeat_from_an_older_incarnation_gets_409(client: Client) -> None:
    client.call("PUT", "/registry/nodes/a", {"url": "http://new:1", "incarnation": 5})
    status, body = client.call("PUT", "/registry/nodes/a", {"url": "http://old:1", "incarnation": 4})
    assert status == 409 and body["success"] is False
    assert body["incarnation"] == 5, "the answer says which incarnation to move past"
    assert client.call("GET", "/registry/nodes")[1]["nodes"][0]["url"] == "http://new:1"


def test_leave_removes_the_member_and_unknown_is_404(client: Client) -> None:
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    assert client.call("DELETE", "/registry/nodes/a")[0] == 200
    assert client.call("GET", "/registry/nodes")[1]["nodes"] == []
    assert client.call("DELETE", "/registry/nodes/a")[0] == 404


def statuses(client: Client, query: str = "") -> dict[str, str]:
    return {n["id"]: n["status"] for n in client.call("GET", "/registry/nodes" + query)[1]["nodes"]}


def test_a_lease_not_renewed_within_the_ttl_is_marked_down_and_kept(client: Client) -> None:
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    client.advance(6)
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})  # renewal
    client.advance(6)
    assert statuses(client) == {"a": "up"}
    client.advance(5)
    assert statuses(client) == {"a": "down"}
    assert statuses(client, "?status=up") == {}
    assert statuses(client, "?status=down") == {"a": "down"}
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    assert statuses(client, "?status=up") == {"a": "up"}, "a renewal marks it up again"


def test_a_down_member_is_removed_by_delete(client: Client) -> None:
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    client.advance(11)
    assert statuses(client) == {"a": "down"}
    assert client.call("DELETE", "/registry/nodes/a") == (200, {"success": True, "id": "a"})
    assert statuses(client) == {}


def test_a_down_member_is_forgotten_after_forget_after() -> None:
    client = Client()
    client.registry = Registry(10.0, forget_after=30.0)
    client.stub = StubTreq(RegistryAPI(client.registry, client.clock).resource())
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    client.advance(39)
    assert statuses(client) == {"a": "down"}
    client.advance(1)
    assert statuses(client) == {}


@pytest.mark.parametrize("query", ["status=gone", "status=", "status=UP", "index=1&wait=0&status=x"])
def test_a_status_filter_other_than_up_or_down_gets_400(client: Client, query: str) -> None:
    status, body = client.call("GET", f"/registry/nodes?{query}")
    assert status == 400 and body["success"] is False and "status" in body["error"]


def test_a_long_poll_answers_when_the_index_passes(client: Client) -> None:
    index = client.call("GET", "/registry/nodes")[1]["index"]
    waiting = client.start("GET", f"/registry/nodes?index={index}&wait=30")
    client.advance(5)
    assert waiting == []
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    assert len(waiting) == 1
    status, body = waiting[0]
    assert status == 200 and body["index"] > index and [n["id"] for n in body["nodes"]] == ["a"]


def test_a_long_poll_answers_after_wait_seconds_when_nothing_changes(client: Client) -> None:
    index = client.call("GET", "/registry/nodes")[1]["index"]
    waiting = client.start("GET", f"/registry/nodes?index={index}&wait=3")
    client.advance(2.5)
    assert waiting == []
    client.advance(1)
    assert waiting and waiting[0][0] == 200 and waiting[0][1]["index"] == index


def test_a_long_poll_sees_an_expiry(client: Client) -> None:
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    index = client.call("GET", "/registry/nodes")[1]["index"]
    waiting = client.start("GET", f"/registry/nodes?index={index}&wait=60")
    client.advance(11)
    client.registry.expire(client.clock.seconds())  # what the registry's timer does
    client.stub.flush()
    assert waiting and waiting[0][1]["nodes"] == [{"id": "a", "url": "http://x:1", "weight": 1, "status": "down"}]


def test_a_long_poll_sees_a_down_member_come_back_up(client: Client) -> None:
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    client.advance(11)
    index = client.call("GET", "/registry/nodes")[1]["index"]
    waiting = client.start("GET", f"/registry/nodes?index={index}&wait=60")
    client.call("PUT", "/registry/nodes/a", {"url": "http://x:1"})
    assert waiting and waiting[0][1]["index"] > index
    assert waiting[0][1]["nodes"][0]["status"] == "up"


@pytest.mark.parametrize("query", ["index=x", "index=1&wait=-1", "index=1&wait=nan"])
def test_bad_long_poll_arguments_get_400(client: Client, query: str) -> None:
    assert client.call("GET", f"/registry/nodes?{query}")[0] == 400
