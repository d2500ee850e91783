"""Keys as they arrive in a URL path: the fast path for a key with no percent-encoding decides as the slow one."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import pytest

from kvd.keys import MAX_KEY_BYTES, BadKey, parse_key


def _reference(raw: bytes) -> str:
    """parse_key as it was before its fast path: every key percent-decoded and searched."""
    if b"/" in raw:
        raise BadKey("slash")
    if re.search(rb"%(?![0-9A-Fa-f]{2})", raw):
        raise BadKey("escape")
    decoded = unquote_to_bytes(raw)
    if not 1 <= len(decoded) <= MAX_KEY_BYTES:
        raise BadKey("length")
    key = decoded.decode("utf-8")  # UnicodeDecodeError: parse_key's BadKey
    if re.search("[\x00-\x1f\x7f-\x9f]", key):
        raise BadKey("control")
    return key


@pytest.mark.parametrize(
    "raw",
    [
        b"key1",
        b"a b~!*'()",
        b"caf\xc3\xa9",
        b"caf%C3%A9",
        b"a%2Fb",
        b"a%25",
        b"%zz",
        b"a%",
        b"a%0",
        b"",
        b"x" * MAX_KEY_BYTES,
        b"x" * (MAX_KEY_BYTES + 1),
        b"\xff",
        b"a\x01",
        b"a%01",
        b"a\x7f",
        "a\u0085".encode(),
        "a\u00a0".encode(),
        b"a/b",
    ],
)
def test_a_key_is_taken_or_refused_as_before(raw: bytes) -> None:
    try:
        expected: str | None = _reference(raw)
    except (BadKey, UnicodeDecodeError):
        expected = None
    if expected is None:
        with pytest.raises(BadKey):
            parse_key(raw)
    else:
        assert parse_key(raw) == expected
