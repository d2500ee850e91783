"""
The twistd plugin's command line and service tree: C{twistd kvd --role ROLE [options]}.

This is the one module that touches the global reactor. Start-up errors (a bad option, a
data dir that cannot be used, a port in use) end the process with one readable line on
stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import gc
import os
import re
import secrets
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, NoReturn
from urllib.parse import urlsplit

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LoggingFile
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.resource import IResource

from kvd.auth import Auth, BadSecretFile, bearer, read_secret
from kvd.gateway import DEFAULT_REPLICAS, Cluster
from kvd.gateway.coordinator import Coordinator
from kvd.gateway.nodes import NodeClients
from kvd.gateway.repair import Repairer
from kvd.keys import DEFAULT_MAX_VALUE_BYTES, internal_message_limit
from kvd.membership import Heartbeat, NodeInfo, Watcher
from kvd.metrics import Metrics
from kvd.registry import InvalidRegistration, Registry, validate_node_id
from kvd.registry_client import RegistryClient
from kvd.resources import GatewayAPI, NodeAPI, RegistryAPI
from kvd.ring import DEFAULT_VNODES
from kvd.store import Store, StoreError, next_incarnation
from kvd.transport import DEFAULT_TIMEOUT, KeepAlivePool, Peers
from kvd.versions import HybridClock
from kvd.web import BoundedSite

_log = Logger()

ROLES = ("node", "registry", "gateway", "dev")
DEFAULT_LISTEN = {
    "node": "tcp:5000:interface=127.0.0.1",
    "registry": "tcp:8500:interface=127.0.0.1",
    "gateway": "tcp:8000:interface=127.0.0.1",
}
DEV_REGISTRY_PORT, DEV_GATEWAY_PORT, DEV_FIRST_NODE_PORT = 8500, 8000, 8001
DEFAULT_TTL = 10.0
DEFAULT_QUORUM = 2
DEFAULT_REPAIR_INTERVAL = 2.0
DEFAULT_TOMBSTONE_GRACE = 3600.0
#: Registry bodies are small JSON objects.
REGISTRY_MAX_BODY = 64 * 1024

#: Which options each role takes (beyond --role, --access-log), and their defaults.
ROLE_OPTIONS: dict[str, dict[str, Any]] = {
    "node": {
        "listen": DEFAULT_LISTEN["node"],
        "node-id": None,
        "data-dir": None,
        "registry": None,
        "advertise": None,
        "fsync": "always",
        "max-value-bytes": DEFAULT_MAX_VALUE_BYTES,
    },
    "registry": {"listen": DEFAULT_LISTEN["registry"], "ttl": DEFAULT_TTL},
    "gateway": {
        "listen": DEFAULT_LISTEN["gateway"],
        "registry": None,
        "vnodes": DEFAULT_VNODES,
        "replicas": DEFAULT_REPLICAS,
        "read-quorum": DEFAULT_QUORUM,
        "write-quorum": DEFAULT_QUORUM,
        "repair-interval": DEFAULT_REPAIR_INTERVAL,
        "tombstone-grace": DEFAULT_TOMBSTONE_GRACE,
        "timeout": DEFAULT_TIMEOUT,
        "max-value-bytes": DEFAULT_MAX_VALUE_BYTES,
    },
    "dev": {
        "data-dir": "./kvd-data",
        "nodes": 3,
        "ttl": DEFAULT_TTL,
        "vnodes": DEFAULT_VNODES,
        "replicas": DEFAULT_REPLICAS,
        "read-quorum": DEFAULT_QUORUM,
        "write-quorum": DEFAULT_QUORUM,
        "repair-interval": DEFAULT_REPAIR_INTERVAL,
        "tombstone-grace": DEFAULT_TOMBSTONE_GRACE,
        "timeout": DEFAULT_TIMEOUT,
        "fsync": "always",
        "max-value-bytes": DEFAULT_MAX_VALUE_BYTES,
    },
}


def _exit(message: str, status: int = 1) -> NoReturn:
    # Once twistd has started logging, sys.stderr feeds the log; the operator is on the original.
    logging = isinstance(sys.stderr, LoggingFile)
    stream = sys.__stderr__ if logging and sys.__stderr__ else sys.stderr
    stream.write(f"twistd kvd: {message}\n")
    stream.flush()
    if logging:
        _log.critical("{message}", message=message)
    raise SystemExit(status)


def _number(name: str, kind: Callable[[str], Any], minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise usage.UsageError(f"{name} must be a number, not {text!r}") from None
        if not minimum <= value < float("inf"):
            raise usage.UsageError(f"{name} must be at least {minimum:g}, not {text}")
        return value

    return parse


def _http_url(name: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise usage.UsageError(f"{name} must be an http:// or https:// URL, not {text!r}")
        return text.rstrip("/")

    return parse


class Options(usage.Options):
    synopsis = "--role ROLE [options]"
    longdesc = (
        "Run one kvd role: node (one storage node), registry (the service registry), gateway "
        "(the client entry point, placing keys on a consistent-hash ring), or dev (registry, "
        "gateway and --nodes nodes in one process: registry 127.0.0.1:8500, gateway "
        "127.0.0.1:8000, nodes 127.0.0.1:8001 and up). Every role listens on a Twisted endpoint "
        "description (--listen), loopback by default, and serves GET /healthz. Each option "
        "names the roles it applies to; giving it to another role is an error."
    )

    optFlags = [
        [
            "access-log",
            None,
            "all roles: log every request (off by default: it costs about a third of the throughput).",
        ],
        [
            "no-metrics",
            None,
            "all roles: do not count requests for /metrics (its gauges stay); for measuring what counting costs.",
        ],
    ]

    optParameters: list[list[Any]] = [
        ["role", None, None, "The role to run: " + ", ".join(ROLES) + "."],
        [
            "listen",
            None,
            None,
            "node, registry, gateway: endpoint to listen on (defaults: node tcp:5000:interface=127.0.0.1, "
            "registry tcp:8500:interface=127.0.0.1, gateway tcp:8000:interface=127.0.0.1).",
        ],
        ["node-id", None, None, "node: this node's id (required): letters, digits, '.', '_', '-'; up to 128."],
        [
            "data-dir",
            None,
            None,
            "node: this node's own directory, created if missing (required). dev: the parent of every "
            "node's directory [default: ./kvd-data].",
        ],
        [
            "registry",
            None,
            None,
            "node, gateway: the registry's URL, e.g. http://127.0.0.1:8500.",
            _http_url("--registry"),
        ],
        [
            "advertise",
            None,
            None,
            "node: the URL registered for this node [default: http://ADDRESS:PORT of --listen].",
            _http_url("--advertise"),
        ],
        [
            "fsync",
            None,
            None,
            "node, dev: 'always' [default] fsyncs every group commit; 'never' is UNSAFE (a crash or power "
            "cut loses acknowledged writes) and only for benchmarks.",
        ],
        [
            "max-value-bytes",
            None,
            None,
            f"node, gateway, dev: largest value accepted, in bytes; larger requests get 413 [default: "
            f"{DEFAULT_MAX_VALUE_BYTES}].",
            _number("--max-value-bytes", int, 1),
        ],
        [
            "ttl",
            None,
            None,
            f"registry, dev: lease length in seconds [default: {DEFAULT_TTL:g}].",
            _number("--ttl", float, 0.1),
        ],
        [
            "vnodes",
            None,
            None,
            f"gateway, dev: ring points per node of weight 1 [default: {DEFAULT_VNODES}].",
            _number("--vnodes", int, 1),
        ],
        [
            "replicas",
            None,
            None,
            f"gateway, dev: length of a key's preference list [default: {DEFAULT_REPLICAS}].",
            _number("--replicas", int, 1),
        ],
        [
            "timeout",
            None,
            None,
            f"gateway, dev: seconds to wait for a node's answer [default: {DEFAULT_TIMEOUT:g}].",
            _number("--timeout", float, 0.001),
        ],
        ["nodes", None, None, "dev: how many nodes to run [default: 3].", _number("--nodes", int, 1)],
        [
            "write-quorum",
            None,
            None,
            f"gateway, dev: replicas that must make a write durable before it is answered [default: {DEFAULT_QUORUM}, "
            "at most --replicas].",
            _number("--write-quorum", int, 1),
        ],
        [
            "read-quorum",
            None,
            None,
            f"gateway, dev: replicas a read asks; the newest answer wins [default: {DEFAULT_QUORUM}, "
            "at most --replicas].",
            _number("--read-quorum", int, 1),
        ],
        [
            "repair-interval",
            None,
            None,
            f"gateway, dev: seconds between repair sweeps (anti-entropy, handoff, rebalancing) "
            f"[default: {DEFAULT_REPAIR_INTERVAL:g}].",
            _number("--repair-interval", float, 0.01),
        ],
        [
            "tombstone-grace",
            None,
            None,
            f"gateway, dev: seconds a deletion's tombstone is kept once every replica has it "
            f"[default: {DEFAULT_TOMBSTONE_GRACE:g}].",
            _number("--tombstone-grace", float, 0),
        ],
        [
            "cluster-secret-file",
            None,
            None,
            "all roles: a file holding the cluster secret; then the registry API and /internal/ require "
            "'Authorization: Bearer <secret>', and this process sends it on every call it makes.",
        ],
        [
            "client-token-file",
            None,
            None,
            "node, gateway, dev: a file holding the token /kv/ requires ('Authorization: Bearer <token>').",
        ],
        [
            "ca-cert",
            None,
            None,
            "all roles: PEM file of the CA certificate(s) that https peers must be signed by "
            "[default: the system's trusted CAs].",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["static-nodes"] = {}

    def opt_node(self, spec: str) -> None:
        """gateway: a static member, ID=URL (repeatable); instead of --registry."""
        node_id, sep, url = spec.partition("=")
        if not sep:
            raise usage.UsageError(f"--node takes ID=URL, not {spec!r}")
        try:
            validate_node_id(node_id)
        except InvalidRegistration as e:
            raise usage.UsageError(f"--node {spec!r}: {e}") from None
        self["static-nodes"][node_id] = _http_url("--node")(url)

    def opt_version(self) -> NoReturn:
        """Print kvd's version and exit."""
        from kvd import __version__

        print(f"kvd {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: Any = None) -> None:
        # twistd would print its whole usage text before the error; one line is kinder.
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            _exit(f"{e} (see twistd kvd --help)", 2)

    def postOptions(self) -> None:
        role = self["role"]
        if role is None:
            raise usage.UsageError("--role is required: one of " + ", ".join(ROLES))
        if role not in ROLES:
            raise usage.UsageError(f"unknown role {role!r}: expected one of " + ", ".join(ROLES))
        takes = ROLE_OPTIONS[role]
        for name in (
            "listen",
            "node-id",
            "data-dir",
            "registry",
            "advertise",
            "fsync",
            "max-value-bytes",
            "ttl",
            "vnodes",
            "replicas",
            "timeout",
            "nodes",
            "read-quorum",
            "write-quorum",
            "repair-interval",
            "tombstone-grace",
        ):
            if self[name] is not None and name not in takes:
                raise usage.UsageError(f"--{name} does not apply to --role {role}")
        if self["static-nodes"] and role != "gateway":
            raise usage.UsageError(f"--node does not apply to --role {role}")
        if self["client-token-file"] and role == "registry":
            raise usage.UsageError("--client-token-file does not apply to --role registry")
        try:
            self["auth"] = Auth(
                read_secret(self["cluster-secret-file"], "cluster secret") if self["cluster-secret-file"] else None,
                read_secret(self["client-token-file"], "client token") if self["client-token-file"] else None,
            )
        except BadSecretFile as e:
            raise usage.UsageError(str(e)) from None
        self["tls-policy"] = tls_policy(self["ca-cert"])
        for name, default in takes.items():
            if self[name] is None:
                self[name] = default
        if "fsync" in takes and self["fsync"] not in ("always", "never"):
            raise usage.UsageError(f"--fsync must be 'always' or 'never', not {self['fsync']!r}")
        if role == "node":
            for required in ("node-id", "data-dir"):
                if not self[required]:
                    raise usage.UsageError(f"--role node needs --{required}")
            try:
                validate_node_id(self["node-id"])
            except InvalidRegistration as e:
                raise usage.UsageError(f"--node-id: {e}") from None
            if self["registry"] and not self["advertise"]:
                self["advertise"] = advertised_url(self["listen"])
        if role == "dev":
            # A small dev cluster keeps working: fewer nodes than replicas or quorums shrinks them.
            for name in ("replicas", "read-quorum", "write-quorum"):
                self[name] = min(self[name], self["nodes"])
        if "replicas" in takes:
            for name in ("read-quorum", "write-quorum"):
                if self[name] > self["replicas"]:
                    raise usage.UsageError(f"--{name} {self[name]} is more than --replicas {self['replicas']}")
        if role == "gateway":
            if bool(self["registry"]) == bool(self["static-nodes"]):
                raise usage.UsageError("--role gateway needs either --registry URL or --node ID=URL (not both)")


def tls_policy(ca_cert: str | None) -> BrowserLikePolicyForHTTPS:
    """How outgoing https calls check certificates: against C{ca_cert}, else the system's CAs."""
    if ca_cert is None:
        return BrowserLikePolicyForHTTPS()
    try:
        with open(ca_cert, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise usage.UsageError(f"cannot read --ca-cert {ca_cert}: {e.strerror}") from None
    blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    try:
        certificates = [Certificate.loadPEM(block) for block in blocks]
    except Exception:
        certificates = []
    if not certificates:
        raise usage.UsageError(f"--ca-cert {ca_cert} holds no PEM certificate")
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(certificates))


def advertised_url(listen: str) -> str:
    """The URL other processes reach a listening endpoint at, for the usual tcp/ssl descriptions."""
    kind, _, rest = listen.partition(":")
    fields = re.split(r"(?<!\\):", rest)  # a backslash escapes a colon (IPv6 addresses)
    port = fields[0] if fields and fields[0].isdigit() else None
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if kind not in ("tcp", "ssl") or port is None or port == "0":
        raise usage.UsageError(f"cannot tell the URL of --listen {listen!r}: give --advertise URL")
    host = options.get("interface", "").replace("\\", "")
    if host in ("", "0.0.0.0", "::"):
        # The machine's own name: what other machines can resolve to it (getfqdn() can
        # answer "localhost", which would send them to themselves).
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if kind == 'ssl' else 'http'}://{host}:{port}"


