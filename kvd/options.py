"""
The command line as data: one table of every option (which roles take it, its default, how
its text is parsed, its help), and the frozen per-role configuration a parsed command line
becomes. C{kvd.tap.Options} is generated from the table; C{kvd.roles} builds a role from its
config. To add an option: add a row here and a field to the configs of the roles it names.

Nothing here reads a file or builds a service: a config holds what the operator typed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from attrs import field, frozen
from twisted.python import usage

from kvd.gateway import DEFAULT_REPLICAS
from kvd.keys import DEFAULT_MAX_VALUE_BYTES
from kvd.registry import DEFAULT_FORGET_AFTER, InvalidRegistration, validate_node_id
from kvd.ring import DEFAULT_VNODES
from kvd.transport import DEFAULT_TIMEOUT
from kvd.validate import Invalid, base_url, number

__all__ = [
    "OPTIONS",
    "ROLES",
    "Config",
    "DevConfig",
    "GatewayConfig",
    "NodeConfig",
    "Option",
    "RegistryConfig",
    "config_for",
    "http_url",
    "node_spec",
]

ROLES = ("node", "registry", "gateway", "dev")
#: The --listen kinds whose socket --workers processes can share.
SHAREABLE = ("tcp", "tcp6", "ssl")
ALL = frozenset(ROLES)
N = TypeVar("N", int, float)


def _numbers(name: str, kind: type[N], minimum: float) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            return number(text, kind, minimum, name)
        except Invalid as e:
            raise usage.UsageError(str(e)) from None

    return parse


def http_url(name: str) -> Callable[[str], str]:
    """A parser of base URLs for option C{name}: the registry's rule, so what starts is what registers."""

    def parse(text: str) -> str:
        try:
            return base_url(text, name).rstrip("/")
        except Invalid as e:
            raise usage.UsageError(str(e)) from None

    return parse


def _node_id(text: str) -> str:
    try:
        return validate_node_id(text)
    except InvalidRegistration as e:
        raise usage.UsageError(f"--node-id: {e}") from None


def _fsync(text: str) -> str:
    if text not in ("always", "never"):
        raise usage.UsageError(f"--fsync must be 'always' or 'never', not {text!r}")
    return text


def node_spec(spec: str) -> tuple[str, str]:
    """C{--node ID=URL} as (id, url)."""
    node_id, sep, url = spec.partition("=")
    if not sep:
        raise usage.UsageError(f"--node takes ID=URL, not {spec!r}")
    try:
        validate_node_id(node_id)
    except InvalidRegistration as e:
        raise usage.UsageError(f"--node {spec!r}: {e}") from None
    return node_id, http_url("--node")(url)


@frozen
class Option:
    """One row of the table."""

    name: str
    roles: frozenset[str]
    help: str
    #: The default for every role that takes it...
    default: Any = None
    #: ...unless this names the role's own.
    role_defaults: Mapping[str, Any] = field(factory=dict)
    parse: Callable[[str], Any] | None = None
    flag: bool = False
    #: Given several times, it collects every value (the C{kvd.tap.Options} method says how).
    repeatable: bool = False
    #: The roles that cannot start without it.
    required: frozenset[str] = frozenset()
    #: The key in the options dict, when it is not the name.
    key: str | None = None

    @property
    def dict_key(self) -> str:
        return self.key or self.name

    @property
    def attribute(self) -> str:
        """The config field it fills."""
        return self.dict_key.replace("-", "_")

    def default_for(self, role: str) -> Any:
        return self.role_defaults.get(role, self.default)

    def help_text(self) -> str:
        """The --help line: the roles first, then what it does, then role defaults and requirements."""
        roles = "all roles" if self.roles == ALL else ", ".join(r for r in ROLES if r in self.roles)
        text = f"{roles}: {self.help}"
        if self.role_defaults:
            text += " [defaults: " + ", ".join(f"{r} {self.role_defaults[r]}" for r in ROLES if r in self.role_defaults)
            text += "]"
        if self.required:
            text += " Required by --role " + ", ".join(r for r in ROLES if r in self.required) + "."
        return text


def _roles(*names: str) -> frozenset[str]:
    return frozenset(names)


_GATEWAYS = _roles("gateway", "dev")
_DEFAULT_QUORUM = 2

