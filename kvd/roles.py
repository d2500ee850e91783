"""
Each role's service tree, assembled in one place from its config (L{kvd.options}): the domain
objects, the HTTP app and its site, the outgoing clients, the timers and the signals. This is
where the files a config names (secrets, the CA certificate) are read.

Start-up errors (a secret file that cannot be read, a data dir that cannot be used, a port in
use) end the process with one readable line on stderr and a non-zero status, never a traceback:
everything that can fail does so while the tree is built or in C{privilegedStartService},
before any service has started a thread.
"""

from __future__ import annotations

import collections
import gc
import os
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NoReturn

from attrs import frozen
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import fail as failed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IProcessTransport,
    IReactorCore,
    IReactorThreads,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LoggingFile
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.resource import IResource

from kvd.auth import Auth, BadSecretFile, bearer, read_secret
from kvd.gateway import Cluster
from kvd.gateway.cas import Proposer
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.health import Health
from kvd.gateway.hot import HotKeys
from kvd.gateway.nodes import NodeClients
from kvd.gateway.repair import Repairer
from kvd.gateway.skew import ClockSkew
from kvd.incarnation import raise_incarnation
from kvd.keys import DEFAULT_MAX_VALUE_BYTES, internal_message_limit
from kvd.lean_http import LeanSite
from kvd.membership import Heartbeat, NodeInfo, Union, Watcher
from kvd.metrics import Metrics
from kvd.options import Config, DevConfig, GatewayConfig, NodeConfig, RegistryConfig
from kvd.paxos import Acceptor
from kvd.registry import Registry
from kvd.registry_client import RegistryClient
from kvd.resources import GatewayAPI, NodeAPI, RegistryAPI
from kvd.store import Runner, Store, StoreError, next_incarnation, synchronous
from kvd.transport import DEFAULT_TIMEOUT, KeepAlivePool, Peers
from kvd.validate import Invalid, base_url
from kvd.versions import HybridClock
from kvd.workers import LISTEN_FD, Supervisor, WorkerProtocol, worker_argv

__all__ = ["assemble", "dev", "fail", "gateway", "node", "registry", "worker_services"]

_log = Logger()

DEV_REGISTRY_PORT, DEV_GATEWAY_PORT, DEV_FIRST_NODE_PORT = 8500, 8000, 8001
#: Registry bodies are small JSON objects.
REGISTRY_MAX_BODY = 64 * 1024


def fail(message: str, status: int = 1) -> NoReturn:
    """End start-up with one line on the operator's stderr."""
    # Once twistd has started logging, sys.stderr feeds the log; the operator is on the original.
    logging = isinstance(sys.stderr, LoggingFile)
    stream = sys.__stderr__ if logging and sys.__stderr__ else sys.stderr
    stream.write(f"twistd kvd: {message}\n")
    stream.flush()
    if logging:
        _log.critical("{message}", message=message)
    raise SystemExit(status)


@frozen
class Credentials:
    """What the files a config names hold: who may call this process, and whom it trusts."""

    auth: Auth
    tls: BrowserLikePolicyForHTTPS


def credentials(config: Config, client_token_file: str | None = None) -> Credentials:
    try:
        auth = Auth(
            read_secret(config.cluster_secret_file, "cluster secret") if config.cluster_secret_file else None,
            read_secret(client_token_file, "client token") if client_token_file else None,
        )
    except BadSecretFile as e:
        fail(str(e))
    return Credentials(auth, tls_policy(config.ca_cert))


def tls_policy(ca_cert: str | None) -> BrowserLikePolicyForHTTPS:
    """How outgoing https calls check certificates: against C{ca_cert}, else the system's CAs."""
    if ca_cert is None:
        return BrowserLikePolicyForHTTPS()
    try:
        with open(ca_cert, "rb") as f:
            pem = f.read()
    except OSError as e:
        fail(f"cannot read --ca-cert {ca_cert}: {e.strerror}")
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception:
        certificates = []
    if not certificates:
        fail(f"--ca-cert {ca_cert} holds no PEM certificate")
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certificates))


