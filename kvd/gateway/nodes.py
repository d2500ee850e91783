"""
The client of a storage node's internal API (C{/internal/...}): what gateways call to
replicate, read and repair. This module is the only one that knows that API's wire format
on the calling side; the node's side is in L{kvd.resources.NodeAPI}.

Every answer is checked before it is believed: a node answering something that is not the
expected JSON is a L{PeerError} naming it, never an exception deeper in the gateway.

Quorum traffic is batched per node (L{NodeClient.apply_key}, L{NodeClient.read_key}, and
for conditional writes L{NodeClient.prepare_to}, L{NodeClient.accept_to} and
L{NodeClient.commit_to}, which share one queue): while one request of a kind is in flight to a node, the items for it
queue and go together in the next. A batch is cut at
L{MAX_BATCH} items or once its values pass L{BATCH_VALUE_BUDGET} characters, and a node
cuts its read answers the same way, so the size of an internal message follows from the
value limit (see L{kvd.keys.internal_message_limit}).

The quorum paths report to the gateway's failure detector (L{kvd.gateway.health.Health}):
each batch has the node's learned deadline, its latency or its loss (a garbled answer counting
as one) is recorded, and a node
judged unreachable is not asked at all: its items fail at once with a L{PeerUnreachable}.
A queue holds at most L{MAX_QUEUED} items and L{MAX_QUEUED_CHARS} characters of values;
past that an item fails at once, so a node that stops answering cannot grow the gateway's
memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.codec import wire_json
from kvd.gateway.health import Health
from kvd.gateway.quorum import Reply
from kvd.internal import RepairReport
from kvd.keys import BATCH_VALUE_BUDGET
from kvd.membership import NodeInfo
from kvd.paxos import Promise, Proposal
from kvd.store import Entry, Listed
from kvd.transport import Answer, PeerError, Peers, PeerTimeout, PeerUnreachable

_log = Logger()

T = TypeVar("T")


class GarbledAnswer(PeerError):
    """A node answered an internal call with something that is not that call's JSON."""


class SecretRefused(GarbledAnswer):
    """
    A node answered an internal call 401: it refuses this gateway's cluster secret, so no
    quorum call to it can work until one of them is given the other's (a node that answers
    its probes but none of its calls, as one answering garbage).
    """


#: Items per internal request.
MAX_BATCH = 512

#: The most items, and characters of values, a node's queue of one kind holds.
MAX_QUEUED = 8 * MAX_BATCH
MAX_QUEUED_CHARS = 4 * BATCH_VALUE_BUDGET

#: An item of an apply batch: key, value (None: a tombstone) and version.
Item = tuple[str, "str | None", str]

#: What a node's store holds of a key, as a prepare answers it: whether it is live (not a
#: tombstone), and its version. A proposer needs no more (its value is never sent).
Current = tuple[bool, str]

#: A node's answer to a prepare: its promise (or refusal), and what its store holds.
PromiseAnswer = tuple[Promise, "Current | None"]

#: An item of a conditional writes' batch: ("p", key, ballot), ("a", key, ballot, value,
#: version), ("c", key, value, version) or ("k", key, version).
PaxosItem = tuple[Any, ...]


class Written(NamedTuple):
    """
    What one node made of one write. (A named tuple: one is made for every replica of every
    write, and a frozen attrs class's making, an C{object.__setattr__} a field, cost more.)
    """

    #: Whether the key was live there before.
    live: bool
    #: The version the key holds there now: the write's own, or a newer one the node kept.
    held: str


@frozen
class ChangePage:
    """A page of a node's write order (see L{kvd.changes}): what changed after a position."""

    #: The node's index epoch: a position means something only within one.
    epoch: str
    #: Where to ask from next time.
    next: int
    #: (key, value or None for a tombstone, version), oldest change first; when values
    #: were not asked for, a live key's value is "".
    changes: list[Item]
    #: Whether more changes follow already.
    more: bool
    #: The position of each change in the node's write order.
    positions: list[int] = field(factory=list)


_encode = wire_json


def _value_size(item: Item) -> int:
    return len(item[1] or "")


