"""
What a key and a value are, for every role: the client API's validation rules, and the
domain errors that the HTTP layer maps to status codes.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

MAX_KEY_BYTES = 512
DEFAULT_MAX_VALUE_BYTES = 1024 * 1024
#: Characters of values in one internal batch (a request, or a node's answer to a read)
#: before the rest wait for the next: one value over it still goes, alone.
BATCH_VALUE_BUDGET = 4 * 1024 * 1024
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class ClientError(Exception):
    """A request the client must change; the message is shown to the client."""


class BadKey(ClientError):
    pass


class BadValue(ClientError):
    pass


class ValueTooLarge(ClientError):
    pass


class NotFound(ClientError):
    pass


class Unavailable(Exception):
    """The request was fine but cannot be served now; shown to the client with a 503."""


def internal_message_limit(max_value_bytes: int) -> int:
    """
    The largest internal message (an apply batch, a read answer) that values of up to
    C{max_value_bytes} make: the batch's value budget plus one largest value, each byte of
    which JSON may escape to six (a control character), plus the keys of a whole batch.
    """
    return 6 * (BATCH_VALUE_BUDGET + max_value_bytes) + 512 * 6 * (MAX_KEY_BYTES + 64)


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


class PreconditionFailed(ClientError):
    """A conditional write's precondition does not hold; carries the key's current version (None: absent)."""

    def __init__(self, message: str, current: str | None) -> None:
        super().__init__(message)
        self.current = current


class Precondition:
    """
    What a conditional write needs of its key: C{If-Match} (a version, or C{*}: any live
    entry) or C{If-None-Match: *} (absent).
    """

    __slots__ = ("absent", "match")

    def __init__(self, match: str | None = None, absent: bool = False) -> None:
        self.match = match
        self.absent = absent

    def __repr__(self) -> str:
        return "If-None-Match: *" if self.absent else f"If-Match: {self.match}"

    def check(self, value: str | None, version: str | None) -> None:
        """
        @param value: the key's current value (None: absent or a tombstone) and C{version} its version.
        @raise PreconditionFailed: with the current version (None when not live) unless it holds.
        """
        current = version if value is not None else None
        if self.absent:
            if current is not None:
                raise PreconditionFailed("If-None-Match: * failed: the key exists", current)
        elif current is None:
            raise PreconditionFailed("If-Match failed: the key does not exist", None)
        elif self.match != "*" and self.match != current:
            raise PreconditionFailed(f"If-Match failed: the current version is {current}", current)


def _entity_tag(raw: str) -> str:
    tag = raw.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    if len(tag) >= 2 and tag[0] == tag[-1] == '"':
        tag = tag[1:-1]
    if not tag or '"' in tag or "," in tag:
        raise ClientError(f'If-Match takes one version, as "VERSION" or *: not {raw!r}')
    return tag


def parse_precondition(
    if_match: bytes | None, if_none_match: bytes | None, delete: bool = False
) -> Precondition | None:
    """
    The precondition of a PUT or DELETE from its C{If-Match} and C{If-None-Match} headers (None: none).

    C{If-Match} takes one version, quoted or not, a C{W/} prefix ignored, or C{*};
    C{If-None-Match} takes only C{*}, and only on a PUT.

    @raise ClientError: when the headers are not one of those.
    """
    if if_match is None and if_none_match is None:
        return None
    if if_match is not None and if_none_match is not None:
        raise ClientError("give If-Match or If-None-Match, not both")
    if if_none_match is not None:
        if delete:
            raise ClientError("a DELETE takes If-Match, not If-None-Match")
        if if_none_match.strip() != b"*":
            raise ClientError("If-None-Match takes only *: write only if the key is absent")
        return Precondition(absent=True)
    assert if_match is not None
    raw = if_match.decode("utf-8", "replace")
    return Precondition("*" if raw.strip() == "*" else _entity_tag(raw))
