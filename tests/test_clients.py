"""
kvd.TwistedClient against the fake gateway in memory (StubTreq: no sockets), and the shared
model of answers and errors that kvd.Client uses too.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

import kvd
from kvd.clients import BatchItem, Entry, _lines, entry_line, error_for, key_path
from kvd.testing.fake_gateway import FakeGateway

T = TypeVar("T")


def done(coroutine: Coroutine[Any, Any, T], stub: StubTreq) -> T:
    """Run a client coroutine to its end on the stub's in-memory network."""
    results: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(results.append)
    stub.flush()
    assert results, "the call did not finish"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]  # type: ignore[no-any-return]


@pytest.fixture
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture
def stub(fake: FakeGateway) -> StubTreq:
    return StubTreq(fake.resource())


@pytest.fixture
def client(stub: StubTreq) -> kvd.TwistedClient:
    return kvd.TwistedClient(Clock(), "http://gw.test", http=stub)


def test_put_then_get_gives_the_value_and_version(client: kvd.TwistedClient, stub: StubTreq) -> None:
    written = done(client.put("a/b c", "1", ttl=30), stub)
    assert written.version and written.replicas == ("a",) and written.expires is not None
    entry = done(client.get("a/b c"), stub)
    assert entry == Entry("a/b c", "1", written.version)


def test_each_failure_is_the_exception_named_for_it(
    client: kvd.TwistedClient, stub: StubTreq, fake: FakeGateway
) -> None:
    with pytest.raises(kvd.NotFound):
        done(client.get("absent"), stub)
    with pytest.raises(kvd.NotFound):
        done(client.delete("absent"), stub)
    done(client.put("k", "v"), stub)
    with pytest.raises(kvd.PreconditionFailed) as lost:
        done(client.put("k", "w", if_absent=True), stub)
    assert lost.value.status == 412 and lost.value.current_version == fake.data["k"][1]
    fake.fail_writes = 503
    with pytest.raises(kvd.Unavailable) as unavailable:
        done(client.put("k", "w"), stub)
    error = unavailable.value
    assert (error.answered, error.needed, error.replicas, error.partial) == (1, 2, ("a",), True)


def test_a_wrong_token_is_unauthorized() -> None:
    stub = StubTreq(FakeGateway(token="right").resource())
    with pytest.raises(kvd.Unauthorized):
        done(kvd.TwistedClient(Clock(), "http://gw.test", token="wrong", http=stub).get("k"), stub)
    assert done(kvd.TwistedClient(Clock(), "http://gw.test", token="right", http=stub).cluster(), stub)["success"]


def test_list_iterates_over_every_page(client: kvd.TwistedClient, stub: StubTreq, fake: FakeGateway) -> None:
    for i in range(25):
        fake._write(f"p{i:02d}", "v")
    fake._write("q", "v")

    async def gather() -> list[str]:
        return [key async for key in client.list("p", limit=10)]

    assert done(gather(), stub) == [f"p{i:02d}" for i in range(25)]
    assert [t for m, t in fake.log if t.startswith("/kv?")][-1].count("after=p19") == 1


def test_update_retries_until_its_conditional_write_wins(
    client: kvd.TwistedClient, stub: StubTreq, fake: FakeGateway
) -> None:
    done(client.put("counter", "1"), stub)
    fake.interfere["counter"] = 2  # two other writers get in first
    written = done(client.update("counter", lambda v: str(int(v or "0") + 1) if v != "someone else's" else "7"), stub)
    assert written.value == "7" and fake.data["counter"][0] == "7"
    assert sum(1 for m, t in fake.log if m == "PUT") == 4


def test_update_of_an_absent_key_writes_only_if_still_absent(client: kvd.TwistedClient, stub: StubTreq) -> None:
    assert done(client.update("new", lambda v: "first" if v is None else v + "!"), stub).value == "first"


def test_batch_gives_each_key_its_own_answer(client: kvd.TwistedClient, stub: StubTreq) -> None:
    results = done(client.batch(get=["nope"], put={"x": "1"}), stub)
    assert results["nope"].status == 404 and not results["nope"].ok
    assert results["x"].ok and results["x"].body["version"]