def advertised_url(address: IAddress, tls: bool) -> str | None:
    """The URL other processes reach a listening address at; None when it is not an IP address."""
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    host = address.host
    if host in ("", "0.0.0.0", "::"):
        # The machine's own name: what other machines can resolve to it (getfqdn() can
        # answer "localhost", which would send them to themselves).
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{address.port}"


class JournalThread:
    """
    One long-lived thread for a store's journal writes: jobs to it through a deque and a
    pipe's byte, C{callFromThread} back. A round trip costs about 25 us of CPU here against
    45 us for a thread pool's job (C{deferToThreadPool}), and a node makes one per group commit.

    The thread is woken by a write to a pipe, not a C{queue.SimpleQueue}: its C{put} wakes the
    sleeping thread while holding the GIL, and on a loaded machine the wake-up preempted the
    reactor with the GIL in hand (a quarter of a node's GIL-holding samples sat on that line).
    C{os.write} lets go of the GIL for the system call.

    The byte is written only when the thread is about to sleep, or asleep: a job handed over
    while it runs the one before (the store hands the next group commit over during the
    previous fsync) is found in the deque with no system call and no wake-up. The thread
    sets C{_idle} and only then looks at the deque a last time before it sleeps, and a
    caller appends before it reads C{_idle}: under the GIL one of the two sees the other's
    step, so no job is left waiting for a wake-up that never comes (at worst a stray byte
    makes one later sleep end at once).
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self._name = name
        self._jobs: collections.deque[tuple[Callable[[], Any], Deferred[Any]] | None] = collections.deque()
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        #: Whether the thread may be asleep (or about to be) in its read of the pipe.
        self._idle = True
        #: Pipe bytes written, for tests and figures: one per wake-up needed, not per job.
        self.pokes = 0

    def __call__(self, f: Callable[[], Any]) -> Deferred[Any]:
        if self._stopped:
            return failed(RuntimeError(f"{self._name}: the journal thread has stopped"))
        d: Deferred[Any] = Deferred()
        self._jobs.append((f, d))
        if self._idle:
            self._poke()
        return d

    def _pipe(self) -> tuple[int, int]:
        if self._wake is None:
            self._wake = os.pipe()
            os.set_blocking(self._wake[1], False)
        return self._wake

    def _poke(self) -> None:
        self.pokes += 1
        try:
            os.write(self._pipe()[1], b"j")
        except BlockingIOError:
            pass  # a full pipe wakes the thread all the same; the deque holds the jobs

    def start(self) -> None:
        self._pipe()
        assert self._wake is not None
        self._thread = threading.Thread(target=self._loop, args=(self._wake[0],), name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        if self._thread is not None:
            self._jobs.append(None)
            self._poke()
            self._thread.join()
            self._thread = None
        if self._wake is not None:
            for fd in self._wake:
                os.close(fd)
            self._wake = None

    def _loop(self, wake: int) -> None:
        jobs = self._jobs
        while True:
            while jobs:
                job = jobs.popleft()
                if job is None:
                    return
                f, d = job
                try:
                    result = f()
                except BaseException:
                    self._reactor.callFromThread(d.errback, Failure())
                else:
                    self._reactor.callFromThread(d.callback, result)
            self._idle = True
            if not jobs:  # the last look, after the flag: a job appended before it was set is seen here
                os.read(wake, 4096)  # a byte at least; the deque says how many jobs
            self._idle = False


class StoreService(service.Service):
    """
    Owns a node's store and the threads its file I/O runs on. At stop it lets every pending
    write become durable, and only then stops the threads: stopped first, they would drop
    the last group commit and leave its writers waiting forever.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name=name)
        self.journal = JournalThread(reactor, f"{name}-journal")
        self.store: Store | None = None

    def run(self, f: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f)

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.journal.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.store is None:
            self._stop_threads(None)
            return succeed(None)
        return self.store.close().addBoth(self._stop_threads)

    def _stop_threads(self, result: object) -> object:
        self.pool.stop()
        self.journal.stop()
        return result