class StoreService(service.Service):
    """
    Owns a node's store and the threads its file I/O runs on. At stop it lets every pending
    write become durable, and only then stops the threads: stopped first, they would drop
    the last group commit and leave its writers waiting forever.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name=name)
        self.store: Store | None = None

    def run(self, f: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self.store is None:
            self.pool.stop()
            return succeed(None)
        return self.store.close().addBoth(self._stop_threads)

    def _stop_threads(self, result: object) -> object:
        self.pool.stop()
        return result


class ListenService(service.Service):
    """
    Listens on an endpoint when started, failing start-up with one line if it cannot,
    and stops listening first at shutdown so in-flight requests can finish.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, description: str, factory: Any) -> None:
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # Listening here, before any service starts a thread, lets a failure end the process.
        super().privilegedStartService()
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            _exit(f"cannot listen on {self.description}: the endpoint did not start at once")
        if isinstance(outcome[0], Failure):
            _exit(f"cannot listen on {self.description}: {outcome[0].getErrorMessage()}")
        self.port = outcome[0]
        _log.info("listening on {description}", description=self.description)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


class HeartbeatService(service.Service):
    """Keeps a node registered while it runs; leaves the registry first thing at stop."""

    def __init__(self, heartbeat: Heartbeat) -> None:
        self.heartbeat = heartbeat

    def startService(self) -> None:
        super().startService()
        self.heartbeat.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.heartbeat.stop())


