"""
The node's start count, kept in its data dir: the registry orders a node's registrations by it.
"""

from __future__ import annotations

import os

from kvd.journal import CorruptStore, fsync_dir

INCARNATION = "incarnation"


def read_incarnation(directory: str) -> int:
    """The data dir's start count (0 before the first start)."""
    path = os.path.join(directory, INCARNATION)
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"0")
    except FileNotFoundError:
        return 0
    except ValueError:
        raise CorruptStore(f"{path}: not a whole number; refusing to start") from None


def _write(directory: str, incarnation: int) -> None:
    path = os.path.join(directory, INCARNATION)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"%d\n" % incarnation)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)


def raise_incarnation(directory: str, at_least: int) -> int:
    """
    Make the data dir's count at least C{at_least} (a registry has seen a newer incarnation of
    this node: the dir was restored from an older copy), so the next start counts on from
    there; return the count. Call it only while holding the dir's lock.
    """
    current = read_incarnation(directory)
    if current >= at_least:
        return current
    _write(directory, at_least)
    return at_least


def next_incarnation(directory: str) -> int:
    """
    Count one more start of the node that owns C{directory} and return the count.

    It must grow across restarts whatever the wall clock does, so it is kept (atomically,
    durably) in the data dir. Call it only while holding the dir's lock.
    """
    current = read_incarnation(directory)
    _write(directory, current + 1)
    return current + 1