class ListenService(StreamServerEndpointService):
    """
    Twisted's endpoint service, listening in C{privilegedStartService} (before any service
    starts a thread) so that a failure ends the process with one line; it stops listening
    first at shutdown, so in-flight requests can finish.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, description: str) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        self.description = description
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            fail(f"cannot listen on {self.description}: {e}")
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)
        if self.port is None:
            fail(f"cannot listen on {self.description}: the endpoint did not start at once")
        _log.info("listening on {description}", description=self.description)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port


class HeartbeatService(service.Service):
    """
    Keeps a node registered with one registry while it runs; leaves it first thing at stop.
    The URL it registers is asked for once the node listens, so it can name the real port.
    """

    def __init__(self, make: Callable[[], Heartbeat]) -> None:
        self.make = make
        self.heartbeat: Heartbeat | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.heartbeat = self.make()

    def startService(self) -> None:
        super().startService()
        if self.heartbeat is None:
            self.heartbeat = self.make()
        self.heartbeat.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.heartbeat is None:
            return succeed(None)
        return Deferred.fromCoroutine(self.heartbeat.stop())


class WatcherService(service.Service):
    def __init__(self, watcher: Watcher | Union) -> None:
        self.watcher = watcher

    def startService(self) -> None:
        super().startService()
        self.watcher.start()

    def stopService(self) -> None:
        super().stopService()
        self.watcher.stop()


class HealthService(service.Service):
    """Stops the gateway's failure detector's probes at stop."""

    def __init__(self, health: Health) -> None:
        self.health = health

    def stopService(self) -> None:
        super().stopService()
        self.health.stop()


class HTTPClientService(service.Service):
    """
    Owns the kept-alive connections of a process's outgoing calls; closes them at stop.
    Answers are capped at what values of up to C{max_value_bytes} make.
    """

    def __init__(
        self, reactor: Any, timeout: float, credentials: Credentials, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES
    ) -> None:
        self.keep_alive = KeepAlivePool(
            reactor, max_answer=internal_message_limit(max_value_bytes), tls_policy=credentials.tls
        )
        secret = credentials.auth.cluster_secret
        self.peers = Peers(self.keep_alive, reactor, timeout, authorization=bearer(secret) if secret else None)

    def stopService(self) -> None:
        super().stopService()
        self.keep_alive.close()


def _listener(
    reactor: Any, config: Config, listen: str, resource: IResource, max_body: int, metrics: Metrics
) -> ListenService:
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, listen)
    except Exception as e:  # bad syntax, or an ssl: certificate that cannot be read
        fail(f"bad --listen endpoint {listen!r}: {e or type(e).__name__}")
    site = LeanSite(
        resource,
        max_body=max_body,
        access_log=config.access_log,
        metrics=None if config.no_metrics else metrics,
    )
    return ListenService(endpoint, site, listen)


def node_metrics(store: Store) -> Metrics:
    """A node's metrics: its store's size, and the time and size of each group commit."""
    metrics = Metrics()
    metrics.gauges(
        ("kvd_keys", "Live keys held (tombstones not counted).", lambda: len(store)),
        ("kvd_journal_bytes", "Size of the journal since the last snapshot.", lambda: store.journal_bytes),
        ("kvd_snapshot_bytes", "Size of the last snapshot.", lambda: store.snapshot_bytes),
    )
    fsync = metrics.histogram("kvd_fsync_seconds", "Time of one group commit: journal write and fsync.")
    batch = metrics.histogram(
        "kvd_group_commit_writes", "Writes made durable by one group commit.", (1, 2, 4, 8, 16, 32, 64, 128, 256)
    )

    def observe(seconds: float, writes: int) -> None:
        fsync.observe(seconds)
        batch.observe(writes)

    store.observe_commit = observe
    return metrics


def registry_metrics(members: Registry) -> Metrics:
    metrics = Metrics()
    metrics.gauges(
        ("kvd_registry_leases", "Members holding a live lease.", lambda: len(members.members("up"))),
        (
            "kvd_registry_members_down",
            "Members whose lease ran out, kept as down.",
            lambda: len(members.members("down")),
        ),
        ("kvd_registry_index", "The registry's change index.", lambda: members.index),
        ("kvd_registry_long_polls", "Long polls waiting for a change.", lambda: members.waiting),
    )
    return metrics


def gateway_metrics(
    cluster: Cluster, repairer: Repairer | None, skew: ClockSkew | None = None, health: Health | None = None
) -> Metrics:
    metrics = Metrics()
    if health is not None:
        reachable = health.reachable

        def unreachable() -> int:
            view = cluster.view()
            return sum(not view.usable(node_id, reachable) for node_id in view.members)

        metrics.gauges(
            (
                "kvd_unreachable_nodes",
                "Ring members this gateway judges unreachable (or the registry has down).",
                unreachable,
            )
        )
    if skew is not None:
        metrics.gauges(
            (
                "kvd_clock_skew_seconds",
                "This gateway's clock minus a node's, the largest of them (positive: the gateway is ahead).",
                skew.largest,
            )
        )
    metrics.gauges(("kvd_ring_members", "Nodes on the gateway's ring.", lambda: len(cluster.members)))
    if repairer is None:  # a --workers gateway's worker: repair runs in the main process
        return metrics
    progress = repairer.progress
    metrics.gauges(
        ("kvd_repair_backlog", "Keys the last repair sweep still had to send.", lambda: progress.keys_to_send),
        ("kvd_repair_sent", "Keys repair sweeps have sent to their owners.", lambda: progress.sent),
        ("kvd_repair_dropped", "Keys dropped from nodes that no longer own them.", lambda: progress.dropped),
    )
    return metrics


def _log_expiry_failure(failure: Any) -> None:
    _log.warn("could not turn expired entries into tombstones: {why}", why=failure.getErrorMessage())


def node(reactor: Any, config: NodeConfig) -> list[service.Service]:
    """One storage node's services, in start order."""
    creds = credentials(config, config.client_token_file)
    storage = StoreService(reactor, f"kvd-store-{config.node_id}")
    try:
        store = storage.store = Store.open(
            config.data_dir,
            clock=HybridClock(reactor.seconds, config.node_id),
            run=storage.run,
            fsync=config.fsync == "always",
            later=reactor.callLater,
            write=storage.journal,
        )
        # Before serving: the first repair sweep would otherwise index every key on the event loop.
        store.index_ranges()
        # Its records go to the store's journal: a batch's promises, acceptances and commits
        # are one write + fsync on the journal's thread (a paxos.jsonl of before is carried over).
        # Before the start is counted: a corrupt paxos.jsonl stops start-up touching no file.
        acceptor = Acceptor.in_store(store, now=reactor.seconds)
        incarnation = next_incarnation(config.data_dir)
    except StoreError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot use data dir {config.data_dir}: {e}")
    api = NodeAPI(
        config.node_id, store, config.max_value_bytes, node_metrics(store), creds.auth, acceptor=acceptor, clock=reactor
    )
    listener = _listener(reactor, config, config.listen, api.resource(), config.max_value_bytes, api.metrics)
    # Expired entries read as absent at once; this turns them into tombstones (freeing their values).
    expiry = TimerService(1.0, lambda: store.expire().addErrback(_log_expiry_failure))
    expiry.clock = reactor
    services: list[service.Service] = [storage, listener, expiry]
    if not config.registry:
        return services

    def url() -> str:
        if config.advertise is not None:
            return config.advertise
        assert listener.port is not None
        found = advertised_url(listener.port.getHost(), tls=config.listen.partition(":")[0] == "ssl")
        if found is None:
            fail(f"cannot tell the URL of --listen {config.listen!r}: give --advertise URL")
        try:
            return base_url(found, "the URL of --listen")
        except Invalid as e:
            fail(f"{e} Give --advertise URL.")

    def persist_incarnation(at_least: int) -> None:
        try:
            raise_incarnation(config.data_dir, at_least)
        except OSError as e:
            _log.error(
                "cannot record incarnation {incarnation} in {data_dir}: {error}",
                incarnation=at_least,
                data_dir=config.data_dir,
                error=e,
            )

    client = HTTPClientService(reactor, DEFAULT_TIMEOUT, creds)
    services.append(client)
    # One heartbeat per registry: a node registers with every one (they share nothing).
    for registry_url in config.registry:
        registry_client = RegistryClient(client.peers, registry_url)

        def heartbeat(registry_client: RegistryClient = registry_client) -> Heartbeat:
            return Heartbeat(
                registry_client, config.node_id, url(), incarnation, reactor, on_incarnation=persist_incarnation
            )

        services.append(HeartbeatService(heartbeat))
    return services