class WatcherService(service.Service):
    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher

    def startService(self) -> None:
        super().startService()
        self.watcher.start()

    def stopService(self) -> None:
        super().stopService()
        self.watcher.stop()


class HTTPClientService(service.Service):
    """Owns the kept-alive connections of a process's outgoing calls; closes them at stop."""

    def __init__(self, reactor: Any, timeout: float, config: Options) -> None:
        max_answer = internal_message_limit(config.get("max-value-bytes") or DEFAULT_MAX_VALUE_BYTES)
        self.keep_alive = KeepAlivePool(reactor, max_answer=max_answer, tls_policy=config["tls-policy"])
        secret = config["auth"].cluster_secret
        self.peers = Peers(self.keep_alive, reactor, timeout, authorization=bearer(secret) if secret else None)

    def stopService(self) -> None:
        super().stopService()
        self.keep_alive.close()


def _counted(config: Options, metrics: Metrics) -> Metrics | None:
    return None if config["no-metrics"] else metrics


def _endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    except Exception as e:  # bad syntax, or an ssl: certificate that cannot be read
        _exit(f"bad --listen endpoint {description!r}: {e or type(e).__name__}")


def _listen(
    reactor: Any, description: str, resource: IResource, config: Options, max_body: int, metrics: Metrics
) -> ListenService:
    site = BoundedSite(
        resource, max_body=max_body, access_log=bool(config["access-log"]), metrics=_counted(config, metrics)
    )
    return ListenService(_endpoint(reactor, description), description, site)


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


