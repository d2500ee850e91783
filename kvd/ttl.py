"""
Per-key expiry (C{PUT /kv/{key}?ttl=SECONDS}): the absolute expiry travels inside the version.

A write with a TTL gets the version ``V~EXPIRY``: its coordinator's version V, then ``~``
and the expiry in whole milliseconds since the epoch. Node ids and gateway origins never
hold ``~``, and two writes never share V, so versions still order every pair of writes by
plain string comparison, exactly as before. Carrying the expiry in the version means it goes
wherever the version goes, with nothing else to change: the internal apply and read, the
journal and the snapshot (their format is unchanged, so every old data dir still loads),
the digests (every replica of a write has the same string) and the repair sweep.

Every reader decides with its own clock: an entry whose expiry has come (C{now >= expiry})
reads as a tombstone of the same version, on every node and at the gateway, before any
sweep. So repair, which copies and compares versions, never brings an expired value back:
a copy it makes carries the same expiry and is expired on arrival, and a node lists the
entry as a tombstone, which the repair sweep then collects like any other. Each node also
turns its expired entries into real tombstones of the same version every second
(L{kvd.store.Store.expire}), freeing their values; the digests do not change, since the
version does not. A later write without a
TTL has a newer, plain version: the key is permanent again.
"""

from __future__ import annotations

import math

#: Separates a version from the expiry it carries.
MARK = "~"
#: The longest TTL accepted: ten years.
MAX_TTL = 10 * 365 * 24 * 3600.0


class BadTTL(ValueError):
    pass


def parse_ttl(text: str) -> float:
    """
    A ttl query argument in seconds.

    @raise BadTTL: unless it is a positive finite number of at most L{MAX_TTL}.
    """
    try:
        seconds = float(text)
    except ValueError:
        raise BadTTL(f"ttl must be a number of seconds, not {text[:40]!r}") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TTL):
        raise BadTTL(f"ttl must be more than 0 and at most {MAX_TTL:.0f} seconds (ten years)")
    return seconds


def with_expiry(version: str, expires: float | None) -> str:
    """C{version} carrying the absolute expiry C{expires} (Unix seconds); unchanged for None."""
    if expires is None:
        return version
    return f"{version}{MARK}{math.ceil(expires * 1000)}"


def expiry_ms(version: str) -> int | None:
    """The expiry a version carries, in milliseconds since the epoch; None when it has none."""
    cut = version.rfind(MARK)
    if cut < 0:
        return None
    try:
        return int(version[cut + 1 :])
    except ValueError:
        return None


def expires(version: str) -> float | None:
    """The expiry a version carries, in Unix seconds (what answers show as C{"expires"})."""
    ms = expiry_ms(version)
    return None if ms is None else ms / 1000


def expired(version: str, now: float) -> bool:
    """Whether an entry of this version has expired at time C{now} (Unix seconds)."""
    if MARK not in version:
        return False
    ms = expiry_ms(version)
    return ms is not None and now >= ms / 1000
