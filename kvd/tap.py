"""
The twistd plugin's command line and service tree: C{twistd kvd --role ROLE [options]}.

This is the one module that touches the global reactor. Start-up errors (a bad option, a
data dir that cannot be used, a port in use) end the process with one readable line on
stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorCore, IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LoggingFile
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource

from kvd.keys import DEFAULT_MAX_VALUE_BYTES
from kvd.resources import NodeAPI
from kvd.store import Store, StoreError
from kvd.web import BoundedSite

_log = Logger()

ROLES = ("node",)
DEFAULT_LISTEN = {
    "node": "tcp:5000:interface=127.0.0.1",
}


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line the operator sees."""


def _exit(message: str, status: int = 1) -> NoReturn:
    # Once twistd has started logging, sys.stderr feeds the log; the operator is on the original.
    logging = isinstance(sys.stderr, LoggingFile)
    stream = sys.__stderr__ if logging and sys.__stderr__ else sys.stderr
    stream.write(f"twistd kvd: {message}\n")
    stream.flush()
    if logging:
        _log.critical("{message}", message=message)
    raise SystemExit(status)


def _positive_int(name: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise usage.UsageError(f"{name} must be a whole number, not {text!r}") from None
        if value < 1:
            raise usage.UsageError(f"{name} must be at least 1, not {value}")
        return value

    return parse


class Options(usage.Options):
    synopsis = "--role ROLE [options]"
    longdesc = (
        "Run one kvd role. Roles: node (one storage node). Every role listens on a Twisted "
        "endpoint description (--listen), loopback by default, and serves GET /healthz."
    )

    optFlags = [
        ["access-log", None, "Log every request (off by default: it costs about a third of the throughput)."],
    ]

    optParameters: list[list[Any]] = [
        ["role", None, None, "The role to run: " + ", ".join(ROLES) + "."],
        ["listen", None, None, "Endpoint to listen on (default: node tcp:5000:interface=127.0.0.1)."],
        ["node-id", None, None, "node: this node's id (required)."],
        ["data-dir", None, None, "node: directory for this node's data, created if missing (required)."],
        [
            "fsync",
            None,
            "always",
            "node: 'always' fsyncs every group commit; 'never' is UNSAFE (a crash or power cut loses "
            "acknowledged writes) and only for benchmarks.",
        ],
        [
            "max-value-bytes",
            None,
            DEFAULT_MAX_VALUE_BYTES,
            "node: largest value accepted, in bytes; larger requests get 413.",
            _positive_int("--max-value-bytes"),
        ],
    ]

    def opt_version(self) -> NoReturn:
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
        if self["listen"] is None:
            self["listen"] = DEFAULT_LISTEN[role]
        if self["fsync"] not in ("always", "never"):
            raise usage.UsageError(f"--fsync must be 'always' or 'never', not {self['fsync']!r}")
        if role == "node":
            for required in ("node-id", "data-dir"):
                if not self[required]:
                    raise usage.UsageError(f"--role node needs --{required}")


class ThreadPoolService(service.Service):
    """Owns a thread pool for blocking file I/O; stops it after the services that use it."""

    def __init__(self, reactor: Any, name: str, maxthreads: int = 2) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=maxthreads, name=name)

    def run(self, f: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class StoreService(service.Service):
    """Opens the node's store at start; at stop, lets pending writes become durable."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.store.close()


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


def _endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        return endpoint
    except (ValueError, TypeError, KeyError) as e:
        _exit(f"bad --listen endpoint {description!r}: {e}")


def _exit_zero_on_sigterm(reactor: IReactorCore) -> None:
    """
    Make SIGTERM a clean stop that exits 0: twistd would otherwise re-raise the signal
    after shutdown, so systemd and scripts would see a process killed by a signal.
    """

    def stop(signum: int, frame: object) -> None:
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    reactor.callWhenRunning(signal.signal, signal.SIGTERM, stop)


def node_services(config: Options, reactor: Any) -> list[service.Service]:
    endpoint = _endpoint(reactor, config["listen"])
    pool = ThreadPoolService(reactor, f"kvd-store-{config['node-id']}")
    try:
        store = Store.open(config["data-dir"], run=pool.run, fsync=config["fsync"] == "always")
    except StoreError as e:
        _exit(str(e))
    api = NodeAPI(config["node-id"], store, config["max-value-bytes"])
    site = _site(api.resource(), config, max_body=config["max-value-bytes"])
    listen = ListenService(endpoint, config["listen"], site)
    # Stopped in reverse order: stop listening, let writes become durable, stop the threads.
    return [pool, StoreService(store), listen]


def _site(resource: IResource, config: Options, max_body: int) -> BoundedSite:
    return BoundedSite(resource, max_body=max_body, access_log=config["access-log"])


def makeService(config: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    top = service.MultiService()
    for child in node_services(config, reactor):
        child.setServiceParent(top)
    _exit_zero_on_sigterm(reactor)
    return top
