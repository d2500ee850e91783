"""
The gateway's domain: where keys live and how a request reaches them.

    cluster.py      the members and the ring; a key's owners and fallbacks; frozen views
    nodes.py        the client of a node's internal API (the only place that knows its wire
                    format), with per-node batching
    quorum.py       one helper that gathers W or R answers, replacing failed replicas
    coordinator.py  quorum writes and reads, hinted handoff, read repair
    repair.py       the repair sweep: anti-entropy, handoff delivery, rebalancing, tombstones

Nothing here imports klein or the reactor; outgoing HTTP goes through L{kvd.transport.Peers}.
"""

from kvd.gateway.cluster import DEFAULT_REPLICAS, Cluster, ClusterView, NoNodes

__all__ = ["DEFAULT_REPLICAS", "Cluster", "ClusterView", "NoNodes"]
