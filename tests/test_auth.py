"""The cluster secret and the client token: who may call what, and that nothing leaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from kvd.auth import Auth, BadSecretFile, bearer, read_secret
from kvd.registry import Registry
from kvd.resources import NodeAPI, RegistryAPI
from kvd.store import Store
from kvd.versions import HybridClock

SECRET = b"s3cret-cluster"
TOKEN = b"client-t0ken"


def call(stub: StubTreq, method: str, url: str, body: bytes | None = None, token: bytes | None = None) -> Any:
    headers = {b"Authorization": [b"Bearer " + token]} if token else {}

    async def go() -> tuple[int, Any, Any]:
        response = await stub.request(method, url, data=body, headers=headers)
        return response.code, json.loads(await response.content()), response.headers

    results: list[Any] = []
    ensureDeferred(go()).addBoth(results.append)
    stub.flush()
    return results[0]


@pytest.mark.parametrize(
    ("path", "header", "allowed"),
    [
        (b"/registry/nodes", None, False),
        (b"/registry/nodes/a", b"Bearer wrong", False),
        (b"/registry/nodes/a", b"Bearer " + SECRET, True),
        (b"/internal/anything", None, False),
        (b"/internal/anything", b"Bearer " + SECRET, True),
        (b"/kv/k", None, False),
        (b"/kv/k", b"Bearer " + TOKEN, True),
        (b"/kv/k", b"Bearer " + SECRET, True),
        (b"/kv/k", b"Basic " + TOKEN, False),
        (b"/healthz", None, True),
        (b"/metrics", None, True),
    ],
)
def test_what_needs_which_token(path: bytes, header: bytes | None, allowed: bool) -> None:
    assert Auth(SECRET, TOKEN).allows(path, header) is allowed


def test_without_secrets_everything_is_open() -> None:
    assert Auth().allows(b"/registry/nodes/a", None) and Auth().allows(b"/kv/k", None)


def test_the_registry_refuses_a_rogue_registration_and_changes_nothing() -> None:
    registry = Registry(10)
    stub = StubTreq(RegistryAPI(registry, Clock(), auth=Auth(SECRET)).resource())
    body = json.dumps({"url": "http://rogue:1"}).encode()
    status, answer, headers = call(stub, "PUT", "http://r/registry/nodes/rogue", body)
    assert status == 401 and answer["success"] is False
    assert headers.getRawHeaders(b"www-authenticate") == [b'Bearer realm="kvd"']
    assert SECRET.decode() not in json.dumps(answer)
    assert registry.members() == [] and registry.index == 1
    assert call(stub, "GET", "http://r/registry/nodes")[0] == 401
    assert call(stub, "PUT", "http://r/registry/nodes/good", body, token=SECRET)[0] == 200
    assert [m.id for m in registry.members()] == ["good"]


def test_a_client_token_guards_the_key_value_api_only(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), clock=HybridClock(Clock().seconds, "a"))
    try:
        stub = StubTreq(NodeAPI("a", store, auth=Auth(SECRET, TOKEN)).resource())
        assert call(stub, "PUT", "http://n/kv/k", b"v")[0] == 401
        assert store.get("k") is None
        assert call(stub, "PUT", "http://n/kv/k", b"v", token=TOKEN)[0] == 200
        assert call(stub, "GET", "http://n/kv/k", token=SECRET)[0] == 200, "a gateway forwards with the secret"
        assert call(stub, "GET", "http://n/healthz")[0] == 200
    finally:
        store.abandon()


def test_a_client_token_guards_every_way_to_the_data_not_only_single_keys() -> None:
    """The change feed and export read every value, import writes: none is open while /kv/ is closed."""
    auth = Auth(client_token=TOKEN)
    for path in (b"/kv", b"/batch", b"/changes", b"/export", b"/import", b"/kv/k", b"/cluster/key/k"):
        assert not auth.allows(path, None), path
        assert not auth.allows(path, b"Bearer wrong"), path
        assert auth.allows(path, bearer(TOKEN)), path
    for path in (b"/healthz", b"/readyz", b"/metrics", b"/ui", b"/cluster", b"/cluster/ring"):
        assert auth.allows(path, None), path


def test_secret_files_are_read_stripped_and_checked(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_bytes(b"  abc123\n")
    assert read_secret(str(good), "cluster secret") == b"abc123"
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    with pytest.raises(BadSecretFile, match="is empty"):
        read_secret(str(empty), "cluster secret")
    with pytest.raises(BadSecretFile, match="cannot read"):
        read_secret(str(tmp_path / "missing"), "cluster secret")
    spaced = tmp_path / "spaced"
    spaced.write_bytes(b"two words")
    with pytest.raises(BadSecretFile) as e:
        read_secret(str(spaced), "cluster secret")
    assert "two words" not in str(e.value), "never show a secret"


def test_auth_never_shows_its_secrets() -> None:
    assert SECRET.decode() not in repr(Auth(SECRET, TOKEN)) and TOKEN.decode() not in repr(Auth(SECRET, TOKEN))
