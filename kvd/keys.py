"""
What a key and a value are, for every role: the client API's validation rules, and the
domain errors that the HTTP layer maps to status codes.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

MAX_KEY_BYTES = 512
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class ClientError(Exception):
    """A request the client must change; the message is shown to the client."""

    status = 400


class BadKey(ClientError):
    pass


class BadValue(ClientError):
    pass


class ValueTooLarge(ClientError):
    status = 413


class NotFound(ClientError):
    status = 404


class Unavailable(Exception):
    """The request was fine but cannot be served now; shown to the client with a 503."""

    status = 503


def parse_key(raw: bytes) -> str:
    """
    Turn the still percent-encoded path segment after C{/kv/} into a key.

    @raise BadKey: unless it is one segment that decodes to 1 to 512 bytes of UTF-8 with no
        control characters.
    """
    if b"/" in raw:
        raise BadKey("a key is one URL path segment: encode '/' in a key as %2F")
    if _BAD_ESCAPE.search(raw):
        raise BadKey("a key has a '%' that is not a percent-encoding: encode '%' as %25")
    decoded = unquote_to_bytes(raw)
    if not 1 <= len(decoded) <= MAX_KEY_BYTES:
        raise BadKey(f"a key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8 (this one is {len(decoded)})")
    try:
        key = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadKey("a key must be valid UTF-8 once percent-decoded") from None
    if _CONTROL.search(key):
        raise BadKey("a key must not contain control characters")
    return key


def check_key(key: object) -> str:
    """A key that arrived decoded (in a JSON batch); the same rules as L{parse_key}."""
    if not isinstance(key, str):
        raise BadKey("a key must be a string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise BadKey("a key must be valid UTF-8") from None
    if not 1 <= size <= MAX_KEY_BYTES or _CONTROL.search(key):
        raise BadKey(f"a key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8 with no control characters")
    return key


def parse_value(body: bytes, limit: int) -> str:
    """
    Turn a request body into a value.

    @raise ValueTooLarge: when it is over C{limit} bytes.
    @raise BadValue: when it is not UTF-8.
    """
    if len(body) > limit:
        raise ValueTooLarge(f"the value is {len(body)} bytes; the limit is {limit}")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadValue("a value must be UTF-8 text") from None


def max_internal_bytes(max_value_bytes: int) -> int:
    """
    The most a node's answer to an internal call about one key can take, for values of up to
    C{max_value_bytes}: JSON escapes a control character to six bytes (C{\\u0000}), and the
    key, version and envelope fit in the margin. What the gateway caps a peer's answer at.
    """
    return 6 * max_value_bytes + 64 * 1024