def node_services(
    reactor: Any,
    config: Options,
    node_id: str,
    data_dir: str,
    listen: str,
    registry: str | None,
    advertise: str | None,
) -> list[service.Service]:
    """One storage node's services, in start order."""
    endpoint = _endpoint(reactor, listen)
    storage = StoreService(reactor, f"kvd-store-{node_id}")
    try:
        store = storage.store = Store.open(
            data_dir, clock=HybridClock(reactor.seconds, node_id), run=storage.run, fsync=config["fsync"] == "always"
        )
        incarnation = next_incarnation(data_dir)
    except StoreError as e:
        _exit(str(e))
    except OSError as e:
        _exit(f"cannot use data dir {data_dir}: {e}")
    api = NodeAPI(node_id, store, config["max-value-bytes"], auth=config["auth"])
    site = BoundedSite(
        api.resource(),
        max_body=config["max-value-bytes"],
        access_log=bool(config["access-log"]),
        metrics=_counted(config, api.metrics),
    )
    services: list[service.Service] = [storage, ListenService(endpoint, listen, site)]
    if registry is not None:
        assert advertise is not None
        client = HTTPClientService(reactor, DEFAULT_TIMEOUT, config)
        heartbeat = Heartbeat(RegistryClient(client.peers, registry), node_id, advertise, incarnation, reactor)
        services += [client, HeartbeatService(heartbeat)]
    return services


