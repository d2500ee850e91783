"""
What a key and a value are, for every role: the client API's validation rules, and the
domain errors that the HTTP layer maps to status codes.
"""

from __future__ import annotations

import base64
import binascii
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
    if b"%" not in raw:
        decoded = raw  # what unquote_to_bytes gives back (every PUT and GET comes here)
    elif _BAD_ESCAPE.search(raw):
        raise BadKey("a key has a '%' that is not a percent-encoding: encode '%' as %25")
    else:
        decoded = unquote_to_bytes(raw)
    if not 1 <= len(decoded) <= MAX_KEY_BYTES:
        raise BadKey(f"a key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8 (this one is {len(decoded)})")
    try:
        key = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadKey("a key must be valid UTF-8 once percent-decoded") from None
    if not (key.isascii() and key.isprintable()) and _CONTROL.search(key):
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


#: Values (see L{parse_value}). Inside kvd a value is a C{str}: UTF-8 text with no content
#: type given is the text itself, exactly as before binary values existed; anything else is
#: "typed": TYPED, a kind (C{"b"}: bytes, the payload their base64; C{"t"}: text), the
#: content type given at PUT (C{""}: the kind's default), SEP, the payload. TYPED is a lone
#: surrogate, which text decoded from UTF-8 never holds, so no text value is ever mistaken
#: for a typed one; JSON carries it as C{\\udfff} (encoders use C{surrogatepass}).
TYPED = "\udfff"
VALUE_SEP = "\x1f"
BINARY_TYPE = "application/octet-stream"
TEXT_TYPE = "text/plain; charset=utf-8"
#: Content types that mean "none given": curl's C{-d} and C{--data-binary} send this one.
_NOT_GIVEN = ("application/x-www-form-urlencoded",)
_CONTENT_TYPE = re.compile(r"^[\x20-\x7e]{1,200}$")
_SURROGATE = re.compile("[\ud800-\udfff]")


def typed_value(payload: bytes | str, content_type: str = "") -> str:
    """The value of C{payload} (bytes, or text) with C{content_type} (C{""}: the default)."""
    if isinstance(payload, bytes):
        return TYPED + "b" + content_type + VALUE_SEP + base64.b64encode(payload).decode("ascii")
    if not content_type:
        return payload
    return TYPED + "t" + content_type + VALUE_SEP + payload


def split_typed(value: str) -> tuple[str, str, str]:
    """A typed value's kind, content type (C{""}: default) and payload (base64 for bytes)."""
    cut = value.index(VALUE_SEP)
    return value[1], value[2:cut], value[cut + 1 :]


def content_type_of(header: bytes | None) -> str:
    """
    The content type a PUT gives, as stored (C{""}: none given).

    @raise BadValue: unless it is printable ASCII of at most 200 characters.
    """
    if header is None:
        return ""
    text = header.decode("latin-1").strip()
    if not text or text.split(";")[0].strip().lower() in _NOT_GIVEN:
        return ""
    if not _CONTENT_TYPE.match(text):
        raise BadValue("a Content-Type must be printable ASCII of at most 200 characters")
    return text


def parse_value(body: bytes, limit: int, content_type: bytes | None = None) -> str:
    """
    Turn a request body, and its C{Content-Type} header, into a value.

    UTF-8 with no content type (or C{text/plain; charset=utf-8}, or curl's form default) is
    plain text; other bytes are kept as bytes, with the content type given (C{""} for
    C{application/octet-stream}, their default).

    @raise ValueTooLarge: when it is over C{limit} bytes (the bytes themselves, not their base64).
    @raise BadValue: for a Content-Type that is not printable ASCII.
    """
    if len(body) > limit:
        raise ValueTooLarge(f"the value is {len(body)} bytes; the limit is {limit}")
    given = content_type_of(content_type)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return typed_value(body, "" if given == BINARY_TYPE else given)
    return typed_value(text, "" if given == TEXT_TYPE else given)


