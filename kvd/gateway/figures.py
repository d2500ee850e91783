"""
What C{GET /cluster} shows of each node beyond its membership and this gateway's failure
detector: its live key count and the last repair sweep's report for it, as the node's own
C{GET /node} says (L{NodeFigures}), and how many requests this gateway has sent it (counted
where the node clients send, L{kvd.gateway.nodes.NodeClients.sent}).

The nodes are asked at once, through the gateway's own transport (with the cluster secret),
each with a short deadline (L{TIMEOUT}), and their answers are kept for L{MAX_AGE} seconds (or
one per L{MEMBERS_PER_SECOND} members, if longer): a page or a script polling C{/cluster}
costs at most one request per node per that age, and
never waits on a hung node for longer than L{TIMEOUT}. A node that does not answer in time,
answers something that is not its C{/node} JSON, is down in the registry or is judged
unreachable by this gateway has no figures (C{null}).
"""

from __future__ import annotations

from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from kvd.gateway.cluster import ClusterView
from kvd.gateway.nodes import NodeClients
from kvd.internal import RepairReport
from kvd.membership import NodeInfo
from kvd.transport import Answer

#: The longest C{/cluster} waits for a node's C{/node} answer, in seconds.
TIMEOUT = 1.0
#: How long a node's answer (or its silence) is kept before it is asked again, in seconds;
#: longer in a large cluster (L{MEMBERS_PER_SECOND}).
MAX_AGE = 3.0
#: At most this many asks a second on average, whatever the membership: 1,000 members are
#: asked every 10 s, not every L{MAX_AGE}.
MEMBERS_PER_SECOND = 100
#: A C{/node} answer is a few dozen bytes: a node sending more than this is not answering it.
MAX_ANSWER = 16 * 1024


@frozen
class Figures:
    """What a node's own C{GET /node} said of it."""

    #: Its live keys (tombstones not counted).
    keys: int
    #: What the last repair sweep moved for it, if a sweep has reported to it.
    repair: RepairReport | None = None


def parse_node(answer: Answer, node_id: str) -> Figures | None:
    """The figures in a C{GET /node} answer, or None unless it is that node's C{/node} JSON."""
    if answer.status != 200:
        return None
    try:
        body = answer.json()
        keys = body["keys"]
        if type(keys) is not int or keys < 0 or body.get("id", node_id) != node_id:
            return None
        rebalance = body.get("rebalance")
        return Figures(keys, None if rebalance is None else RepairReport.from_json(rebalance))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None


@define
class _Known:
    figures: Figures | None
    at: float


@define
class NodeFigures:
    """Each member's L{Figures}, asked of it at most once per C{max_age}, each ask at most C{timeout} long."""

    nodes: NodeClients
    clock: IReactorTime
    timeout: float = TIMEOUT
    max_age: float = MAX_AGE
    _known: dict[str, _Known] = field(factory=dict)
    _asking: dict[str, Deferred[None]] = field(factory=dict)

    async def of(self, view: ClusterView) -> dict[str, Figures | None]:
        """Every member's figures: kept ones younger than C{max_age}, else asked now (within C{timeout})."""
        for gone in [node_id for node_id in self._known if node_id not in view.members]:
            del self._known[gone]
        now = self.clock.seconds()
        max_age = max(self.max_age, len(view.members) / MEMBERS_PER_SECOND)
        usable = {
            node_id: node
            for node_id, node in view.members.items()
            if node_id not in view.down and self.nodes.health.reachable(node_id)
        }
        waits = []
        for node_id, node in usable.items():
            known = self._known.get(node_id)
            if known is not None and now - known.at < max_age:
                continue
            asking = self._asking.get(node_id)
            if asking is None:
                asking = self._ask(node)
                if not asking.called:  # a refusal can be told at once
                    self._asking[node_id] = asking
            waits.append(asking)
        if waits:
            await DeferredList(waits, consumeErrors=True)
        found: dict[str, Figures | None] = {}
        for node_id in view.members:
            known = self._known.get(node_id)
            found[node_id] = known.figures if node_id in usable and known is not None else None
        return found

    def _ask(self, node: NodeInfo) -> Deferred[None]:
        client = self.nodes(node)
        d = client.counted().call("GET", f"{node.url}/node", timeout=self.timeout, max_answer=MAX_ANSWER)

        def parsed(answer: Answer) -> Figures | None:
            return parse_node(answer, node.id)

        def failed(failure: Failure) -> None:
            return None  # no answer in time, refused, reset or too large: no figures

        def keep(figures: Figures | None) -> None:
            self._asking.pop(node.id, None)
            self._known[node.id] = _Known(figures, self.clock.seconds())

        return d.addCallbacks(parsed, failed).addCallback(keep)

    def to_json(self, node_id: str, figures: dict[str, Figures | None]) -> dict[str, Any]:
        """What C{GET /cluster} adds to a node's entry: C{keys}, C{requests} and C{repair}."""
        found = figures.get(node_id)
        return {
            "keys": None if found is None else found.keys,
            "requests": self.nodes.sent.get(node_id, 0),
            "repair": None if found is None or found.repair is None else found.repair.to_json(),
        }
