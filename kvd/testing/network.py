"""
An in-memory network for tests and simulations: kvd's production transport
(L{kvd.transport.KeepAlivePool}) connected to real C{twisted.web} Sites over iosim
transports, no sockets, everything on one injected clock.

Each host name serves one resource. A host can refuse connections (down), accept and hold
every byte until resumed (paused: a hung or stopped process), and a caller can be cut off
from a host one way (a partition). Bytes move only in L{Network.flush}.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.resource import IResource
from twisted.web.server import Site

from kvd.lean_http import LeanSite
from kvd.transport import DEFAULT_MAX_ANSWER, DEFAULT_TIMEOUT, KeepAlivePool, KeepAliveProtocol, Origin, Peers

#: The caller a connector speaks for when none is named.
ANYONE = "anyone"
#: Twisted's own default (a Site's C{timeout}), not a role's: simulations keep their connections as before.
_SIMULATED_IDLE_TIMEOUT = 60 * 60 * 12


@define
class _Link:
    source: str
    host: str
    pump: IOPump
    client: FakeTransport
    server: FakeTransport

    @property
    def open(self) -> bool:
        return not (self.client.disconnected and self.server.disconnected)


@define
class Network:
    """Hosts by name, and the connections between callers and them."""

    clock: Clock
    sites: dict[str, Site] = field(factory=dict)
    #: Hosts that refuse connections and whose open connections break at the next flush.
    down: set[str] = field(factory=set)
    #: Hosts that accept connections but get and send nothing until resumed.
    paused: set[str] = field(factory=set)
    #: (source, host): the source cannot reach the host (its connections to it break).
    cuts: set[tuple[str, str]] = field(factory=set)
    links: list[_Link] = field(factory=list)

    def serve(self, host: str, resource: IResource) -> None:
        """Serve C{resource} as C{host}; a host served again is a restarted process: its connections break."""
        if host in self.sites:
            self._break(lambda link: link.host == host)
        # The Site the roles serve, so simulations run the lean connection (kvd.lean_http) too.
        self.sites[host] = LeanSite(resource, reactor=self.clock, timeout=_SIMULATED_IDLE_TIMEOUT)

    def pause(self, host: str) -> None:
        self.paused.add(host)

    def resume(self, host: str) -> None:
        self.paused.discard(host)

    def cut(self, source: str, host: str) -> None:
        self.cuts.add((source, host))

    def heal(self, source: str, host: str) -> None:
        self.cuts.discard((source, host))

    def connector(self, source: str = ANYONE) -> Any:
        """A L{KeepAlivePool} C{connect} for calls made by C{source}."""

        def connect_to(origin: Origin, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
            return self._connect(source, origin.host, protocol)

        return connect_to

    def peers(
        self, source: str = ANYONE, timeout: float = DEFAULT_TIMEOUT, max_answer: int = DEFAULT_MAX_ANSWER, **kw: Any
    ) -> Peers:
        """The production client, for calls C{source} makes over this network."""
        pool = KeepAlivePool(self.clock, max_answer=max_answer, connect=self.connector(source))
        return Peers(pool, self.clock, timeout, **kw)

    def _connect(self, source: str, host: str, protocol: KeepAliveProtocol) -> Deferred[KeepAliveProtocol]:
        if host in self.down or host not in self.sites or (source, host) in self.cuts:
            return fail(ConnectionRefusedError(host))
        server = self.sites[host].buildProtocol(None)
        server_io, client_io = FakeTransport(server, isServer=True), FakeTransport(protocol, isServer=False)
        pump = connect(server, server_io, protocol, client_io, greet=False, clock=self.clock)
        self.links.append(_Link(source, host, pump, client_io, server_io))
        return succeed(protocol)

    def _break(self, which: Any) -> None:
        for link in self.links:
            if which(link) and link.open:
                link.client.getOutBuffer()  # bytes in flight are lost with the connection
                link.server.getOutBuffer()
                link.client.abortConnection()
                link.server.abortConnection()
                link.pump.flush()

    def flush(self, rounds: int = 1000) -> None:
        """Move bytes until nothing moves (every answer the network can give is given)."""
        self._break(lambda link: link.host in self.down or (link.source, link.host) in self.cuts)
        for _ in range(rounds):
            moved = False
            for link in list(self.links):
                if link.host not in self.paused and link.pump.pump():
                    moved = True
            self.links = [link for link in self.links if link.open]
            if not moved:
                return
        raise AssertionError(f"the network did not settle in {rounds} rounds")