def check_value(value: str) -> str:
    """
    A value that arrived in a JSON body (internal writes): text, or a well-formed typed value.

    @raise BadValue: for text holding surrogates or a malformed typed value.
    """
    if value.isascii():
        return value
    if value[:1] == TYPED:
        cut = value.find(VALUE_SEP)
        kind, content_type, payload = value[1:2], value[2:cut], value[cut + 1 :]
        if cut < 2 or kind not in ("b", "t") or (content_type and not _CONTENT_TYPE.match(content_type)):
            raise BadValue("not a typed value")
        if kind == "b":
            try:
                base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise BadValue("a binary value's payload must be base64") from None
        elif _SURROGATE.search(payload):
            raise BadValue("a value must be UTF-8 text")
        return value
    if _SURROGATE.search(value):
        raise BadValue("a value must be UTF-8 text")
    return value


def text_value(value: object, what: str) -> str:
    """
    A value a client sent in JSON: a string of text, or C{{"value": B64, "encoding": "base64"}}
    for bytes (C{"content_type"} optional), or C{{"value": TEXT, "content_type": T}} for text
    stored with a content type (as JSON answers carry each).

    @raise BadValue: otherwise.
    """
    if isinstance(value, str):
        if not value.isascii() and _SURROGATE.search(value):
            raise BadValue(f"the value of {what} must be UTF-8 text (no lone surrogates)")
        return value
    if isinstance(value, dict) and set(value) <= {"value", "encoding", "content_type"}:
        payload, encoding, content_type = value.get("value"), value.get("encoding"), value.get("content_type", "")
        if isinstance(payload, str) and "encoding" not in value and isinstance(content_type, str) and content_type:
            # Text with its content type, as a JSON answer gives a typed text value.
            text_value(payload, what)
            given = content_type_of(content_type.encode("utf-8"))  # not ASCII: refused, not mangled
            raw_text = payload.encode("utf-8")
            return parse_value(raw_text, len(raw_text), given.encode() or None)
        if isinstance(payload, str) and encoding == "base64" and isinstance(content_type, str):
            try:
                raw = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError):
                raise BadValue(f"the value of {what} is not valid base64") from None
            given = content_type_of(content_type.encode("utf-8")) if content_type else ""
            return parse_value(raw, len(raw), given.encode() or None)
    raise BadValue(f'the value of {what} must be a string or {{"value": BASE64, "encoding": "base64"}}')


def value_size(value: str) -> int:
    """The size of a value in bytes, as the value limit counts it (bytes, not their base64)."""
    if value[:1] != TYPED:
        return len(value.encode("utf-8")) if not value.isascii() else len(value)
    kind, _, payload = split_typed(value)
    if kind == "b":
        return len(payload) * 3 // 4 - payload[-2:].count("=")
    return len(payload.encode("utf-8"))


def value_json(value: str) -> dict[str, str]:
    """How JSON answers carry a value: text as is; bytes as base64 with C{"encoding": "base64"}."""
    if value[:1] != TYPED:
        return {"value": value}
    kind, _, payload = split_typed(value)
    if kind == "b":
        return {"value": payload, "encoding": "base64"}
    return {"value": payload}


def typed_json(value: str) -> dict[str, str]:
    """
    L{value_json}, plus C{"content_type"} for a typed value (bytes, or text stored with a
    content type): the one C{?raw=true} serves. Plain text carries none, so its answers are
    as they were. For single-key answers (GET, PUT, a batch's gets).
    """
    body = value_json(value)
    if value[:1] == TYPED:
        body["content_type"] = raw_value(value)[1]
    return body


def raw_value(value: str) -> tuple[bytes, str]:
    """A value's bytes and content type, for C{?raw=true}."""
    if value[:1] != TYPED:
        return value.encode("utf-8"), TEXT_TYPE
    kind, content_type, payload = split_typed(value)
    if kind == "b":
        return base64.b64decode(payload), content_type or BINARY_TYPE
    return payload.encode("utf-8"), content_type or TEXT_TYPE


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
        self.check_current(version if value is not None else None)

    def check_current(self, current: str | None) -> None:
        """
        L{check}, given only the key's current version (None: absent or a tombstone).

        @raise PreconditionFailed: with C{current} unless it holds.
        """
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
