"""
JSON in and out of kvd's HTTP: through orjson where it can, the standard library where it
must, the same values either way.

orjson encodes and parses several times as fast as the standard library, but refuses what
kvd must carry now and then: lone surrogates (every typed value starts with one, see
L{kvd.keys.TYPED}), integers past 64 bits, non-string keys, C{NaN}; each of those falls back to
the standard library. It is used between kvd processes only (the internal API, whose bytes
nobody reads, and answers read back from peers): it reads an integer past 64 bits as a float,
so clients' request bodies stay with the standard library, and answers to clients keep their
exact bytes (C{", "} and C{": "} separators: scripts and tests read them).
"""

from __future__ import annotations

import json
from json import encoder as _encoder
from typing import Any

import orjson

#: Made once: C{json.dumps} with any argument but the defaults builds a new encoder each call.
_ANSWER = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "))

#: The C encoder C{_ANSWER.encode} makes anew on every call (with a closure and a dict of
#: markers), made once: the same bytes, about 1 us less an answer. Without the circular
#: check (an answer is a tree built for it; a cycle would fail as a RecursionError).
_make_c_encoder: Any = getattr(_encoder, "c_make_encoder", None)  # not in typeshed
_C_ANSWER = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(None, _ANSWER.default, _encoder.encode_basestring, None, ": ", ", ", False, False, True)
)


def answer_json(obj: object) -> bytes:
    """The JSON of an answer to a client, byte for byte as kvd has always written it."""
    if _C_ANSWER is None or isinstance(obj, str):
        return _ANSWER.encode(obj).encode("utf-8", "surrogatepass")
    return "".join(_C_ANSWER(obj, 0)).encode("utf-8", "surrogatepass")


def wire_json(obj: object) -> bytes:
    """Compact JSON for the internal API."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")


def wire_loads(data: bytes) -> Any:
    """
    Parse JSON from another kvd process as C{json.loads} does (lone surrogates included),
    raising C{ValueError} (or C{RecursionError}) for what it refuses.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