def test_watch_yields_the_next_version(client: kvd.TwistedClient, stub: StubTreq, fake: FakeGateway) -> None:
    first = done(client.put("w", "1"), stub)
    fake.interfere["w"] = 0  # the fake writes behind the watcher's back while it waits

    async def next_change() -> Entry | None:
        async for entry in client.watch("w", version=first.version):
            return entry
        return None

    entry = done(next_change(), stub)
    assert entry is not None and entry.value == "changed-by-someone" and entry.version != first.version


def test_changes_and_the_operator_views(client: kvd.TwistedClient, stub: StubTreq) -> None:
    page = done(client.changes(cursor="0"), stub)
    done(client.put("c", "1"), stub)
    later = done(client.changes(cursor=page.next), stub)
    assert [c.key for c in later.changes] == ["c"]
    assert done(client.owners("c"), stub) == ["a"]
    assert done(client.plan(join="z:2"), stub)["moves"][0]["to"] == "z"
    with pytest.raises(kvd.BadRequest):
        done(client.plan(), stub)
    assert done(client.hot(1), stub)["keys"][0]["key"] == "k"


def test_export_then_import_round_trips_every_entry(
    client: kvd.TwistedClient, stub: StubTreq, fake: FakeGateway
) -> None:
    for i in range(5):
        done(client.put(f"e{i}", f"v{i}"), stub)
    exported = done(client.export(), stub)
    fake.data.clear()
    assert done(client.import_entries(exported), stub)["imported"] == 5
    assert done(client.export(), stub) == exported


def test_a_gateway_that_is_not_there_is_connection_failed() -> None:
    from twisted.internet.error import ConnectionRefusedError

    class Refusing:
        def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            d.errback(ConnectionRefusedError())
            return d

    results: list[Any] = []
    client = kvd.TwistedClient(Clock(), "http://gw.test", http=Refusing())
    Deferred.fromCoroutine(client.get("k")).addErrback(results.append)
    assert results[0].check(kvd.ConnectionFailed)


# --- the shared model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, kvd.BadRequest),
        (401, kvd.Unauthorized),
        (404, kvd.NotFound),
        (412, kvd.PreconditionFailed),
        (413, kvd.TooLarge),
        (503, kvd.Unavailable),
        (500, kvd.ServerError),
        (418, kvd.KvdError),
    ],
)
def test_every_status_maps_to_its_exception(status: int, kind: type[kvd.KvdError]) -> None:
    error = error_for(status, b'{"success": false, "error": "why"}', "get 'k'")
    assert type(error) is kind and str(error) == "get 'k': why" and error.status == status


def test_an_answer_that_is_not_json_is_still_a_clear_error() -> None:
    error = error_for(502, b"<html>bad gateway</html>", "get 'k'")
    assert isinstance(error, kvd.ServerError) and "HTTP 502" in str(error) and "bad gateway" in str(error)


def test_keys_are_sent_as_one_encoded_path_segment() -> None:
    assert key_path("a/b%c d") == "/kv/a%2Fb%25c%20d"
    with pytest.raises(kvd.BadRequest):
        key_path("")


def test_ndjson_lines_are_read_whatever_the_chunks() -> None:
    entries = [Entry("a", "1", "v1"), Entry("b", "é\n", "v2")]
    raw = b"".join(entry_line(e) for e in entries)
    assert list(_lines(raw[i : i + 3] for i in range(0, len(raw), 3))) == entries


def test_batch_item_is_ok_below_300() -> None:
    assert BatchItem("k", 200, {}).ok and not BatchItem("k", 404, {}).ok


def test_an_entry_keeps_the_encoding_and_content_type_of_a_typed_value_through_an_export_line() -> None:
    line = b'{"key": "img", "value": "AP8=", "encoding": "base64", "content_type": "image/png", "version": "v1"}\n'
    (entry,) = list(_lines([line]))
    assert (entry.value, entry.encoding, entry.content_type) == ("AP8=", "base64", "image/png")
    assert entry_line(entry) == line, "written back exactly as read, so kvd import restores the type"
    (plain,) = list(_lines([b'{"key": "t", "value": "hi", "version": "v1"}\n']))
    assert plain.encoding is None and plain.content_type is None
    assert entry_line(plain) == b'{"key": "t", "value": "hi", "version": "v1"}\n'