#: Every option but --role, --version and --help, in --help order.
OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        _roles("node", "registry", "gateway"),
        "Twisted endpoint to listen on (tcp:PORT:interface=ADDRESS, ssl:..., or tcp:0 for any free port).",
        role_defaults={
            "node": "tcp:5000:interface=127.0.0.1",
            "registry": "tcp:8500:interface=127.0.0.1",
            "gateway": "tcp:8000:interface=127.0.0.1",
        },
    ),
    Option(
        "node-id",
        _roles("node"),
        "this node's id: letters, digits, '.', '_', '-'; up to 128.",
        parse=_node_id,
        required=_roles("node"),
    ),
    Option(
        "data-dir",
        _roles("node", "dev"),
        "this node's own directory, created if missing (node); the parent of every node's directory (dev).",
        role_defaults={"dev": "./kvd-data"},
        required=_roles("node"),
    ),
    Option(
        "registry",
        _roles("node", "gateway"),
        "a registry's URL, e.g. http://127.0.0.1:8500 (repeatable: a node registers with every one, "
        "a gateway follows every one and takes the union).",
        default=(),
        parse=http_url("--registry"),
        repeatable=True,
    ),
    Option(
        "node",
        _roles("gateway"),
        "a static member, ID=URL (repeatable); instead of --registry.",
        default={},
        parse=node_spec,
        repeatable=True,
        key="static-nodes",
    ),
    Option(
        "advertise",
        _roles("node"),
        "the URL registered for this node [default: http(s)://ADDRESS:PORT of the port --listen opened; "
        "the host name when it listens on every address].",
        parse=http_url("--advertise"),
    ),
    Option(
        "fsync",
        _roles("node", "dev"),
        "'always' fsyncs every group commit; 'never' is UNSAFE (a crash or power cut loses acknowledged "
        "writes) and only for benchmarks.",
        default="always",
        parse=_fsync,
    ),
    Option(
        "max-value-bytes",
        _roles("node", "gateway", "dev"),
        "largest value accepted, in bytes; larger requests get 413.",
        default=DEFAULT_MAX_VALUE_BYTES,
        parse=_numbers("--max-value-bytes", int, 1),
    ),
    Option(
        "ttl",
        _roles("registry", "dev"),
        "lease length in seconds.",
        default=10.0,
        parse=_numbers("--ttl", float, 0.1),
    ),
    Option(
        "forget-after",
        _roles("registry", "dev"),
        "seconds a member stays listed as down after its lease ran out, before it is removed.",
        default=DEFAULT_FORGET_AFTER,
        parse=_numbers("--forget-after", float, 0.1),
    ),
    Option(
        "vnodes",
        _GATEWAYS,
        "ring points per node of weight 1.",
        default=DEFAULT_VNODES,
        parse=_numbers("--vnodes", int, 1),
    ),
    Option(
        "replicas",
        _GATEWAYS,
        "length of a key's preference list.",
        default=DEFAULT_REPLICAS,
        parse=_numbers("--replicas", int, 1),
    ),
    Option(
        "timeout",
        _GATEWAYS,
        "seconds to wait for a node's answer.",
        default=DEFAULT_TIMEOUT,
        parse=_numbers("--timeout", float, 0.001),
    ),
    Option(
        "nodes",
        _roles("dev"),
        "how many nodes to run (replicas and quorums shrink to fit).",
        default=3,
        parse=_numbers("--nodes", int, 1),
    ),
    Option(
        "write-quorum",
        _GATEWAYS,
        "replicas that must make a write durable before it is answered (at most --replicas).",
        default=_DEFAULT_QUORUM,
        parse=_numbers("--write-quorum", int, 1),
    ),
    Option(
        "read-quorum",
        _GATEWAYS,
        "replicas a read asks; the newest answer wins (at most --replicas).",
        default=_DEFAULT_QUORUM,
        parse=_numbers("--read-quorum", int, 1),
    ),
    Option(
        "repair-interval",
        _GATEWAYS,
        "seconds between repair sweeps (anti-entropy, handoff, rebalancing).",
        default=2.0,
        parse=_numbers("--repair-interval", float, 0.01),
    ),
    Option(
        "tombstone-grace",
        _GATEWAYS,
        "seconds a deletion's tombstone is kept once every replica has it.",
        default=3600.0,
        parse=_numbers("--tombstone-grace", float, 0),
    ),
    Option(
        "cluster-secret-file",
        ALL,
        "a file holding the cluster secret; then the registry API and /internal/ require "
        "'Authorization: Bearer <secret>', and this process sends it on every call it makes.",
    ),
    Option(
        "client-token-file",
        _roles("node", "gateway", "dev"),
        "a file holding the token /kv/ (and a gateway's /cluster/key/) requires ('Authorization: Bearer <token>').",
    ),
    Option(
        "ca-cert",
        ALL,
        "PEM file of the CA certificate(s) that https peers must be signed by [default: the system's trusted CAs].",
    ),
    Option(
        "access-log",
        ALL,
        "log every request (off by default: logged requests take the full twisted.web path,"
        " about a third of the throughput of a node's GETs).",
        default=False,
        flag=True,
    ),
    Option(
        "no-metrics",
        ALL,
        "do not count requests for /metrics (its gauges stay); for measuring what counting costs.",
        default=False,
        flag=True,
    ),
    Option(
        "workers",
        _roles("gateway"),
        "processes serving the one --listen port (tcp: or ssl:): this one, which also follows the registries "
        "and runs repair, and N-1 workers it starts, restarts and stops (see docs/deploy.md).",
        default=1,
        parse=_numbers("--workers", int, 1),
    ),
    Option(
        "no-hot-keys",
        _roles("gateway"),
        "do not count key requests for /cluster/hot (it then lists none); for measuring what counting costs.",
        default=False,
        flag=True,
    ),
)


