"""
A node's write order: which keys changed, in the order they changed here, and who waits for that.

Every change to the store (a local or replicated write, a tombstone) gets the next sequence
number of this index; only each key's latest one is kept, so a key written many times is one
entry. A reader holds a position (the last sequence number it has seen) and asks for the keys
changed after it; that is what the change feed (C{GET /changes}) and watches read.

The index lives in memory only: at start it is rebuilt from the recovered store in whatever
order the store gives, under a fresh random I{epoch}. A position from an older epoch means
nothing any more, so a reader holding one starts again from 0: it is sent everything again,
and misses nothing.

Waiters (long polls) are woken by the writes themselves: one list per watched key and one
list of prefix waiters; there is no timer or loop per waiter.
"""

from __future__ import annotations

import secrets
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred

#: The most index entries one call of L{ChangeIndex.since} looks at, so a prefix that
#: matches little cannot make one request walk the whole index.
MAX_SCAN = 20_000
#: The most keys one answer of a node's changes holds: as many as an internal batch, so the
#: answer stays within the internal message limit (L{kvd.keys.internal_message_limit}).
MAX_KEYS = 512


@frozen
class Page:
    """The keys changed after a position, oldest change first."""

    keys: list[str]
    #: The position to ask from next time: everything up to it has been looked at.
    next: int
    #: Whether more changes follow C{next} already (the page was cut by its limit or the scan).
    more: bool


@define
class ChangeIndex:
    """The order of one store's changes. Make one with L{ChangeIndex.follow}."""

    epoch: str = field(factory=lambda: secrets.token_hex(8))
    #: The last sequence number handed out: the position of "now".
    position: int = 0
    #: Ascending sequence numbers handed out, some stale (their key changed again since): an
    #: array of machine integers, which the garbage collector does not walk (a list of 1M
    #: made each full collection of a node's heap walk 1M entries).
    _seqs: array[int] = field(factory=lambda: array("q"))
    #: The key of each sequence number that is still its key's latest, and the reverse: dicts
    #: of strings and integers only, which the garbage collector leaves alone too.
    _key_at: dict[int, str] = field(factory=dict)
    _seq_of: dict[str, int] = field(factory=dict)
    _stale: int = 0
    _key_waiters: dict[str, list[Deferred[None]]] = field(factory=dict)
    _feed_waiters: list[tuple[str, Deferred[None]]] = field(factory=list)

    @classmethod
    def of(cls, keys: Iterable[str]) -> ChangeIndex:
        """An index holding C{keys} as changed, in the order given, under a new epoch."""
        index = cls()
        for key in keys:
            index.changed(key)
        return index

    @classmethod
    def follow(cls, store: object) -> ChangeIndex:
        """
        An index of C{store} (a L{kvd.store.Store}): its keys now, then every change it makes,
        through the store's C{on_change} hook.
        """
        index = cls.of(key for key, _ in store.entries())  # type: ignore[attr-defined]
        store.on_change = index._store_changed  # type: ignore[attr-defined]
        return index

    def __len__(self) -> int:
        return len(self._seq_of)

    def _store_changed(self, key: str, present: bool) -> None:
        if present:
            self.changed(key)
        else:
            self.forget(key)

    def changed(self, key: str) -> None:
        """C{key} changed now: it moves to the end of the order; its waiters wake."""
        seq_of, key_at = self._seq_of, self._key_at
        old = seq_of.pop(key, None)
        if old is not None:  # L{_unlink}'s work, without its call: most writes are to keys held
            del key_at[old]
            self._stale += 1
            if self._stale > 1024 and self._stale * 2 > len(self._seqs):
                self._drop_stale()
        position = self.position = self.position + 1
        self._seqs.append(position)
        key_at[position] = key
        seq_of[key] = position
        if self._key_waiters or self._feed_waiters:  # most writes have nobody waiting
            self._wake(key)

    def forget(self, key: str) -> None:
        """C{key} is gone from the store entirely (dropped, not deleted): it leaves the order."""
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        old = self._seq_of.pop(key, None)
        if old is None:
            return
        del self._key_at[old]
        self._stale += 1
        if self._stale > 1024 and self._stale * 2 > len(self._seqs):
            self._drop_stale()

    def _drop_stale(self) -> None:
        """Keep only the live sequence numbers, once most are stale."""
        # In order: the dict's own order, as they were added in it.
        self._seqs = array("q", self._key_at)
        self._stale = 0

    def seq_of(self, key: str) -> int | None:
        """The sequence number of C{key}'s latest change, if the index holds it."""
        return self._seq_of.get(key)

    def since(self, position: int, prefix: str = "", limit: int = 1000, scan: int = MAX_SCAN) -> Page:
        """
        The keys starting with C{prefix} whose latest change is after C{position}, at most
        C{limit} of them, looking at no more than C{scan} entries.
        """
        at = bisect_right(self._seqs, position)
        found: list[str] = []
        seqs, key_at = self._seqs, self._key_at
        end = min(len(seqs), at + scan)
        while at < end and len(found) < limit:
            key = key_at.get(seqs[at])
            if key is not None and key.startswith(prefix):
                found.append(key)
            at += 1
        if at == len(seqs):
            return Page(found, self.position, False)
        return Page(found, seqs[at - 1] if at else position, True)

    # Waiting: woken by the writes themselves.

    def wait_for_key(self, key: str) -> Deferred[None]:
        """Fires at the next change of C{key}; cancelling it forgets the waiter."""

        def cancel(d: Deferred[None]) -> None:
            waiting = self._key_waiters.get(key)
            if waiting is not None and d in waiting:
                waiting.remove(d)
                if not waiting:
                    del self._key_waiters[key]

        d: Deferred[None] = Deferred(cancel)
        self._key_waiters.setdefault(key, []).append(d)
        return d

    def wait_for_prefix(self, prefix: str) -> Deferred[None]:
        """Fires at the next change of a key starting with C{prefix}; cancelling it forgets the waiter."""

        def cancel(d: Deferred[None]) -> None:
            self._feed_waiters = [(p, w) for p, w in self._feed_waiters if w is not d]

        d: Deferred[None] = Deferred(cancel)
        self._feed_waiters.append((prefix, d))
        return d

    @property
    def waiting(self) -> int:
        """How many waiters there are, of both kinds."""
        return sum(len(w) for w in self._key_waiters.values()) + len(self._feed_waiters)

    def _wake(self, key: str) -> None:
        woken = self._key_waiters.pop(key, [])
        if self._feed_waiters:
            woken += [d for prefix, d in self._feed_waiters if key.startswith(prefix)]
            self._feed_waiters = [(p, d) for p, d in self._feed_waiters if not key.startswith(p)]
        for d in woken:
            d.callback(None)


#: What L{kvd.store.Store} calls on every change: (key, whether the key is still there).
OnChange = Callable[[str, bool], None]


def unchanged(entry: tuple[str | None, str] | None, version: str) -> bool:
    """
    Whether a watch of C{version} ("": absent) goes on waiting while C{entry} is held: the
    same version; or absent both ways, including a tombstone of C{version} itself, so that
    watching with the version a DELETE answered waits for the next write. (The tombstone a
    node makes of an expired entry keeps that entry's version, which carries its expiry: it
    does not count as that version, as the key is gone.)
    """
    if entry is None or entry[0] is None:
        return version == "" or (entry is not None and entry[1] == version and "~" not in version)
    return entry[1] == version
