"""
The ``kvd`` command through click's CliRunner, its blocking client's requests answered in
memory by the fake gateway (no sockets): what it sends, prints and exits with.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import urllib3
from click.testing import CliRunner, Result

from kvd.cli import main
from kvd.testing.fake_gateway import FakeGateway


class _Response:
    def __init__(self, status: int, data: bytes) -> None:
        self.status, self.data = status, data

    def read(self) -> bytes:
        return self.data

    def release_conn(self) -> None:
        pass


class InMemoryPool:
    """A urllib3 PoolManager whose every request the fake gateway answers."""

    def __init__(self, gateway: FakeGateway) -> None:
        self.gateway = gateway
        self.bodies: list[bytes] = []

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kw: Any) -> _Response:
        data = body if isinstance(body, bytes) else b"".join(body or ())
        self.bodies.append(data)
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        status, _, out = self.gateway.handle(method, target, dict(headers or {}), data)
        return _Response(status, out)

    def clear(self) -> None:
        pass


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemoryPool]:
    stub = InMemoryPool(FakeGateway())
    monkeypatch.setattr(urllib3, "PoolManager", lambda **kw: stub)
    yield stub


def kvd(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


BINARY = bytes(range(256)) + b"\xff\xfe\x00 not UTF-8"


def test_put_from_standard_input_stores_any_bytes_exactly_and_get_raw_gives_them_back(pool: InMemoryPool) -> None:
    put = kvd("put", "blob", "-", stdin=BINARY)
    assert put.exit_code == 0, put.output
    assert pool.bodies[-1] == BINARY, "the bytes are sent as read, not decoded or re-encoded"
    got = kvd("get", "--raw", "blob")
    assert got.exit_code == 0 and got.stdout_bytes == BINARY, "written exactly: no newline, no base64"
    shown = json.loads(kvd("--json", "get", "blob").output)
    assert shown["encoding"] == "base64", "--json says the value is bytes, in base64"


def test_text_from_standard_input_and_get_raw_of_text(pool: InMemoryPool) -> None:
    assert kvd("put", "t", "-", stdin="héllo\n".encode()).exit_code == 0
    assert kvd("get", "t").output == "héllo\n\n", "text printed as before, with click's newline"
    assert kvd("get", "--raw", "t").stdout_bytes == "héllo\n".encode()


def test_an_argument_that_is_not_utf_8_is_stored_as_the_bytes_the_shell_gave(pool: InMemoryPool) -> None:
    # Python decodes such an argument with surrogate escapes: the bytes go out as they came in.
    assert kvd("put", "arg", b"\xff\xfeab".decode("utf-8", "surrogateescape")).exit_code == 0
    assert pool.bodies[-1] == b"\xff\xfeab"
    assert kvd("get", "--raw", "arg").stdout_bytes == b"\xff\xfeab"


def test_get_raw_with_json_is_a_usage_error(pool: InMemoryPool) -> None:
    result = kvd("--json", "get", "--raw", "k")
    assert result.exit_code == 2 and "give --raw or --json, not both" in result.output
    assert pool.bodies == [], "nothing was asked"


def test_ls_values_prints_bytes_in_base64_as_get_does_and_text_as_it_is(pool: InMemoryPool) -> None:
    assert kvd("put", "b/blob", "-", stdin=BINARY).exit_code == 0
    assert kvd("put", "b/text", "plain words").exit_code == 0
    got = kvd("get", "b/blob")
    listed = kvd("ls", "b/", "--values")
    assert listed.exit_code == 0, listed.output
    assert listed.output.splitlines() == [f"b/blob\t{got.output.strip()}", "b/text\tplain words"]
    assert base64.b64decode(got.output.strip()) == BINARY
