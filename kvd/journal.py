"""
A node's data dir on disk: the journal and snapshot format, recovery, and the dir's lock.

Layout of a data dir::

    LOCK                   held (flock) by the one process that owns the dir
    incarnation            the node's start count (L{kvd.incarnation})
    snapshot.json          {"kvd": 4, "generation": G, "paxos": PAXOS, "data": {key: entry, ...}}
    journal-G.jsonl        one JSON record a line, written after the snapshot of generation G:
                           ["p", key, value, version]  put of text
                           ["b", key, base64, version, content type]  put of bytes ("": default)
                           ["t", key, text, version, content type]    put of text with a content type
                           ["d", key, version]         delete (a tombstone)
                           ["x", key]                  drop (forget the key entirely)
                           ["P", key, promised]        the Paxos acceptor's state of a key: a
                                                       promise, no accepted proposal
                           ["A", key, promised, ballot, value or null, version]
                                                       a promise and the accepted proposal
                           ["F", floor]                the acceptor's floor (L{kvd.paxos})

The Paxos acceptor (L{kvd.paxos}) keeps its records in the same journal as the store, so a
node's batch of conditional-write traffic makes one write + fsync for its promises,
acceptances and commits; a snapshot's PAXOS, C{{"floor": F, "keys": {key: [promised] or
[promised, ballot, value, version]}}}, holds the acceptor state compaction keeps. Format 4
snapshots hold it (one without any is written as format 3, as before); formats 1 to 3
(none) still load unchanged. A C{paxos.jsonl} (the
acceptor's own file before format 4) is carried into the journal at start-up.

Binary values (L{kvd.keys.TYPED}) are held in memory as a packed entry whose version is
followed by BIN, the kind, the content type, then SEP and the payload: for bytes their
latin-1 mapping, one byte of memory per byte (in snapshots: their base64, kind C{"B"}).
Format 3 snapshots may hold those; format 2 (text only) still loads unchanged.

Format 1 (before versions existed) held bare values in the snapshot and ``["p", key, value]``,
``["d", key]`` records; it still loads, every value at L{NO_VERSION}.

This module does file I/O and nothing else: no reactor, no threads. L{recover} reads a dir
without changing a file; the live store (L{kvd.store}) appends records and writes snapshots
through the helpers here.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from typing import Any

import orjson
from attrs import define, field, frozen

from kvd.keys import TYPED, split_typed

SNAPSHOT = "snapshot.json"
SNAPSHOT_TMP = "snapshot.json.tmp"
LOCK = "LOCK"
FORMAT = 4
#: What a snapshot with no acceptor state is written as: format 4 less its "paxos".
FORMAT_NO_PAXOS = 3
#: The version of data written before versions existed: older than every real one.
NO_VERSION = ""
#: A key's value (None for a tombstone: a deletion replicas must learn of) and version.
Entry = tuple["str | None", str]
#: In memory and in snapshots an entry is one string, its version then SEP then its value
#: (a tombstone is its version alone): a tuple and a second string object per key would
#: double the memory a key takes, and slow loading a snapshot. Versions never hold SEP.
SEP = "\x1f"
#: In a packed entry, ends the version of a typed value (bytes, or text with a content type):
#: version, BIN, kind ("b": bytes as latin-1; "B": bytes as base64; "t": text), content
#: type, SEP, payload. Versions never hold BIN.
BIN = "\x1e"
#: Items per slice when serialising a snapshot: between slices the GIL can go back to the
#: reactor thread, so compaction of a large store does not stall request handling. Each
#: slice is one C{json.dumps}, which holds the GIL throughout: about 1 us an item here, so
#: a slice of 1,000 keeps the reactor waiting about 1 ms (20,000 took 15-33 ms).
SNAPSHOT_SLICE = 1_000
#: Seconds the snapshot's thread sleeps after each slice, leaving the GIL to the reactor
#: thread: without it the reactor, back from each system call, waits for the GIL up to the
#: switch interval (5 ms) while the thread serialises; about 0.3 s more per 1M keys.
SNAPSHOT_PAUSE = 0.0003

_JOURNAL = re.compile(r"^journal-(\d+)\.jsonl$")


class StoreError(Exception):
    """The store cannot be opened or written; the message is one readable line."""


class CorruptStore(StoreError):
    """The data dir holds something recovery must not guess about."""


class StoreLocked(StoreError):
    """Another process owns the data dir."""


# Entries: one string per key.


def pack(value: str | None, version: str) -> str:
    if value is None:
        return version
    if value[:1] != TYPED:
        return version + SEP + value
    kind, content_type, payload = split_typed(value)
    if kind == "b":
        payload = base64.b64decode(payload).decode("latin-1")
    return version + BIN + kind + content_type + SEP + payload


def _typed(head: str, mark: int, payload: str) -> Entry:
    kind, content_type = head[mark + 1], head[mark + 2 :]
    if kind == "b":
        payload = base64.b64encode(payload.encode("latin-1")).decode("ascii")
    elif kind == "B":
        kind = "b"
    return TYPED + kind + content_type + SEP + payload, head[:mark]


def unpack(packed: str) -> Entry:
    cut = packed.find(SEP)
    if cut < 0:
        return None, packed
    head = packed[:cut]
    mark = head.find(BIN)
    if mark < 0:
        return packed[cut + 1 :], head
    return _typed(head, mark, packed[cut + 1 :])


def version_of(packed: str) -> str:
    cut = packed.find(SEP)
    if cut < 0:
        return packed
    mark = packed.find(BIN, 0, cut)
    return packed[:cut] if mark < 0 else packed[:mark]


def is_live(packed: str) -> bool:
    """Whether a packed entry holds a value (not a tombstone)."""
    return SEP in packed


def _on_disk(packed: str) -> str:
    """A packed entry as a snapshot holds it: bytes as base64 (kind "B"), the rest as in memory."""
    cut = packed.find(SEP)
    mark = packed.find(BIN, 0, cut) if cut >= 0 else -1
    if mark < 0 or packed[mark + 1] != "b":
        return packed
    payload = base64.b64encode(packed[cut + 1 :].encode("latin-1")).decode("ascii")
    return packed[:mark] + BIN + "B" + packed[mark + 2 : cut] + SEP + payload


def _in_memory(packed: str) -> str:
    """A snapshot's packed entry as memory holds it: bytes as latin-1 (kind "b")."""
    cut = packed.find(SEP)
    mark = packed.find(BIN, 0, cut) if cut >= 0 else -1
    if mark < 0 or packed[mark + 1] != "B":
        return packed
    payload = base64.b64decode(packed[cut + 1 :], validate=True).decode("latin-1")
    return packed[:mark] + BIN + "b" + packed[mark + 2 : cut] + SEP + payload