@frozen(kw_only=True)
class Config:
    """What every role takes."""

    access_log: bool
    no_metrics: bool
    cluster_secret_file: str | None
    ca_cert: str | None


@frozen(kw_only=True)
class RegistryConfig(Config):
    listen: str
    ttl: float
    forget_after: float


@frozen(kw_only=True)
class NodeConfig(Config):
    listen: str
    node_id: str
    data_dir: str
    registry: tuple[str, ...]
    #: None: the URL of the port it listens on.
    advertise: str | None
    fsync: str
    max_value_bytes: int
    client_token_file: str | None


@frozen(kw_only=True)
class GatewayConfig(Config):
    listen: str
    registry: tuple[str, ...]
    static_nodes: Mapping[str, str]
    vnodes: int
    replicas: int
    read_quorum: int
    write_quorum: int
    repair_interval: float
    tombstone_grace: float
    timeout: float
    max_value_bytes: int
    client_token_file: str | None
    no_hot_keys: bool = False
    workers: int = 1


@frozen(kw_only=True)
class DevConfig(Config):
    data_dir: str
    nodes: int
    ttl: float
    forget_after: float
    vnodes: int
    replicas: int
    read_quorum: int
    write_quorum: int
    repair_interval: float
    tombstone_grace: float
    timeout: float
    fsync: str
    max_value_bytes: int
    client_token_file: str | None


CONFIGS: Mapping[str, type[Config]] = {
    "node": NodeConfig,
    "registry": RegistryConfig,
    "gateway": GatewayConfig,
    "dev": DevConfig,
}


def config_for(role: str | None, values: Mapping[str, Any], given: Collection[str]) -> Config:
    """
    The config of C{role} from the parsed C{values} (keyed as in the options dict), of which
    C{given} were on the command line; L{usage.UsageError} when they do not make one.
    """
    if role is None:
        raise usage.UsageError("--role is required: one of " + ", ".join(ROLES))
    if role not in ROLES:
        raise usage.UsageError(f"unknown role {role!r}: expected one of " + ", ".join(ROLES))
    settings: dict[str, Any] = {}
    for option in OPTIONS:
        if role not in option.roles:
            if option.dict_key in given:
                raise usage.UsageError(f"--{option.name} does not apply to --role {role}")
            continue
        value = values[option.dict_key] if option.dict_key in given else option.default_for(role)
        if role in option.required and not value:
            raise usage.UsageError(f"--role {role} needs --{option.name}")
        settings[option.attribute] = bool(value) if option.flag else _copy(value)
    if role == "dev":
        # A small dev cluster keeps working: fewer nodes than replicas or quorums shrinks them.
        for name in ("replicas", "read_quorum", "write_quorum"):
            settings[name] = min(settings[name], settings["nodes"])
    if "replicas" in settings:
        for name in ("read_quorum", "write_quorum"):
            if settings[name] > settings["replicas"]:
                quorum = name.replace("_", "-")
                raise usage.UsageError(f"--{quorum} {settings[name]} is more than --replicas {settings['replicas']}")
    if role == "gateway" and bool(settings["registry"]) == bool(settings["static_nodes"]):
        raise usage.UsageError("--role gateway needs either --registry URL or --node ID=URL (not both)")
    if role == "gateway" and settings["workers"] > 1 and settings["listen"].partition(":")[0] not in SHAREABLE:
        raise usage.UsageError(
            f"--workers {settings['workers']} needs a tcp: or ssl: --listen, not {settings['listen']!r}"
        )
    return CONFIGS[role](**settings)


def _copy(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, dict):
        return dict(value)
    return value
