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


def next_incarnation(directory: str) -> int:
    """
    Count one more start of the node that owns C{directory} and return the count.

    It must grow across restarts whatever the wall clock does, so it is kept (atomically,
    durably) in the data dir. Call it only while holding the dir's lock.
    """
    path = os.path.join(directory, INCARNATION)
    current = read_incarnation(directory)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"%d\n" % (current + 1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
    return current + 1