# Records.


def journal_name(generation: int) -> str:
    return f"journal-{generation}.jsonl"


def _record(*fields: str) -> bytes:
    # orjson writes the same bytes as json.dumps(ensure_ascii=False, separators=(",", ":"))
    # for every string it takes, about a third of the time (a node writes one record per
    # replicated write); a string it refuses (a lone surrogate) goes the old way, and fails there.
    try:
        return orjson.dumps(fields) + b"\n"
    except orjson.JSONEncodeError:
        return (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def encode_entry(key: str, value: str | None, version: str) -> bytes:
    """A put (value) or a tombstone (None), with its version."""
    if value is None:
        return _record("d", key, version)
    if value[:1] == TYPED:
        kind, content_type, payload = split_typed(value)
        return _record(kind, key, payload, version, content_type)
    try:  # _record's first way, without its call: a node writes one of these per replicated write
        return orjson.dumps(("p", key, value, version)) + b"\n"
    except orjson.JSONEncodeError:
        return _record("p", key, value, version)


def encode_drop(key: str) -> bytes:
    return _record("x", key)


#: An acceptor's state of a key as recovery gives it: the ballot promised, and the accepted
#: proposal (ballot, value or None, version) if any.
PaxosState = tuple[str, "tuple[str, str | None, str] | None"]


def encode_paxos(key: str, promised: str, accepted: tuple[str, str | None, str] | None) -> bytes:
    """The acceptor's state of C{key}: its promise, and its accepted proposal if any."""
    if accepted is None:
        return _record("P", key, promised)
    fields = ("A", key, promised, *accepted)
    try:
        return orjson.dumps(fields) + b"\n"
    except orjson.JSONEncodeError:
        # A typed value (bytes, or text with a content type: L{kvd.keys.TYPED}) begins with a
        # lone surrogate, which orjson and UTF-8 refuse: escaped, as JSON allows, it reads back.
        return (json.dumps(fields, separators=(",", ":")) + "\n").encode()


def encode_floor(floor: str) -> bytes:
    return _record("F", floor)


# File helpers.


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def lock(directory: str) -> int:
    """
    Take the data dir (creating it if needed) for this process; return the lock's descriptor.

    @raise StoreLocked: when another process holds it.
    @raise StoreError: when it cannot be created or opened.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise StoreError(f"data dir {directory} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StoreError(f"cannot use data dir {directory}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreLocked(f"data dir {directory} is in use by another kvd process") from None
    return fd


# Snapshots.


def _paxos_json(paxos: tuple[str, dict[str, PaxosState]]) -> bytes:
    floor, states = paxos
    keys = {
        key: [promised] if accepted is None else [promised, *accepted] for key, (promised, accepted) in states.items()
    }
    # ASCII, escapes and all: a typed value begins with a lone surrogate (see encode_paxos).
    return json.dumps({"floor": floor, "keys": keys}, separators=(",", ":")).encode()


def _snapshot_chunks(
    generation: int, items: Iterable[tuple[str, str]], paxos: tuple[str, dict[str, PaxosState]] | None = None
) -> Iterator[bytes]:
    if paxos is not None and (paxos[0] or paxos[1]):
        yield b'{"kvd":%d,"generation":%d,"paxos":' % (FORMAT, generation) + _paxos_json(paxos) + b',"data":{'
    else:  # no acceptor state: format 3, as before it had any
        yield b'{"kvd":%d,"generation":%d,"data":{' % (FORMAT_NO_PAXOS, generation)
    it, first = iter(items), True
    while True:
        piece = {key: _on_disk(packed) if BIN in packed else packed for key, packed in islice(it, SNAPSHOT_SLICE)}
        if not piece:
            break
        if not first:
            yield b","
        first = False
        yield json.dumps(piece, ensure_ascii=False)[1:-1].encode()
        if len(piece) == SNAPSHOT_SLICE:  # more may follow (a small snapshot never waits)
            time.sleep(SNAPSHOT_PAUSE)
    yield b"}}\n"


def write_snapshot(
    directory: str,
    generation: int,
    items: Iterable[tuple[str, str]],
    step: Callable[[str], None] = lambda name: None,
    paxos: tuple[str, dict[str, PaxosState]] | None = None,
) -> int:
    """
    Make C{items} (key, packed entry) the snapshot of C{generation}, atomically, and return
    its size in bytes; with C{paxos} (the acceptor's floor and the states it keeps) too.

    C{items} may be a dict's items view, read here on another thread, as long as nobody
    changes that dict meanwhile (L{kvd.store} freezes it for the snapshot's time).

    C{step} is called after each step that leaves the disk in a new state; tests make it
    raise to leave the dir as a crash at that point would.
    """
    tmp = os.path.join(directory, SNAPSHOT_TMP)
    size = 0
    with open(tmp, "wb") as f:
        for chunk in _snapshot_chunks(generation, items, paxos):
            f.write(chunk)
            size += len(chunk)
        step("written")
        f.flush()
        os.fsync(f.fileno())
    step("synced")
    os.replace(tmp, os.path.join(directory, SNAPSHOT))
    step("renamed")
    fsync_dir(directory)
    step("dir-synced")
    return size


# Recovery.


def _decode_records(path: str, data: bytes, last: bool) -> tuple[list[list[Any]], int]:
    """
    Parse a journal's bytes into records; return them and the length of the good prefix.

    A final line without its newline, or a final line that does not parse, is a record torn
    by a crash while it was being appended; it is left out (and the caller cuts it off).
    Anything else that does not parse is corruption.
    """
    end = data.rfind(b"\n") + 1
    body, tail = data[:end], data[end:]
    lines = body.split(b"\n")[:-1]
    try:
        records = json.loads(b"[" + b",".join(lines) + b"]") if lines else []
        bad: int | None = None
    except ValueError:
        records, bad = [], None
        for number, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except ValueError:
                bad = number
                break
    if bad is not None:
        if last and bad == len(lines) - 1 and not tail:
            end -= len(lines[bad]) + 1
        else:
            raise CorruptStore(f"{path}: record {bad + 1} is not valid JSON; refusing to start")
    if tail and not last:
        raise CorruptStore(f"{path}: ends in a partial record but is not the newest journal")
    return records, end


def _is_delete_proposal(record: Any) -> bool:
    """An "A" record whose accepted proposal is a deletion (its value null)."""
    return (
        isinstance(record, list)
        and len(record) == 6
        and record[0] == "A"
        and record[4] is None
        and all(isinstance(record[i], str) for i in (1, 2, 3, 5))
    )


def _replay(path: str, data: dict[str, str], records: list[Any], paxos: _Paxos) -> None:
    for number, record in enumerate(records, 1):
        if not isinstance(record, list) or not record or not all(isinstance(f, str) for f in record[1:]):
            if _is_delete_proposal(record):
                paxos.states[record[1]] = (record[2], (record[3], None, record[5]))
                continue
            raise CorruptStore(f"{path}: record {number} is not a kvd record; refusing to start")
        kind, size = record[0], len(record)
        if kind == "p" and size == 4:
            data[record[1]] = record[3] + SEP + record[2]
        elif kind == "d" and size == 3:
            data[record[1]] = record[2]
        elif kind == "b" and size == 5:
            try:
                payload = base64.b64decode(record[2], validate=True).decode("latin-1")
            except (binascii.Error, ValueError):
                raise CorruptStore(
                    f"{path}: record {number} holds bytes that are not base64; refusing to start"
                ) from None
            data[record[1]] = record[3] + BIN + "b" + record[4] + SEP + payload
        elif kind == "t" and size == 5:
            data[record[1]] = record[3] + BIN + "t" + record[4] + SEP + record[2]
        elif kind == "x" and size == 2:
            data.pop(record[1], None)
        elif kind == "p" and size == 3:  # format 1: no version
            data[record[1]] = NO_VERSION + SEP + record[2]
        elif kind == "d" and size == 2:  # format 1: deletes left no tombstone
            data.pop(record[1], None)
        elif kind == "P" and size == 3:
            paxos.states[record[1]] = (record[2], None)
        elif kind == "A" and size == 6:
            paxos.states[record[1]] = (record[2], (record[3], record[4], record[5]))
        elif kind == "F" and size == 2:
            paxos.floor = max(paxos.floor, record[1])
        else:
            raise CorruptStore(
                f"{path}: record {number} is not a put, delete, drop or acceptor record; refusing to start"
            )


@define
class _Paxos:
    """The acceptor's state as recovery rebuilds it: its floor, and key -> L{PaxosState}."""

    floor: str = ""
    states: dict[str, PaxosState] = field(factory=dict)


def _snapshot_paxos(path: str, loaded: Any) -> _Paxos:
    """A format 4 snapshot's acceptor state (none in earlier formats, or when it has none)."""
    if loaded is None:
        return _Paxos()
    if (
        not isinstance(loaded, dict)
        or not isinstance(loaded.get("floor"), str)
        or not isinstance(loaded.get("keys"), dict)
    ):
        raise CorruptStore(f"{path}: its paxos state is not a floor and keys; refusing to start")
    states: dict[str, PaxosState] = {}
    for key, state in loaded["keys"].items():
        if isinstance(state, list) and len(state) == 1 and isinstance(state[0], str):
            states[key] = (state[0], None)
        elif (
            isinstance(state, list)
            and len(state) == 4
            and all(isinstance(state[i], str) for i in (0, 1, 3))
            and (state[2] is None or isinstance(state[2], str))
        ):
            states[key] = (state[0], (state[1], state[2], state[3]))
        else:
            raise CorruptStore(f"{path}: the paxos state of {key!r} is not one; refusing to start")
    return _Paxos(loaded["floor"], states)


def _entries(path: str, format: int, data: dict[str, Any]) -> dict[str, str]:
    """A snapshot's data as packed entries; format 1 held bare values, with no versions."""
    if not all(type(v) is str for v in data.values()):
        raise CorruptStore(f"{path}: holds an entry that is not a string; refusing to start")
    if format == 1:
        return {k: NO_VERSION + SEP + v for k, v in data.items()}
    if format >= 3:
        try:
            for key in [key for key, packed in data.items() if BIN in packed]:
                data[key] = _in_memory(data[key])
        except (binascii.Error, ValueError):
            raise CorruptStore(f"{path}: holds bytes that are not base64; refusing to start") from None
    return data


@frozen
class Recovered:
    """What recovery found in a data dir."""

    #: key -> packed entry (see L{pack}).
    data: dict[str, str]
    generation: int
    snapshot_bytes: int
    journal_generation: int
    #: Bytes of the newest journal up to its last whole record.
    journal_bytes: int
    #: Bytes of a torn final record after that, to cut off.
    torn_bytes: int
    #: Journals older than the snapshot, to remove.
    stale: list[str]
    #: The Paxos acceptor's floor and states (L{kvd.paxos}), from the snapshot and journals.
    paxos_floor: str = ""
    paxos: dict[str, PaxosState] = field(factory=dict)


def recover(directory: str) -> Recovered:
    """
    Read a data dir's state without changing any file.

    @raise CorruptStore: for anything but a torn final record.
    """
    names = os.listdir(directory)
    generation, data, snapshot_bytes, paxos = 0, {}, 0, _Paxos()
    snapshot = os.path.join(directory, SNAPSHOT)
    if SNAPSHOT in names:
        with open(snapshot, "rb") as f:
            raw = f.read()
        snapshot_bytes = len(raw)
        try:
            loaded = json.loads(raw)
        except ValueError as e:
            raise CorruptStore(f"{snapshot}: not valid JSON ({e}); refusing to start") from None
        if (
            not isinstance(loaded, dict)
            or loaded.get("kvd") not in (1, 2, 3, FORMAT)
            or not isinstance(loaded.get("generation"), int)
            or not isinstance(loaded.get("data"), dict)
        ):
            raise CorruptStore(f"{snapshot}: not a kvd snapshot of format 1 to {FORMAT}; refusing to start")
        generation, data = loaded["generation"], _entries(snapshot, loaded["kvd"], loaded["data"])
        paxos = _snapshot_paxos(snapshot, loaded.get("paxos"))

    journals = sorted((int(m.group(1)), name) for name in names if (m := _JOURNAL.match(name)))
    stale = [name for number, name in journals if number < generation]
    live = [(number, name) for number, name in journals if number >= generation]
    if live and live[0][0] != generation:
        raise CorruptStore(
            f"{directory}: {live[0][1]} found but the snapshot is of generation {generation}"
            " (missing snapshot or journal); refusing to start"
        )
    for (a, name), (b, _) in zip(live, live[1:], strict=False):
        if b != a + 1:
            raise CorruptStore(f"{directory}: journals are not consecutive after {name}; refusing to start")

    journal_generation, journal_bytes, torn = generation, 0, 0
    for position, (number, name) in enumerate(live):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            raw = f.read()
        last = position == len(live) - 1
        records, good = _decode_records(path, raw, last)
        _replay(path, data, records, paxos)
        journal_generation, journal_bytes, torn = number, good, len(raw) - good
    return Recovered(
        data, generation, snapshot_bytes, journal_generation, journal_bytes, torn, stale, paxos.floor, paxos.states
    )