def registry(reactor: Any, config: RegistryConfig) -> list[service.Service]:
    creds = credentials(config)
    members = Registry(config.ttl, config.forget_after)
    api = RegistryAPI(members, reactor, registry_metrics(members), creds.auth)
    expiry = TimerService(min(1.0, config.ttl / 4), lambda: members.expire(reactor.seconds()))
    expiry.clock = reactor
    return [expiry, _listener(reactor, config, config.listen, api.resource(), REGISTRY_MAX_BODY, api.metrics)]


def gateway(reactor: Any, config: GatewayConfig) -> list[service.Service]:
    """A gateway's services; with several --registry it follows every one and takes the union."""
    return _gateway(reactor, config)[0]


def worker_services(
    reactor: Any, config: GatewayConfig, index: int, fd: int, family: socket.AddressFamily
) -> tuple[list[service.Service], Callable[[dict[str, NodeInfo]], None]]:
    """
    Worker C{index} of a C{--workers} gateway: serving on the listening socket C{fd} it was
    given, following no registry and sweeping nothing; and what to call with each membership.
    """
    return _gateway(reactor, config, _Adopted(index, fd, family))


@frozen
class _Adopted:
    """A worker's listening socket, opened by the main process."""

    index: int
    fd: int
    family: socket.AddressFamily