def _paxos_size(item: PaxosItem) -> int:
    value = item[3] if item[0] == "a" else item[2] if item[0] == "c" else None
    return len(value) if isinstance(value, str) else 0


def _fitting(items: list[T], size: Callable[[T], int]) -> int:
    """How many of the first items make one batch: at most MAX_BATCH, and the budget (one item at least)."""
    budget, count = BATCH_VALUE_BUDGET, 0
    for item in items:
        if count == MAX_BATCH or (count and budget < 0):
            break
        budget -= size(item)
        count += 1
    return count


def split(items: list[T], size: Callable[[T], int]) -> list[list[T]]:
    """C{items} in batches of at most MAX_BATCH items and about BATCH_VALUE_BUDGET of C{size}."""
    batches = []
    while items:
        count = _fitting(items, size)
        batches.append(items[:count])
        items = items[count:]
    return batches or [[]]


@define
class _Queue:
    items: list[tuple[Any, Reply[Any]]] = field(factory=list)
    busy: bool = False
    #: Characters of values in C{items}.
    chars: int = 0


class _Resend:
    """
    Takes a node's answer to a commit by key and version: a L{Written} goes to C{reply}; None
    (the node does not hold that proposal any more) sends the whole commit in its place.
    """

    __slots__ = ("client", "reply", "key", "value", "version")

    def __init__(self, client: NodeClient, reply: Reply[Written], key: str, value: str | None, version: str) -> None:
        self.client, self.reply, self.key, self.value, self.version = client, reply, key, value, version

    def callback(self, answer: Written | None) -> None:
        if answer is None:
            self.client.commit_to(self.reply, self.key, self.value, self.version)
        else:
            self.reply.callback(answer)

    def errback(self, failure: Failure | BaseException) -> None:
        self.reply.errback(failure)


@define
class Cork:
    """
    Shared by a gateway's node clients: while held, single-key calls queue without being
    sent, so the many keys of one client request (a batch) leave together, one internal
    request per node and kind, when it is let go.
    """

    held: int = 0
    corked: list[NodeClient] = field(factory=list)