def registry_services(reactor: Any, config: Options, listen: str) -> list[service.Service]:
    registry = Registry(config["ttl"])
    api = RegistryAPI(registry, reactor, auth=config["auth"])
    expiry = TimerService(min(1.0, config["ttl"] / 4), lambda: registry.expire(reactor.seconds()))
    expiry.clock = reactor
    return [expiry, _listen(reactor, listen, api.resource(), config, REGISTRY_MAX_BODY, api.metrics)]


def gateway_services(
    reactor: Any, config: Options, listen: str, registry: str | None, static: dict[str, str]
) -> list[service.Service]:
    cluster = Cluster(vnodes=config["vnodes"], replicas=config["replicas"])
    client = HTTPClientService(reactor, config["timeout"], config)
    services: list[service.Service] = [client]
    if static:
        cluster.update({node_id: NodeInfo(node_id, url) for node_id, url in static.items()})
    else:
        assert registry is not None
        watcher = Watcher(RegistryClient(client.peers, registry), reactor, cluster.update)
        services.append(WatcherService(watcher))
    clock = HybridClock(reactor.seconds, f"gw-{secrets.token_hex(4)}")
    nodes = NodeClients(client.peers)
    coordinator = Coordinator(cluster, nodes, clock, config["write-quorum"], config["read-quorum"])
    repairer = Repairer(cluster, nodes, reactor.seconds, config["tombstone-grace"])
    sweeps = TimerService(config["repair-interval"], lambda: Deferred.fromCoroutine(repairer.sweep()))
    sweeps.clock = reactor
    services.append(sweeps)
    api = GatewayAPI(cluster, coordinator, config["max-value-bytes"], auth=config["auth"], repairer=repairer)
    services.append(_listen(reactor, listen, api.resource(), config, config["max-value-bytes"], api.metrics))
    return services


def dev_services(reactor: Any, config: Options) -> list[service.Service]:
    registry_url = f"http://127.0.0.1:{DEV_REGISTRY_PORT}"
    services = registry_services(reactor, config, f"tcp:{DEV_REGISTRY_PORT}:interface=127.0.0.1")
    for number in range(1, config["nodes"] + 1):
        port = DEV_FIRST_NODE_PORT + number - 1
        services += node_services(
            reactor,
            config,
            f"node{number}",
            os.path.join(config["data-dir"], f"node{number}"),
            f"tcp:{port}:interface=127.0.0.1",
            registry_url,
            f"http://127.0.0.1:{port}",
        )
    services += gateway_services(reactor, config, f"tcp:{DEV_GATEWAY_PORT}:interface=127.0.0.1", registry_url, {})
    return services


def makeService(config: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    role = config["role"]
    services: list[service.Service] = []
    if role == "node":
        services += node_services(
            reactor,
            config,
            config["node-id"],
            config["data-dir"],
            config["listen"],
            config["registry"],
            config["advertise"],
        )
    elif role == "registry":
        services += registry_services(reactor, config, config["listen"])
    elif role == "gateway":
        services += gateway_services(reactor, config, config["listen"], config["registry"], config["static-nodes"])
    else:
        services += dev_services(reactor, config)
    top = service.MultiService()
    for child in services:
        child.setServiceParent(top)
    _exit_zero_on_sigterm(reactor)
    # Everything built so far lives as long as the process: keep it out of the collector's
    # way, so full collections stay short (they set the tail latency under load).
    reactor.callWhenRunning(gc.freeze)
    return top