def _gateway(
    reactor: Any, config: GatewayConfig, worker: _Adopted | None = None
) -> tuple[list[service.Service], Callable[[dict[str, NodeInfo]], None]]:
    creds = credentials(config, config.client_token_file)
    # Rings are built on the reactor's threads: 0.5 s at 100 nodes would stall every request.
    run: Runner[Any] = synchronous
    if IReactorThreads.providedBy(reactor):
        run = partial(deferToThreadPool, reactor, reactor.getThreadPool())
    cluster = Cluster(vnodes=config.vnodes, replicas=config.replicas, run=run)
    client = HTTPClientService(reactor, config.timeout, creds, config.max_value_bytes)
    # A gateway never times out of reach the last nodes its quorums need.
    health = Health(reactor, config.timeout, keep_at_least=max(config.write_quorum, config.read_quorum))
    skew = ClockSkew(reactor.seconds)

    def adopted(members: Mapping[str, NodeInfo]) -> None:
        # Once the gateway routes with a membership: a member that left is no longer probed,
        # one the registry has down is no spare, and the clock of one that left no longer counts.
        health.adopt(members)
        skew.keep(members)

    cluster.adopted = adopted
    services: list[service.Service] = [client, HealthService(health)]
    workers = WorkersService(reactor, config) if worker is None and config.workers > 1 else None

    def follow(members: dict[str, NodeInfo]) -> None:
        cluster.update(members)
        if workers is not None:  # only the main process follows registries: its workers hear it from it
            workers.supervisor.forward(members)

    if config.static_nodes:
        # Known before the gateway listens: built here, so its first request finds the ring.
        threads, cluster.run = cluster.run, synchronous
        cluster.update({node_id: NodeInfo(node_id, url) for node_id, url in config.static_nodes.items()})
        cluster.run = threads
    elif worker is None:
        watcher: Watcher | Union
        if len(config.registry) == 1:
            watcher = Watcher(RegistryClient(client.peers, config.registry[0]), reactor, follow)
        else:
            watcher = Union(follow)
            for registry_url in config.registry:
                watcher.follow(RegistryClient(client.peers, registry_url), reactor)
        services.append(WatcherService(watcher))
    # Versions and TTLs are reckoned by the nodes' clocks when this one is far off theirs.
    clock = HybridClock(skew.cluster_now, f"gw-{secrets.token_hex(4)}")
    nodes = NodeClients(client.peers, skew.observe, health)
    coordinator = Coordinator(cluster, nodes, clock, config.write_quorum, config.read_quorum)
    repairer: Repairer | None = None
    if worker is None:  # repair sweeps run once, in the main process
        repairer = sweeping = Repairer(cluster, nodes, reactor.seconds, config.tombstone_grace)
        sweeps = TimerService(config.repair_interval, lambda: Deferred.fromCoroutine(sweeping.sweep()))
        sweeps.clock = reactor
        services.append(sweeps)
    proposer = Proposer(cluster, nodes, clock, reactor, config.write_quorum)
    metrics = gateway_metrics(cluster, repairer, skew, health)
    metrics.gauges(
        (
            "kvd_cas_rounds_lost",
            "Conditional-write rounds lost to another ballot since start.",
            lambda: proposer.conflicts,
        ),
        (
            "kvd_cas_recovered",
            "Unfinished conditional writes finished by this gateway since start.",
            lambda: proposer.recovered,
        ),
        (
            "kvd_cas_asked",
            "Prepares and accepts sent by this gateway since start (hedges included).",
            lambda: proposer.asked,
        ),
    )
    if config.workers > 1:
        index = 0 if worker is None else worker.index
        metrics.gauges(
            (
                "kvd_gateway_worker",
                "Which process of a --workers gateway answered: 0 the main one, 1 up a worker.",
                lambda: index,
            ),
            ("kvd_gateway_pid", "The process id of the gateway process that answered.", os.getpid),
        )
    api = GatewayAPI(
        cluster,
        coordinator,
        config.max_value_bytes,
        metrics,
        creds.auth,
        repairer,
        proposer,
        None if config.no_hot_keys else HotKeys(reactor),
        clock=reactor,
    )
    if worker is None:
        listener = _listener(reactor, config, config.listen, api.resource(), config.max_value_bytes, api.metrics)
        services.append(listener)
        if workers is not None:
            workers.listener = listener
            services.append(workers)
    else:
        services.append(_adopted_listener(reactor, config, worker, api.resource(), api.metrics, cluster.ready))
    return services, follow


