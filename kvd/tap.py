"""
The twistd plugin's command line and entry point: C{twistd kvd --role ROLE [options]}.

The options come from the table in L{kvd.options}; parsing yields C{Options.config}, the
role's frozen config, and L{makeService} hands it to L{kvd.roles}. This is the one module
that touches the global reactor. A bad option ends the process with one line on stderr
and status 2, never a traceback or the whole usage text.
"""

from __future__ import annotations

import gc
import sys
from typing import Any, NoReturn

from twisted.application import service
from twisted.python import usage

from kvd.options import OPTIONS, ROLES, Config, config_for, node_spec
from kvd.roles import assemble, fail

_BY_NAME = {option.name: option for option in OPTIONS}


class Options(usage.Options):
    """
    The command line. The dict holds what was typed (parsed, with the role's defaults filled
    in); C{config} is the role's frozen config.
    """

    synopsis = "--role ROLE [options]"
    longdesc = (
        "Run one kvd role: node (one storage node), registry (the service registry), gateway "
        "(the client entry point, placing keys on a consistent-hash ring), or dev (registry, "
        "gateway and --nodes nodes in one process: registry 127.0.0.1:8500, gateway "
        "127.0.0.1:8000, nodes 127.0.0.1:8001 and up). Every role listens on a Twisted endpoint "
        "description (--listen), loopback by default, and serves GET /healthz. Each option "
        "names the roles it applies to; giving it to another role is an error."
    )

    optFlags = [[option.name, None, option.help_text()] for option in OPTIONS if option.flag]
    optParameters: list[list[Any]] = [
        ["role", None, None, "The role to run: " + ", ".join(ROLES) + "."],
        *(
            [option.name, None, None if option.role_defaults else option.default, option.help_text(), option.parse]
            for option in OPTIONS
            if not option.flag and not option.repeatable
        ),
    ]

    config: Config

    def __init__(self) -> None:
        #: The keys the command line set, so that an option of another role is refused even
        #: when it is given its default value.
        self.given: set[str] = set()
        super().__init__()
        self.update({"registry": [], "static-nodes": {}})

    def __setitem__(self, key: str, value: Any) -> None:
        # usage.Options stores every parsed option through here, and its defaults without.
        self.given.add(key)
        super().__setitem__(key, value)

    def opt_registry(self, url: str) -> None:
        self["registry"] = [*self["registry"], _BY_NAME["registry"].parse(url)]  # type: ignore[misc]

    opt_registry.__doc__ = _BY_NAME["registry"].help_text()

    def opt_node(self, spec: str) -> None:
        node_id, url = node_spec(spec)
        self["static-nodes"] = {**self["static-nodes"], node_id: url}

    opt_node.__doc__ = _BY_NAME["node"].help_text()

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
            # The rules of URLs and ids (kvd/validate.py, the registry's) end their sentences;
            # inside this line, before the pointer to --help, the full stop goes, as in every other.
            fail(f"{str(e).removesuffix('.')} (see twistd kvd --help)", 2)

    def postOptions(self) -> None:
        given = set(self.given)
        self.config = config_for(self["role"], self, given)
        for option in OPTIONS:
            if option.dict_key not in given and self["role"] in option.roles:
                self[option.dict_key] = option.default_for(self["role"])


def makeService(config: Options, reactor: Any = None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    lean_poll_if_epoll(reactor)
    reactor.callWhenRunning(settle_gc)
    return assemble(reactor, config.config)


def lean_poll_if_epoll(reactor: Any) -> None:
    """L{kvd.lean_poll.lean_poll}, where there is epoll (Linux)."""
    if sys.platform.startswith("linux"):
        from kvd.lean_poll import lean_poll

        lean_poll(reactor)


#: Allocations (net of frees) between two young-generation collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 4_000


def settle_gc() -> None:
    """
    Once started: what start-up made (modules, services, the ring) lives as long as the
    process, so it leaves the collector's generations (C{gc.freeze}) and a full collection
    walks only what came after; and the young generation is collected less often, as most
    of a request's objects are gone by then. A gateway under load otherwise stopped for a
    full collection of every module's objects several times a second (the PUT tail).
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
