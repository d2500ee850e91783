"""
A C{paxos.jsonl} as a kvd of before wrote it (the acceptor's own file, before its records went
to the store's journal), for the tests of its migration (L{kvd.paxos.Acceptor.migrate}).

One JSON line per change, each a key's whole state, C{{"k": KEY, "p": PROMISED}} or
C{{"k": KEY, "p": PROMISED, "a": [BALLOT, VALUE or null, VERSION]}}, and, once the file had
been compacted, a first line C{{"floor": BALLOT}}; written by L{kvd.codec.wire_json}, as
that kvd did. L{kvd.paxos.recover} is what reads it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from kvd.codec import wire_json
from kvd.paxos import FILE, Proposal


def paxos_jsonl(states: Iterable[tuple[str, str, Proposal | None]], floor: str = "") -> bytes:
    """
    The file's bytes: the floor's line first (if any, as a compaction left it), then one line
    per (key, promised, accepted) in order (a later line of a key is its newer state).
    """
    lines = [wire_json({"floor": floor}) + b"\n"] if floor else []
    for key, promised, accepted in states:
        if accepted is None:
            lines.append(wire_json({"k": key, "p": promised}) + b"\n")
        else:
            lines.append(
                wire_json({"k": key, "p": promised, "a": [accepted.ballot, accepted.value, accepted.version]}) + b"\n"
            )
    return b"".join(lines)


def write_paxos_jsonl(directory: str, states: Iterable[tuple[str, str, Proposal | None]], floor: str = "") -> bytes:
    """Write L{paxos_jsonl} as C{paxos.jsonl} in the data dir C{directory}; its bytes."""
    data = paxos_jsonl(states, floor)
    with open(os.path.join(directory, FILE), "wb") as f:
        f.write(data)
    return data