class WorkersService(service.Service):
    """
    A --workers gateway's workers: started once its port listens (they are given that socket),
    stopped at shutdown.
    """

    def __init__(self, reactor: Any, config: GatewayConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.supervisor = Supervisor(config.workers - 1, self._spawn, reactor)
        self.listener: ListenService | None = None
        self._socket: tuple[int, socket.AddressFamily] | None = None

    def _spawn(self, protocol: WorkerProtocol, index: int) -> IProcessTransport:
        assert self._socket is not None
        fd, family = self._socket
        argv = worker_argv(self.config, index, family)
        return self.reactor.spawnProcess(  # type: ignore[no-any-return]
            protocol, argv[0], argv, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: fd}
        )

    def startService(self) -> None:
        super().startService()
        assert self.listener is not None and self.listener.port is not None
        port = self.listener.port
        family = socket.AF_INET6 if isinstance(port.getHost(), IPv6Address) else socket.AF_INET
        self._socket = (port.fileno(), family)  # type: ignore[attr-defined]
        self.supervisor.start()
        _log.info("started {count} workers", count=self.supervisor.count)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.supervisor.stop()


class AdoptedListenService(service.Service):
    """
    A worker's share of the main process's listening socket. It starts taking connections
    once C{ready} fires (the worker has its first membership in use): until then the other
    processes take them all, so a worker just started answers no request with "no nodes".
    """

    def __init__(self, reactor: Any, adopted: _Adopted, factory: Any, ready: Callable[[], Deferred[None]]) -> None:
        self.reactor = reactor
        self.adopted = adopted
        self.factory = factory
        self.ready = ready
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.ready().addCallback(lambda _: self._adopt()).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        # The main process starts a worker that ended again (with backoff); one that stayed
        # up without serving would never be replaced.
        _log.failure("worker {index} could not start serving; stopping", failure, index=self.adopted.index)
        self.reactor.stop()

    def _adopt(self) -> None:
        if not self.running:
            os.close(self.adopted.fd)
            return
        try:
            self.port = self.reactor.adoptStreamPort(self.adopted.fd, self.adopted.family, self.factory)
        except Exception as e:
            fail(f"worker {self.adopted.index} cannot adopt the listening socket (fd {self.adopted.fd}): {e}")
        # The main process holds the socket too; this process's copy is the adopted port's own now.
        os.close(self.adopted.fd)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        return self.port.stopListening()


