"""
The gateway's own failure detector: which nodes this gateway can reach, and how long to wait
for each.

Every quorum call to a node reports back: an answer brings its latency, which feeds a
smoothed mean and mean deviation (as TCP estimates round-trip times); a timeout, a refusal,
a reset, an answer that is not the call's JSON (garbage: no quorum can use it) or a 401 (the
node refuses the cluster secret) marks the node I{unreachable} at once, for this gateway,
whatever the registry says. An unreachable node gets no quorum traffic: it is probed (C{GET
/healthz}) with exponential backoff until it answers 200 with its JSON, and is then used
again. One judged unreachable again soon after (L{FLAP_WINDOW}), having answered no call
since, goes on doubling its last probe interval, so a node that answers probes but not
quorum calls is not given traffic every tenth of a second.

The learned figures give each call its deadline (L{Health.timeout}: a few times the usual
worst case, between L{MIN_TIMEOUT} and the configured C{--timeout}) and give reads the delay
after which they ask one more replica (L{Health.hedge_delay}). A node never heard from gets
the configured timeout: nothing is known about it yet. A call past its deadline to one of the
last nodes the quorums need is not given up: it waits out the whole C{--timeout}; members
the registry has down are not asked, so they do not count among the nodes left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from kvd.membership import NodeInfo
from kvd.transport import DEFAULT_TIMEOUT

_log = Logger()

#: No call is given less than this, however fast the node usually answers. A longer deadline
#: costs little: reads hedge and writes need only W, so neither waits for it while enough
#: other replicas answer; a shorter one judges a node that paused for a collection or an fsync
#: (or that shares a busy machine) unreachable, and a quorum that needed it fails.
MIN_TIMEOUT = 0.5
#: The deadline is this many times the usual worst case (mean + 4 deviations), plus SLACK.
TIMEOUT_FACTOR = 3.0
SLACK = 0.01
#: Reads ask one more replica after the usual worst case of the ones asked, and never sooner than this.
MIN_HEDGE = 0.005
#: Probes of an unreachable node start this far apart and double up to MAX_PROBE_INTERVAL.
FIRST_PROBE_INTERVAL = 0.1
MAX_PROBE_INTERVAL = 2.0
#: A node judged unreachable again within this many seconds of being used again goes on from
#: its last probe interval rather than starting over: one that answers its probes but fails
#: its quorum calls (a half-broken node) then gets a call every MAX_PROBE_INTERVAL at most, not
#: every FIRST_PROBE_INTERVAL, and shows as unreachable nearly all the time.
FLAP_WINDOW = 10.0

#: How a probe asks a node whether it answers: (node id, timeout) -> fires with whether it is healthy.
Probe = Callable[[str, float], "Deferred[bool]"]


@define
class _Node:
    mean: float | None = None
    deviation: float = 0.0
    reachable: bool = True
    reason: str = ""
    backoff: float = 0.0
    #: When it was last judged reachable again, until it answers a call (None: no flap to damp).
    restored: float | None = None
    probe: IDelayedCall | None = None
    probing: Deferred[bool] | None = None


@define
class Health:
    """Per-node latency and reachability, as one gateway sees them."""

    clock: IReactorTime
    #: The longest any call waits: C{--timeout}.
    ceiling: float = DEFAULT_TIMEOUT
    #: Set by whoever can reach the nodes (L{kvd.gateway.nodes.NodeClients}).
    probe: Probe | None = None
    #: A time-out never leaves fewer members than this judged reachable (a refusal does): when
    #: every node is slow the gateway itself is likely the slow one (overloaded, paused), and
    #: routing around all of them would only turn slow answers into failed ones.
    keep_at_least: int = 0
    _nodes: dict[str, _Node] = field(factory=dict)
    #: The ids of the nodes judged unreachable (each one's C{reachable} false), kept as they
    #: are judged: the write path asks of every replica, and a set answers without a call.
    judged_unreachable: set[str] = field(factory=set, init=False)
    #: The members the registry has down: no quorum traffic goes to them, so they are no spares.
    _down: frozenset[str] = frozenset()

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = _Node()
        return node

    def reachable(self, node_id: str) -> bool:
        return node_id not in self.judged_unreachable

    def unreachable(self) -> list[str]:
        """The ids of the nodes judged unreachable, sorted."""
        return sorted(node_id for node_id, node in self._nodes.items() if not node.reachable)

    def usual_worst(self, node_id: str) -> float | None:
        """Mean latency plus four mean deviations (about a p99), or None before the first answer."""
        node = self._nodes.get(node_id)
        if node is None or node.mean is None:
            return None
        return node.mean + 4 * node.deviation

    def timeout(self, node_id: str) -> float:
        """
        How long the next call to the node may take before it counts as lost: the learned
        deadline, or the whole C{--timeout} for a node that is among the last L{keep_at_least}
        reachable ones (a quorum has nobody to route to instead, so giving up early would only
        turn a slow answer into a failed request).
        """
        worst = self.usual_worst(node_id)
        if worst is None or self._among_the_last(node_id):
            return self.ceiling
        return max(min(MIN_TIMEOUT, self.ceiling), min(self.ceiling, TIMEOUT_FACTOR * worst + SLACK))

    def hedge_delay(self, node_ids: Sequence[str]) -> float:
        """How long a read waits on the nodes it asked before it asks one more."""
        worst = [self.usual_worst(node_id) for node_id in node_ids]
        known = [w for w in worst if w is not None]
        if not known or len(known) < len(worst):
            return self.ceiling  # not known yet: wait for the deadline
        return min(self.ceiling, max(MIN_HEDGE, max(known)))

    def succeeded(self, node_id: str, seconds: float) -> None:
        """A call answered after C{seconds}."""
        node = self._node(node_id)
        if node.mean is None:
            node.mean, node.deviation = seconds, seconds / 2
        else:
            error = seconds - node.mean
            node.mean += error / 8
            node.deviation += (abs(error) - node.deviation) / 4
        if not node.reachable:
            self._reachable(node_id, node, "it answered")
        if node.restored is not None:
            # It answered a call, so it is not one that passes probes only: no flap to damp.
            node.restored, node.backoff = None, 0.0

    def failed(self, node_id: str, reason: str, timed_out: bool = False) -> bool:
        """
        A call timed out, was refused or reset, or was answered with garbage: route around the
        node until a probe answers.

        @return: whether the node is judged unreachable now (it was already, or this judged
            it), rather than kept as one of the last L{keep_at_least} after a time-out.
        """
        node = self._node(node_id)
        if not node.reachable:
            return True
        if timed_out and self._among_the_last(node_id):
            return False  # the last ones a quorum needs: slow, but still asked
        if node.restored is None or self.clock.seconds() - node.restored >= FLAP_WINDOW:
            node.backoff = 0.0  # else it flaps: go on from the last interval
        node.reachable, node.reason = False, reason
        self.judged_unreachable.add(node_id)
        _log.warn(
            "node {node} judged unreachable: {reason}; routing around it and probing", node=node_id, reason=reason
        )
        self._schedule(node_id, node)
        return True

    def _among_the_last(self, node_id: str) -> bool:
        if not self.keep_at_least or not self.reachable(node_id):
            return False
        left = sum(other.reachable and other_id not in self._down for other_id, other in self._nodes.items())
        return left <= self.keep_at_least

    def _schedule(self, node_id: str, node: _Node) -> None:
        node.backoff = min(MAX_PROBE_INTERVAL, node.backoff * 2 if node.backoff else FIRST_PROBE_INTERVAL)
        node.probe = self.clock.callLater(node.backoff, self._probe, node_id)

    def _probe(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is None or node.reachable:
            return
        node.probe = None
        if self.probe is None:  # nobody to probe with: let quorum traffic try it again
            self._reachable(node_id, node, "its probe interval passed")
            return
        d = node.probing = self.probe(node_id, self.ceiling)

        def answered(healthy: bool) -> None:
            node.probing = None
            if self._nodes.get(node_id) is not node or node.reachable:
                return
            if healthy:
                self._reachable(node_id, node, "a probe answered")
            else:
                self._schedule(node_id, node)

        def failed(failure: Failure) -> None:
            answered(False)

        d.addCallbacks(answered, failed)

    def _reachable(self, node_id: str, node: _Node, why: str) -> None:
        node.reachable, node.reason, node.restored = True, "", self.clock.seconds()
        self.judged_unreachable.discard(node_id)
        self._cancel(node)
        _log.info("node {node} reachable again: {why}", node=node_id, why=why)

    @staticmethod
    def _cancel(node: _Node) -> None:
        if node.probe is not None and node.probe.active():
            node.probe.cancel()
        node.probe = None
        if node.probing is not None:
            probing, node.probing = node.probing, None
            probing.cancel()

    def keep(self, node_ids: Iterable[str]) -> None:
        """Forget the nodes that are no longer members (and stop probing them)."""
        wanted = set(node_ids)
        for node_id in [n for n in self._nodes if n not in wanted]:
            self._cancel(self._nodes.pop(node_id))
            self.judged_unreachable.discard(node_id)

    def adopt(self, members: Mapping[str, NodeInfo]) -> None:
        """
        The membership the gateway routes with now: forget the nodes that left (L{keep}), and
        count the ones the registry has down as no spares. A member that stopped renewing is
        not asked, so its detector may never judge it; counted as reachable, it would let a
        time-out route around one of the last nodes the quorums really have.
        """
        self.keep(members)
        self._down = frozenset(node_id for node_id, info in members.items() if not info.up)

    def stop(self) -> None:
        """Stop every probe (at shutdown)."""
        for node in self._nodes.values():
            self._cancel(node)

    def to_json(self, node_id: str) -> dict[str, Any]:
        """What C{GET /cluster} shows of a node: whether it is reachable, and its current deadline."""
        node = self._nodes.get(node_id)
        shown: dict[str, Any] = {
            "reachable": node is None or node.reachable,
            "timeout": round(self.timeout(node_id), 4),
        }
        if node is not None and not node.reachable:
            shown["unreachable_because"] = node.reason
        return shown
