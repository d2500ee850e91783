"""kvd's JSON: orjson where it can, the standard library where it must, the same values either way."""

from __future__ import annotations

import json

import pytest

from kvd.codec import answer_json, wire_json, wire_loads
from kvd.keys import TYPED


@pytest.mark.parametrize(
    "obj",
    [
        {"success": True, "key": "k é", "value": 'v\n"x"', "version": "0001-0000-g"},
        {"value": TYPED + "b" + "\x1f" + "AAEC"},
        [1, None, True, 2.5, {"a": []}],
        # The encoder made once (kvd.codec._C_ANSWER) for each kind of thing an answer holds.
        {"n": 2**70, "f": [0.1, -1e300, float("nan"), float("inf")], "nested": {"x": [{"y": ()}], "": ""}},
        {"replicas": ["a", "b"], "hinted": {"c": "a"}, "ctrl": "\x00\x7f\u2028\ud800"},
        "a bare string \u00e9",
        [],
    ],
)
def test_an_answer_to_a_client_keeps_the_standard_library_s_bytes(obj: object) -> None:
    expected = json.dumps(obj, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8", "surrogatepass")
    assert answer_json(obj) == expected


@pytest.mark.parametrize(
    "obj",
    [
        {"items": [["k", "v", "0001-0000-g"], ["t", None, "0002-0000-g"]]},
        {"items": [["typed", TYPED + "t" + "\x1f" + "text", "0001-0000-g"]]},  # a lone surrogate: the fallback
        {"n": 2**70},  # past 64 bits: the fallback
        {"é": "\u2028"},
    ],
)
def test_the_wire_carries_every_value_there_and_back(obj: object) -> None:
    assert wire_loads(wire_json(obj)) == obj
    assert json.loads(wire_json(obj)) == obj


@pytest.mark.parametrize(
    "raw",
    [b'"\\ud800"', b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xef\xbb\xbf{}", '"\udfff"'.encode("utf-8", "surrogatepass")],
)
def test_the_wire_reads_what_the_standard_library_reads(raw: bytes) -> None:
    parsed, expected = wire_loads(raw), json.loads(raw)
    assert repr(parsed) == repr(expected)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1,]", b"nul"])
def test_the_wire_refuses_what_the_standard_library_refuses_with_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        wire_loads(raw)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain",
        'quote " and backslash \\ and slash /',
        "".join(chr(c) for c in range(0x300)),  # every control character, latin-1 and beyond
        "\u2028\u2029 é 日本 \U0001f600",
    ],
)
def test_a_journal_record_has_the_bytes_the_standard_library_wrote(text: str) -> None:
    from kvd.journal import encode_drop, encode_entry

    def before(*fields: str) -> bytes:
        return (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    assert encode_entry(text or "k", text, "0001-0000-g") == before("p", text or "k", text, "0001-0000-g")
    assert encode_entry("k", None, "0001-0000-g") == before("d", "k", "0001-0000-g")
    assert encode_drop(text or "k") == before("x", text or "k")
