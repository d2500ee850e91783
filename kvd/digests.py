"""
Anti-entropy digests: a node's keys split into L{BUCKETS} ranges, one digest per range.

A range's digest is the XOR of a hash of each (key, version) it holds, tombstones included,
so two nodes with equal digests for a range hold the same versions there, and one change
updates a digest in constant time. Gateways compare digests across replicas and ask for
the versions (L{versions_in}) of the ranges that differ.

A key's range is the top byte of BLAKE2s-256 over its UTF-8 bytes, which is also the top
byte of its ring point (L{kvd.ring.key_point}): the same function, by value, as before the
digests had their own module, so every version of kvd puts a key in the same range.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from attrs import define

from kvd.journal import unpack, version_of

#: Anti-entropy compares digests of this many key ranges.
BUCKETS = 256

_blake2s = hashlib.blake2s
_blake2b = hashlib.blake2b


def bucket_of(key: str) -> int:
    """The key range a key belongs to: the first byte of its BLAKE2s-256 hash."""
    return _blake2s(key.encode()).digest()[0]


def mark(key: str, version: str) -> int:
    """What one (key, version) contributes to its range's digest."""
    return int.from_bytes(_blake2b(f"{key}\x00{version}".encode(), digest_size=8).digest(), "big")


@define
class Digests:
    """The digest of each range, kept up to date as entries change."""

    _sums: list[int]

    @classmethod
    def of(cls, data: Mapping[str, str]) -> Digests:
        """The digests of every key -> packed entry in C{data}."""
        sums = [0] * BUCKETS
        for key, packed in data.items():
            sums[bucket_of(key)] ^= mark(key, version_of(packed))
        return cls(sums)

    def change(self, key: str, old: str | None, new: str | None) -> None:
        """A key's packed entry went from C{old} to C{new} (None: absent)."""
        bucket = bucket_of(key)
        if old is not None:
            self._sums[bucket] ^= mark(key, version_of(old))
        if new is not None:
            self._sums[bucket] ^= mark(key, version_of(new))

    def replace(self, key: str, bucket: int, old_version: str | None, new_version: str) -> None:
        """L{change} given the key's range and the versions (None: the key was absent)."""
        sums = self._sums
        if old_version is not None:
            sums[bucket] ^= mark(key, old_version)
        sums[bucket] ^= mark(key, new_version)

    def values(self) -> list[int]:
        return list(self._sums)


def versions_in(data: Mapping[str, str], buckets: Iterable[int]) -> tuple[dict[str, str], list[str]]:
    """key -> version for every key of C{data} in the given ranges, and which of them are tombstones."""
    wanted = set(buckets)
    versions, tombstones = {}, []
    for key, packed in data.items():
        if bucket_of(key) in wanted:
            value, versions[key] = unpack(packed)
            if value is None:
                tombstones.append(key)
    return versions, tombstones