@define
class NodeClient:
    """Calls to one node's internal API."""

    node: NodeInfo
    peers: Peers
    #: Told (node id, the node's clock in seconds) whenever an answer carries it.
    on_clock: Callable[[str, float], None] | None = None
    health: Health | None = None
    _cork: Cork = field(factory=Cork)
    #: Requests sent, by node id: shared by a gateway's clients (see L{NodeClients.sent}).
    sent: dict[str, int] = field(factory=dict)
    _applies: _Queue = field(factory=_Queue)
    _reads: _Queue = field(factory=_Queue)
    _paxos: _Queue = field(factory=_Queue)
    #: Whether the node said it takes commits of a proposal it accepted by key and version
    #: (L{commit_accepted_to}); a node of the version before does not.
    accepted_commits: bool = False

    @property
    def id(self) -> str:
        return self.node.id

    def counted(self) -> Peers:
        """The transport, for one more request to the node: counted in L{sent}."""
        self.sent[self.node.id] = self.sent.get(self.node.id, 0) + 1
        return self.peers

    def _call(self, path: str, body: object, parse: Callable[[Any], T], timeout: float | None = None) -> Deferred[T]:
        d = self.counted().call("POST", f"{self.node.url}/internal/{path}", _encode(body), timeout=timeout)
        return d.addCallback(self._checked, path, parse)

    def _get(self, path: str, parse: Callable[[Any], T]) -> Deferred[T]:
        d = self.counted().call("GET", f"{self.node.url}/internal/{path}")
        return d.addCallback(self._checked, path, parse)

    def _checked(self, answer: Answer, path: str, parse: Callable[[Any], T]) -> T:
        if answer.status == 401:
            raise SecretRefused(
                self.node.url,
                f"internal {path} answered 401: the node needs the cluster secret (--cluster-secret-file),"
                " which this gateway sends wrong or not at all",
            )
        if answer.status != 200:
            raise PeerError(self.node.url, f"internal {path} answered {answer.status}")
        try:
            return parse(answer.json())
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
            raise GarbledAnswer(self.node.url, f"internal {path} answered something that is not its JSON") from None

    # Whole batches, for the repair sweep and the queues below.

    def apply(self, items: list[Item]) -> Deferred[list[Written]]:
        """
        Make the items durable on the node; fires with what the node made of each. Items
        over one batch's budget go in several requests, one after another.
        """
        parts = split(items, _value_size)
        if len(parts) == 1:
            return self._apply(parts[0])

        async def in_turn() -> list[Written]:
            written: list[Written] = []
            for part in parts:
                written += await self._apply(part)
            return written

        return Deferred.fromCoroutine(in_turn())

    def _apply(self, items: list[Item], timeout: float | None = None) -> Deferred[list[Written]]:
        def parse(body: Any) -> list[Written]:
            live = body["live"]
            # A node that does not say what it holds holds what it was sent.
            held = body["versions"] if "versions" in body else [version for _, _, version in items]
            if not (isinstance(live, list) and isinstance(held, list) and len(live) == len(held) == len(items)):
                raise ValueError("live")
            "".join(held)  # a TypeError (so a PeerError) unless every version is a string: no loop here
            now = body.get("now")
            if type(now) is int and self.on_clock is not None:
                self.on_clock(self.node.id, now / 1000)
            return [Written(bool(was), version) for was, version in zip(live, held, strict=True)]

        # The items are tuples: the wire codec writes them as the arrays they stand for.
        return self._call("apply", {"items": items}, parse, timeout)

    def read(self, keys: list[str], timeout: float | None = None) -> Deferred[dict[str, Entry]]:
        """The entries of those of C{keys} the node holds (tombstones too), asking again for any it deferred."""
        found: dict[str, Entry] = {}

        def parse(body: Any) -> list[str]:
            entries, more = body["entries"], body.get("more", [])
            if not isinstance(entries, dict) or not isinstance(more, list):
                raise ValueError("entries")
            for key, entry in entries.items():
                value, version = entry
                if not (isinstance(version, str) and (value is None or isinstance(value, str))):
                    raise ValueError("entry")
                found[key] = (value, version)
            return [key for key in more if isinstance(key, str)]

        def ask(wanted: list[str]) -> Deferred[dict[str, Entry]]:
            d = self._call("read", {"keys": wanted, "max_chars": BATCH_VALUE_BUDGET}, parse, timeout)
            return d.addCallback(next_round, len(wanted))

        def next_round(more: list[str], asked: int) -> Deferred[dict[str, Entry]] | dict[str, Entry]:
            if not more:
                return found
            if len(more) >= asked:
                raise PeerError(self.node.url, "internal read deferred every key it was asked for")
            return ask(more)

        return ask(keys)

    def digests(self) -> Deferred[list[str]]:
        def parse(body: Any) -> list[str]:
            digests = body["digests"]
            if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
                raise ValueError("digests")
            return digests

        return self._get("digests", parse)

    def versions(self, buckets: list[int]) -> Deferred[tuple[dict[str, str], set[str]]]:
        """key -> version of every key the node holds in the given ranges, and which of them are tombstones."""

        def parse(body: Any) -> tuple[dict[str, str], set[str]]:
            versions, tombstones = body["versions"], body["tombstones"]
            if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
                raise ValueError("versions")
            return versions, {key for key in tombstones if key in versions}

        return self._call("versions", {"buckets": buckets}, parse)

    def drop(self, items: list[tuple[str, str]]) -> Deferred[int]:
        """Forget (key, version) items where the version still matches; fires with how many went."""
        return self._call("drop", {"items": [list(item) for item in items]}, lambda body: int(body["dropped"]))

    def listing(self, prefix: str, after: str | None, limit: int, values: bool) -> Deferred[Listed]:
        """
        The node's next keys under C{prefix} after C{after}, in key order, tombstones
        included (value None); without C{values}, live values are given as C{""}.
        """

        def parse(body: Any) -> Listed:
            entries, more = body["entries"], body["more"]
            if not isinstance(entries, list) or not isinstance(more, bool):
                raise ValueError("entries")
            found: list[tuple[str, str | None, str]] = []
            previous = after
            for key, value, version in entries:
                if not (
                    isinstance(key, str) and isinstance(version, str) and (value is None or isinstance(value, str))
                ):
                    raise ValueError("entry")
                if not key.startswith(prefix) or (previous is not None and key <= previous):
                    raise ValueError("order")  # a node out of order would make the merge skip keys
                found.append((key, value, version))
                previous = key
            if len(found) > limit:
                raise ValueError("limit")
            return Listed(found, more)

        body = {"prefix": prefix, "after": after, "limit": limit, "values": values}
        return self._call("list", body, parse)

    def report(self, report: RepairReport) -> Deferred[None]:
        """Tell the node what the last repair sweep moved for it (its GET /node shows it)."""
        return self._call("progress", report.to_json(), lambda body: None)

    # Conditional writes (see kvd.gateway.cas): a whole batch, for the queue below.

    def paxos(self, items: list[PaxosItem], timeout: float | None = None) -> Deferred[list[Any]]:
        """
        One C{/internal/paxos} request: each item a prepare C{("p", key, ballot)}, an accept
        C{("a", key, ballot, value, version)}, a commit C{("c", key, value, version)} or a
        commit of the proposal the node accepted C{("k", key, version)}; fires with a
        L{PromiseAnswer}, an (accepted, ballot promised) or a L{Written} each (for a
        C{"k"}: None when the node does not hold that proposal).
        """

        def answer(item: PaxosItem, body: Any) -> Any:
            kind = item[0]
            if kind == "p":
                promised, ballot, accepted, entry = body
                if not (type(promised) is bool and type(ballot) is str):
                    raise ValueError("promised")
                proposal = None
                if accepted is not None:
                    a_ballot, value, version = accepted
                    if not (type(a_ballot) is str and type(version) is str and (value is None or type(value) is str)):
                        raise ValueError("accepted")
                    proposal = Proposal(a_ballot, value, version)
                found = None
                if entry is not None:
                    live, version = entry
                    if type(live) is not bool:
                        # A node of the version before answers the entry itself: [value or null, version].
                        if not (live is None or type(live) is str):
                            raise ValueError("entry")
                        live = live is not None
                    if type(version) is not str:
                        raise ValueError("entry")
                    found = (live, version)
                return Promise(promised, ballot, proposal), found
            if body is None and kind == "k":
                return None  # it does not hold the proposal: the whole item goes again
            first, second = body
            if not (type(first) is bool and type(second) is str):
                raise ValueError("accepted" if kind == "a" else "written")
            return (first, second) if kind == "a" else Written(first, second)

        def parse(body: Any) -> list[Any]:
            answers = body["answers"]
            if not (type(answers) is list and len(answers) == len(items)):
                raise ValueError("answers")
            if body.get("accepted_commits") is True:
                self.accepted_commits = True
            now = body.get("now")
            if type(now) is int and self.on_clock is not None:
                self.on_clock(self.node.id, now / 1000)
            return [answer(item, got) for item, got in zip(items, answers, strict=True)]

        # The items are tuples: the wire codec writes them as the arrays they stand for.
        return self._call("paxos", {"items": items}, parse, timeout)

    def changes(
        self,
        since: tuple[str, int] | None,
        prefix: str = "",
        limit: int = 1000,
        wait: float = 0.0,
        values: bool = True,
    ) -> Deferred[ChangePage]:
        """
        The keys changed on the node after C{since} (its epoch and position; None: from now
        on), waiting up to C{wait} seconds there when nothing has.
        """

        def parse(body: Any) -> ChangePage:
            epoch, position, more, changes = body["epoch"], body["next"], body["more"], body["changes"]
            if not (isinstance(epoch, str) and type(position) is int and isinstance(more, bool)):
                raise ValueError("epoch")
            if not isinstance(changes, list):
                raise ValueError("changes")
            items: list[Item] = []
            positions: list[int] = []
            for key, value, version, at in changes:
                if type(at) is not int:
                    raise ValueError("position")
                positions.append(at)
                if not (isinstance(key, str) and isinstance(version, str)):
                    raise ValueError("change")
                if not (value is None or isinstance(value, str)):
                    raise ValueError("change")
                items.append((key, value, version))
            return ChangePage(epoch, position, items, more, positions)

        request = {"since": None if since is None else list(since), "prefix": prefix, "limit": limit}
        d = self.counted().call(
            "POST",
            f"{self.node.url}/internal/changes",
            _encode({**request, "wait": wait, "values": values}),
            timeout=None if wait <= 0 else wait + self.peers.timeout,
        )
        return d.addCallback(self._checked, "changes", parse)

    # One key at a time, batched: the quorum paths.

    def apply_key(self, key: str, value: str | None, version: str) -> Deferred[Written]:
        """Fires with what the node made of the write, once durable there."""
        return self._enqueue(self._applies, (key, value, version), len(value or ""), self._send_applies)

    def prepare(self, key: str, ballot: str) -> Deferred[PromiseAnswer]:
        """L{prepare_to}, with a Deferred."""
        d: Deferred[PromiseAnswer] = Deferred()
        self.prepare_to(d, key, ballot)
        return d

    def accept(self, key: str, proposal: Proposal) -> Deferred[tuple[bool, str]]:
        """L{accept_to}, with a Deferred."""
        d: Deferred[tuple[bool, str]] = Deferred()
        self.accept_to(d, key, proposal)
        return d

    def commit_key(self, key: str, value: str | None, version: str) -> Deferred[Written]:
        """L{commit_to}, with a Deferred."""
        d: Deferred[Written] = Deferred()
        self.commit_to(d, key, value, version)
        return d

    def read_key(self, key: str) -> Deferred[Entry | None]:
        return self._enqueue(self._reads, key, 0, self._send_reads)

    # The same two for a quorum's gathering (L{kvd.gateway.quorum.gather}'s C{tell}): the
    # outcome goes straight to C{reply}, without a Deferred per replica asked.

    def apply_key_to(self, reply: Reply[Written], key: str, value: str | None, version: str) -> None:
        self._queue(self._applies, (key, value, version), len(value or ""), self._send_applies, reply)

    def read_key_to(self, reply: Reply[Entry | None], key: str) -> None:
        self._queue(self._reads, key, 0, self._send_reads, reply)

    # Conditional writes (L{kvd.gateway.cas}), all in one queue, answers straight to C{reply}.

    def prepare_to(self, reply: Reply[PromiseAnswer], key: str, ballot: str) -> None:
        """The node's promise (or refusal) of C{ballot} for C{key}, and what its store holds of it, once durable."""
        self._queue(self._paxos, ("p", key, ballot), 0, self._send_paxos, reply)

    def accept_to(self, reply: Reply[tuple[bool, str]], key: str, proposal: Proposal) -> None:
        """Whether the node accepted the proposal (durably), and the ballot it has promised."""
        item = ("a", key, proposal.ballot, proposal.value, proposal.version)
        self._queue(self._paxos, item, len(proposal.value or ""), self._send_paxos, reply)

    def commit_to(self, reply: Reply[Written], key: str, value: str | None, version: str) -> None:
        """A conditional write's chosen entry, written as L{apply_key} does."""
        self._queue(self._paxos, ("c", key, value, version), len(value or ""), self._send_paxos, reply)

    def commit_accepted_to(self, reply: Reply[Written], key: str, value: str | None, version: str) -> None:
        """
        L{commit_to}, to a node that accepted the proposal of this version: the item names
        the key and version only, and the node commits the value it accepted
        (C{["k", key, version]}). A node that no longer holds that proposal answers so, and
        the whole item goes then; so does it to a node that has not said it takes these.
        """
        if not self.accepted_commits:
            self.commit_to(reply, key, value, version)
            return
        self._queue(self._paxos, ("k", key, version), 0, self._send_paxos, _Resend(self, reply, key, value, version))

    @property
    def reachable(self) -> bool:
        """Whether this gateway's failure detector lets quorum traffic go to the node."""
        return self.health is None or self.health.reachable(self.node.id)

    def _enqueue(self, queue: _Queue, item: Any, chars: int, send: Callable[[], None]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue(queue, item, chars, send, d)
        return d

    def _queue(self, queue: _Queue, item: Any, chars: int, send: Callable[[], None], reply: Reply[Any]) -> None:
        """Queue C{item} for the node's next batch; its outcome goes to C{reply}."""
        health = self.health  # L{reachable}, without its calls: this runs for every replica asked
        if health is not None and self.node.id in health.judged_unreachable:
            reply.errback(Failure(PeerUnreachable(self.node.url, "judged unreachable by this gateway (being probed)")))
            return
        if len(queue.items) >= MAX_QUEUED or (queue.items and queue.chars + chars > MAX_QUEUED_CHARS):
            reply.errback(Failure(PeerError(self.node.url, "too much is already waiting for this node")))
            return
        queue.items.append((item, reply))
        queue.chars += chars
        if self._cork.held:
            if self not in self._cork.corked:
                self._cork.corked.append(self)
        elif not queue.busy:
            send()

    def uncorked(self) -> None:
        """Send what queued while the cork was held."""
        if not self._applies.busy:
            self._send_applies()
        if not self._reads.busy:
            self._send_reads()
        if not self._paxos.busy:
            self._send_paxos()

    def _take(self, queue: _Queue, size: Callable[[Any], int]) -> list[tuple[Any, Reply[Any]]]:
        if not self.reachable:
            # Judged unreachable meanwhile: what waits fails now rather than after a deadline each.
            batch, queue.items, queue.chars, queue.busy = queue.items, [], 0, False
            self._fail(Failure(PeerUnreachable(self.node.url, "judged unreachable by this gateway")), batch)
            return []
        items = queue.items
        if len(items) <= MAX_BATCH and queue.chars <= BATCH_VALUE_BUDGET:
            # All of it fits in one batch (C{chars} is what C{size} sums to): no counting.
            batch, queue.items, queue.chars = items, [], 0
        else:
            count = _fitting(items, lambda queued: size(queued[0]))
            batch, queue.items = items[:count], items[count:]
            queue.chars -= sum(size(item) for item, _ in batch)
        queue.busy = bool(batch)
        return batch

    def _timed(self, path: str, send: Callable[[float | None], Deferred[T]]) -> Deferred[T]:
        """
        Send a quorum batch; report its latency, or its loss, to the failure detector.

        The batch may take the whole C{--timeout}, but at the node's learned deadline the
        failure detector is asked to judge it: if it routes around the node, the batch fails
        then (its requests go to other replicas); if the node is among the last ones the
        quorums need, the batch goes on waiting, since failing it would only turn a slow answer
        (an fsync stalled on a shared disk, a machine under load) into a failed request.
        """
        health = self.health
        if health is None:
            return send(None)
        node_id = self.node.id
        clock = health.clock
        started = clock.seconds()
        learned = health.timeout(node_id)
        d = send(health.ceiling)
        overdue: list[PeerTimeout] = []
        timer = None
        if learned < health.ceiling:

            def judge() -> None:
                late = PeerTimeout(f"{self.node.url}/internal/{path}", f"no answer within {learned:g}s")
                if health.failed(node_id, str(late), timed_out=True):
                    overdue.append(late)
                    d.cancel()

            timer = clock.callLater(learned, judge)

        def answered(result: T) -> T:
            if timer is not None and timer.active():
                timer.cancel()
            health.succeeded(node_id, clock.seconds() - started)
            return result

        def lost(failure: Failure) -> Failure:
            if timer is not None and timer.active():
                timer.cancel()
            if overdue:
                return Failure(overdue[0])
            if failure.check(PeerTimeout, PeerUnreachable, GarbledAnswer):
                # A node answering garbage serves no quorum either: routed around and probed, as a refusal.
                health.failed(node_id, failure.getErrorMessage(), timed_out=bool(failure.check(PeerTimeout)))
            return failure

        return d.addCallbacks(answered, lost)

    def _send_applies(self) -> None:
        batch = self._take(self._applies, _value_size)
        if batch:
            items = [item for item, _ in batch]
            d = self._timed("apply", lambda timeout: self._apply(items, timeout))
            d.addCallbacks(self._deliver, self._fail, callbackArgs=(batch,), errbackArgs=(batch,))
            d.addBoth(lambda _: self._send_applies())

    def _send_reads(self) -> None:
        batch = self._take(self._reads, lambda key: 0)
        if batch:
            keys = [key for key, _ in batch]
            d = self._timed("read", lambda timeout: self.read(keys, timeout))
            d.addCallbacks(self._deliver_entries, self._fail, callbackArgs=(batch,), errbackArgs=(batch,))
            d.addBoth(lambda _: self._send_reads())

    def _send_paxos(self) -> None:
        batch = self._take(self._paxos, _paxos_size)
        if batch:
            items = [item for item, _ in batch]
            d = self._timed("paxos", lambda timeout: self.paxos(items, timeout))
            d.addCallbacks(self._deliver, self._fail, callbackArgs=(batch,), errbackArgs=(batch,))
            d.addBoth(lambda _: self._send_paxos())

    # A Deferred keeps what its callbacks raise; a L{Reply} called directly must not stop the
    # rest of the batch being told.

    @staticmethod
    def _deliver(outcomes: Iterable[Any], batch: list[tuple[Any, Reply[Any]]]) -> None:
        for (_, d), outcome in zip(batch, outcomes, strict=True):
            try:
                d.callback(outcome)
            except Exception:
                _log.failure("delivering a node's answer")

    @staticmethod
    def _deliver_entries(entries: dict[str, Entry], batch: list[tuple[str, Reply[Any]]]) -> None:
        for key, d in batch:
            try:
                d.callback(entries.get(key))
            except Exception:
                _log.failure("delivering a node's answer")

    def _fail(self, failure: Any, batch: list[tuple[Any, Reply[Any]]]) -> None:
        error = failure.value if isinstance(failure.value, PeerError) else PeerError(self.node.url, str(failure.value))
        for _, d in batch:
            try:
                d.errback(Failure(error))
            except Exception:
                _log.failure("delivering a node's failure")


@define
class NodeClients:
    """
    One L{NodeClient} per member, made anew when a member's URL or weight changes, all
    reporting to one failure detector (made on the peers' clock unless given), which probes
    through them.
    """

    peers: Peers
    on_clock: Callable[[str, float], None] | None = None
    health: Health = field(
        default=Factory(lambda self: Health(self.peers.reactor, self.peers.timeout), takes_self=True)
    )
    _clients: dict[str, NodeClient] = field(factory=dict)
    _cork: Cork = field(factory=Cork)
    #: How many requests this gateway has sent each node, by id (C{/cluster} shows it).
    sent: dict[str, int] = field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.health.probe = self.probe

    def __call__(self, node: NodeInfo) -> NodeClient:
        client = self._clients.get(node.id)
        if client is None or (client.node is not node and client.node != node):
            client = self._clients[node.id] = NodeClient(
                node, self.peers, self.on_clock, self.health, self._cork, self.sent
            )
        return client

    def probe(self, node_id: str, timeout: float) -> Deferred[bool]:
        """Whether the node answers C{GET /healthz} with 200 and its JSON within C{timeout}."""
        client = self._clients.get(node_id)
        if client is None:
            return fail(PeerError(node_id, "not a member"))
        d = client.counted().call("GET", f"{client.node.url}/healthz", timeout=timeout)
        return d.addCallback(_healthy)

    def cork(self) -> None:
        """Hold every single-key call until L{uncork}: see L{Cork}. Calls nest."""
        self._cork.held += 1

    def uncork(self) -> None:
        cork = self._cork
        cork.held -= 1
        if not cork.held:
            corked, cork.corked = cork.corked, []
            for client in corked:
                client.uncorked()


def _healthy(answer: Answer) -> bool:
    """Whether a C{/healthz} answer is a node's saying it is well (not just any 200: garbage is no node)."""
    if answer.status != 200:
        return False
    try:
        body = answer.json()
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and body.get("success") is True