def _adopted_listener(
    reactor: Any,
    config: GatewayConfig,
    worker: _Adopted,
    resource: IResource,
    metrics: Metrics,
    ready: Callable[[], Deferred[None]],
) -> AdoptedListenService:
    factory: Any = LeanSite(
        resource,
        max_body=config.max_value_bytes,
        access_log=config.access_log,
        metrics=None if config.no_metrics else metrics,
    )
    if config.listen.partition(":")[0] == "ssl":
        # The main process's ssl: endpoint, parsed again for its certificate options: Twisted keeps
        # them on the endpoint (no public accessor); the worker wraps its Site in TLS with them.
        endpoint = serverFromString(reactor, config.listen)
        context = getattr(endpoint, "_sslContextFactory", None)
        if context is None:
            fail(f"worker {worker.index} cannot find the TLS settings of --listen {config.listen!r}")
        factory = TLSMemoryBIOFactory(context, False, factory)
    return AdoptedListenService(reactor, worker, factory, ready)


def dev_configs(config: DevConfig) -> tuple[RegistryConfig, list[NodeConfig], GatewayConfig]:
    """The roles a dev cluster runs, on its fixed loopback ports."""
    common: dict[str, Any] = {
        "access_log": config.access_log,
        "no_metrics": config.no_metrics,
        "cluster_secret_file": config.cluster_secret_file,
        "ca_cert": config.ca_cert,
    }
    registry_url = f"http://127.0.0.1:{DEV_REGISTRY_PORT}"
    nodes = [
        NodeConfig(
            listen=f"tcp:{port}:interface=127.0.0.1",
            node_id=f"node{number}",
            data_dir=os.path.join(config.data_dir, f"node{number}"),
            registry=(registry_url,),
            advertise=f"http://127.0.0.1:{port}",
            fsync=config.fsync,
            max_value_bytes=config.max_value_bytes,
            client_token_file=config.client_token_file,
            **common,
        )
        for number, port in enumerate(range(DEV_FIRST_NODE_PORT, DEV_FIRST_NODE_PORT + config.nodes), 1)
    ]
    return (
        RegistryConfig(
            listen=f"tcp:{DEV_REGISTRY_PORT}:interface=127.0.0.1",
            ttl=config.ttl,
            forget_after=config.forget_after,
            **common,
        ),
        nodes,
        GatewayConfig(
            listen=f"tcp:{DEV_GATEWAY_PORT}:interface=127.0.0.1",
            registry=(registry_url,),
            static_nodes={},
            vnodes=config.vnodes,
            replicas=config.replicas,
            read_quorum=config.read_quorum,
            write_quorum=config.write_quorum,
            repair_interval=config.repair_interval,
            tombstone_grace=config.tombstone_grace,
            timeout=config.timeout,
            max_value_bytes=config.max_value_bytes,
            client_token_file=config.client_token_file,
            **common,
        ),
    )


def dev(reactor: Any, config: DevConfig) -> list[service.Service]:
    registry_config, node_configs, gateway_config = dev_configs(config)
    services = registry(reactor, registry_config)
    for node_config in node_configs:
        services += node(reactor, node_config)
    return services + gateway(reactor, gateway_config)


def _exit_zero_on_sigterm(reactor: IReactorCore) -> None:
    """
    Make SIGTERM a clean stop that exits 0: twistd would otherwise re-raise the signal
    after shutdown, so systemd and scripts would see a process killed by a signal.
    """

    stopping: list[int] = []

    def stop(signum: int, frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, stop)


def assemble(reactor: Any, config: Config) -> service.MultiService:
    """The whole service tree of the role C{config} configures."""
    if isinstance(config, NodeConfig):
        services = node(reactor, config)
    elif isinstance(config, RegistryConfig):
        services = registry(reactor, config)
    elif isinstance(config, GatewayConfig):
        services = gateway(reactor, config)
    elif isinstance(config, DevConfig):
        services = dev(reactor, config)
    else:
        raise TypeError(f"no role is configured by {config!r}")
    top = service.MultiService()
    for child in services:
        child.setServiceParent(top)
    _exit_zero_on_sigterm(reactor)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way, so full collections stay short (they set the tail latency under load).
    reactor.callWhenRunning(gc.freeze)
    return top
