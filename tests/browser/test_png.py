"""The screenshot check's PNG decoding: it sees one colour in a blank image and each pixel of a drawn one."""

from __future__ import annotations

import struct
import zlib

import pytest

from .png import pixels


def encode(width: int, height: int, rows: list[bytes], filters: list[int], colour: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(bytes([f]) + row for f, row in zip(filters, rows, strict=True))
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_a_blank_image_is_one_colour() -> None:
    white = bytes([255, 255, 255] * 4)
    width, height, found = pixels(encode(4, 3, [white] * 3, [0, 0, 0]))
    assert (width, height) == (4, 3) and set(found) == {b"\xff\xff\xff"}


def test_every_filter_is_undone() -> None:
    # Filter 1 (Sub) on row 0 of bytes 10, 1, 1, ...: each pixel channel is the one before plus 1.
    sub = bytes([10, 20, 30] + [1, 1, 1])
    # Filter 2 (Up): each byte plus the one above.
    up = bytes([1, 1, 1, 2, 2, 2])
    # Filter 3 (Average) and 4 (Paeth) with zero deltas keep their predictors.
    zero = bytes(6)
    _, _, found = pixels(encode(2, 4, [sub, up, zero, zero], [1, 2, 3, 4]))
    assert found[:4] == [bytes([10, 20, 30]), bytes([11, 21, 31]), bytes([11, 21, 31]), bytes([13, 23, 33])]
    # Average: left is 0 at the row start, so (0 + up) // 2; then (left + up) // 2.
    assert found[4] == bytes([5, 10, 15]) and found[5] == bytes([(5 + 13) // 2, (10 + 23) // 2, (15 + 33) // 2])
    # Paeth with a zero delta copies its predictor (up at the row start).
    assert found[6] == found[4]


def test_what_it_cannot_read_is_an_error() -> None:
    with pytest.raises(ValueError):
        pixels(b"GIF89a")
    with pytest.raises(ValueError):
        pixels(encode(1, 1, [bytes([0, 0, 0])], [7]))
