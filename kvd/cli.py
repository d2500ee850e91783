"""
The ``kvd`` command: a gateway's client API and operator views from a shell.

Arguments by click, tables and progress bars by rich, requests by L{kvd.Client}. Human output
by default, ``--json`` for scripts; any failure ends with one line on stderr and a non-zero
exit status (1 for an answer the gateway gave, 2 for a usage error, 3 when it could not be
reached).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from kvd.clients import DEFAULT_URL, Client, ConnectionFailed, KvdError, entry_line
from kvd.gateway.plan import shares
from kvd.ring import Ring

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
#: Seconds to wait for a node's own /node answer in ``kvd cluster``.
NODE_TIMEOUT = 2.0


class Context:
    """What every subcommand gets: the client, and how to print."""

    def __init__(self, url: str, token: str | None, ca_cert: str | None, as_json: bool, timeout: float) -> None:
        self.url, self.token, self.ca_cert, self.timeout = url, token, ca_cert, timeout
        self.as_json = as_json
        self.client = Client(url, token, ca_cert, timeout)
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def emit(self, body: Any, human: Callable[[], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(body, ensure_ascii=False))
        else:
            human()


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"kvd: {message}", err=True)
    sys.exit(code)


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"cannot read --token-file {path}: {getattr(e, 'strerror', None) or e}", 2)
    if not token:
        fail(f"--token-file {path} is empty", 2)
    return token


def _check_url(url: str) -> None:
    """A usage error (one line, exit 2) unless C{url} is an http:// or https:// URL with a host."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"--url {url!r} (or $KVD_URL) is not a gateway URL such as http://127.0.0.1:8000", 2)


def _named(command: str | None, message: str) -> str:
    """C{message} naming the subcommand the user ran, when the failed request's own name does not."""
    if command is None or message.startswith(command) or (command == "ls" and message.startswith("list ")):
        return message
    what, colon, rest = message.partition(": ")
    if colon and rest.startswith("cannot reach "):  # which of its requests found the gateway away says little
        return f"{command}: {rest}"
    return f"{command}: {message}"


class _Group(click.Group):
    """Turns every kvd error into one line on stderr, naming the subcommand, and an exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConnectionFailed as e:
            fail(_named(ctx.invoked_subcommand, str(e)), 3)
        except KvdError as e:
            fail(_named(ctx.invoked_subcommand, str(e)), 1)
        except BrokenPipeError:  # a pager or `head` went away: not a failure (an OSError: caught first)
            _quiet_stdout()
            sys.exit(0)
        except OSError as e:
            fail(f"{getattr(e, 'filename', None) or ''}: {e.strerror or e}".lstrip(": "), 1)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="KVD_URL",
    default=DEFAULT_URL,
    help="The gateway's base URL (default: $KVD_URL, else http://127.0.0.1:8000).",
)
@click.option("--token-file", type=click.Path(dir_okay=False), help="A file holding the client token (one line).")
@click.option("--ca-cert", type=click.Path(exists=True, dir_okay=False), help="CA certificate(s) for an https gateway.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, one object a line, for scripts.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True, help="Seconds per request.")
@click.version_option(package_name="kvd")
@click.pass_context
def main(
    ctx: click.Context, url: str, token_file: str | None, ca_cert: str | None, as_json: bool, timeout: float
) -> None:
    """Talk to a kvd cluster through its gateway."""
    _check_url(url)
    ctx.obj = Context(url, _read_token(token_file), ca_cert, as_json, timeout)
    ctx.call_on_close(ctx.obj.client.close)


pass_context = click.make_pass_decorator(Context)


@main.command()
@click.argument("key")
@click.option("--raw", is_flag=True, help="Write the value's bytes exactly (no newline, bytes not in base64).")
@pass_context
def get(c: Context, key: str, raw: bool) -> None:
    """Print KEY's value (with --json: its key, value and version)."""
    if raw and c.as_json:
        raise click.UsageError("give --raw or --json, not both")
    entry = c.client.get(key)
    if raw:
        sys.stdout.buffer.write(entry.value_bytes)
        sys.stdout.buffer.flush()
        return
    c.emit(entry.to_json(), lambda: click.echo(entry.value))


@main.command()
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=click.FloatRange(min=0, min_open=True), help="Expire the key SECONDS after this write.")
@click.option("--if-version", metavar="VERSION", help="Write only if the key's version is VERSION.")
@click.option("--if-absent", is_flag=True, help="Write only if the key does not exist.")
@pass_context
def put(c: Context, key: str, value: str, ttl: float | None, if_version: str | None, if_absent: bool) -> None:
    """
    Set KEY to VALUE (`-` reads the value from standard input, any bytes); prints the new
    version. A value that is not UTF-8 is stored as bytes (`kvd get --raw` gives them back).
    """
    if if_version is not None and if_absent:
        raise click.UsageError("give --if-version or --if-absent, not both")
    # The bytes given, exactly: standard input's, or the argument's as the shell passed them
    # (Python decodes an argument that is not UTF-8 with surrogate escapes; fsencode undoes that).
    data = sys.stdin.buffer.read() if value == "-" else os.fsencode(value)
    written = c.client.put(key, data, ttl=ttl, if_version=if_version, if_absent=if_absent)
    body: dict[str, Any] = {"key": written.key, "version": written.version, "replicas": list(written.replicas)}
    if written.expires is not None:
        body["expires"] = written.expires
    c.emit(body, lambda: click.echo(written.version or "ok"))


@main.command()
@click.argument("key")
@click.option("--if-version", metavar="VERSION", help="Delete only if the key's version is VERSION.")
@pass_context
def delete(c: Context, key: str, if_version: str | None) -> None:
    """Delete KEY (an error if it does not exist)."""
    written = c.client.delete(key, if_version=if_version)
    c.emit({"key": written.key, "version": written.version}, lambda: click.echo(f"deleted {key}"))


@main.command(name="ls")
@click.argument("prefix", default="")
@click.option("--values", is_flag=True, help="Print each key's value too (tab-separated).")
@pass_context
def ls(c: Context, prefix: str, values: bool) -> None:
    """List every key starting with PREFIX (all keys without one), in byte order, page after page."""
    if values:
        for entry in c.client.items(prefix, limit=1000):
            c.emit(entry.to_json(), lambda e=entry: click.echo(f"{e.key}\t{e.value}"))  # type: ignore[misc]
    else:
        for key in c.client.list(prefix, limit=1000):
            c.emit({"key": key}, lambda k=key: click.echo(k))  # type: ignore[misc]


@main.command()
@click.argument("key")
@click.option("--wait", type=click.FloatRange(1, 300), default=60.0, show_default=True, help="Seconds per long poll.")
@pass_context
def watch(c: Context, key: str, wait: float) -> None:
    """Print KEY's value each time it changes (until interrupted); `(deleted)` when it goes."""
    try:
        for entry in c.client.watch(key, wait=wait):
            body: dict[str, Any] = {"key": key, "value": None, "version": None} if entry is None else entry.to_json()
            c.emit(body, lambda e=entry: click.echo("(deleted)" if e is None else e.value))  # type: ignore[misc]
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("key")
@pass_context
def owners(c: Context, key: str) -> None:
    """Print the nodes that hold KEY, first owner first."""
    nodes = c.client.owners(key)
    c.emit({"key": key, "nodes": nodes}, lambda: click.echo(" ".join(nodes)))


def _node_state(c: Context, url: str) -> dict[str, Any] | None:
    """A node's own /node answer, or None if it does not answer in time."""
    try:
        with Client(url, c.token, c.ca_cert, NODE_TIMEOUT) as node:
            return node.node()
    except KvdError:
        return None


def _node_figures(c: Context, node: dict[str, Any]) -> dict[str, Any] | None:
    """
    A node's key count and repair report (as C{keys} and C{rebalance}, like its GET /node), or
    None if it did not answer: from the gateway's /cluster, which asks every node itself, or
    from the node's own GET /node when the gateway's /cluster does not carry them.
    """
    if "keys" not in node:
        return _node_state(c, str(node.get("url")))
    if not isinstance(node["keys"], int):
        return None
    return {"keys": node["keys"], "rebalance": node.get("repair")}


def _ring_shares(described: dict[str, Any]) -> dict[str, float]:
    """Each node's share of the ring, from the ring the gateway builds (ids, weights and vnodes fix it)."""
    try:
        weights = {str(n["id"]): int(n.get("weight", 1)) for n in described.get("nodes", [])}
        return shares(Ring(weights, vnodes=int(described["vnodes"])))
    except (KeyError, TypeError, ValueError):
        return {}


@main.command()
@pass_context
def cluster(c: Context) -> None:
    """
    A table of every node: up or down, keys held, its repair progress and ring share.

    Keys and repair progress are the gateway's figures from each node's own GET /node (from
    an older gateway without them, each node is asked from here, within 2 s); a node that did
    not answer is shown down. The ring share is computed here from the gateway's members,
    weights and vnodes.
    """
    described = c.client.cluster()
    share = _ring_shares(described)
    rows = []
    for node in described.get("nodes", []):
        state = _node_figures(c, node)
        rebalance = (state or {}).get("rebalance") or {}
        rows.append(
            {
                "id": node.get("id"),
                "url": node.get("url"),
                "weight": node.get("weight"),
                "status": "up" if state is not None else "down",
                "keys": None if state is None else state.get("keys"),
                "repair": rebalance or None,
                "share": share.get(str(node.get("id"))),
            }
        )
    body = {k: v for k, v in described.items() if k != "success"}
    body["nodes"] = rows

    def table() -> None:
        t = Table(
            title=f"{c.url}: N={described.get('replicas')} W={described.get('write_quorum')} "
            f"R={described.get('read_quorum')}"
        )
        for name in ("node", "status", "keys", "repair sent/due", "ring share"):
            t.add_column(name, justify="left" if name in ("node", "status") else "right")
        for row in rows:
            repair = row["repair"]
            share = row["share"]
            t.add_row(
                str(row["id"]),
                "[green]up[/]" if row["status"] == "up" else "[red]down[/]",
                "-" if row["keys"] is None else str(row["keys"]),
                "-" if not repair else f"{repair.get('sent', 0)}/{repair.get('keys_to_send', 0)}",
                "-" if share is None else f"{share:.1%}",
            )
        c.out.print(t)
        repair = described.get("repair")
        if isinstance(repair, dict):
            c.out.print(
                f"repair: {repair.get('rounds', 0)} sweeps, {repair.get('sent', 0)} keys sent, "
                f"{repair.get('keys_to_send', 0)} to send, {repair.get('dropped', 0)} dropped"
                + (f", last error: {repair['last_error']}" if repair.get("last_error") else "")
            )

    c.emit(body, table)


@main.command()
@click.option("--join", metavar="ID[:WEIGHT]", help="A node that would join (or a member's new weight).")
@click.option("--remove", metavar="ID", help="A member that would be removed.")
@pass_context
def plan(c: Context, join: str | None, remove: str | None) -> None:
    """Show what a join or a removal would move, from where to where; nothing changes."""
    if (join is None) == (remove is None):
        raise click.UsageError("give exactly one of --join ID[:WEIGHT] or --remove ID")
    body = c.client.plan(join, remove)

    def table() -> None:
        t = Table(title=f"moves: {body['moved_share']:.1%} of the key space")
        for name in ("from", "to", "share"):
            t.add_column(name, justify="right" if name == "share" else "left")
        for move in body["moves"]:
            t.add_row(str(move["from"]), str(move["to"]), f"{move['share']:.2%}")
        c.out.print(t)

    c.emit({k: v for k, v in body.items() if k != "success"}, table)


@main.command()
@click.option("-n", type=click.IntRange(1, 100), default=10, show_default=True, help="How many keys.")
@pass_context
def hot(c: Context, n: int) -> None:
    """The gateway's most requested keys of the last minute, with their request rates."""
    body = c.client.hot(n)

    def table() -> None:
        t = Table(title=f"hot keys, last {body.get('window') or 60:g} s")
        t.add_column("key")
        t.add_column("requests", justify="right")
        t.add_column("per second", justify="right")
        for k in body["keys"]:
            t.add_row(str(k["key"]), str(k["requests"]), f"{k['rate']:.1f}")
        c.out.print(t)

    c.emit({k: v for k, v in body.items() if k != "success"}, table)


class _KeysPerSecond(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text("?" if task.speed is None else f"{task.speed:,.0f} keys/s")


def _progress(c: Context, in_bytes: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TransferSpeedColumn() if in_bytes else _KeysPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=c.err,
        disable=c.as_json or not c.err.is_terminal,
    )


def _estimated_keys(c: Context) -> int | None:
    """About how many keys an export will give: the keys the nodes hold, over the replicas."""
    described = c.client.cluster()
    counts = [(_node_figures(c, n) or {}).get("keys") for n in described.get("nodes", [])]
    known = [k for k in counts if isinstance(k, int)]
    replicas = min(int(described.get("replicas") or 1), max(len(counts), 1))
    return sum(known) // replicas if known else None


@main.command(name="export")
@click.argument("file", type=click.Path(allow_dash=True))  # not click's dir check: a file not written is status 1
@click.option("--at", metavar="T", help="A consistent cut: every key's newest version no later than HLC time T.")
@pass_context
def export(c: Context, file: str, at: str | None) -> None:
    """Write every key's newest entry to FILE (`-`: standard output), one JSON object a line."""
    total = _estimated_keys(c)
    count = 0
    try:
        out = sys.stdout.buffer if file == "-" else open(file, "wb")  # noqa: SIM115 - closed below
    except OSError as e:
        fail(f"export: cannot write {file}: {e.strerror or e}", 1)
    try:
        with _progress(c, in_bytes=False) as progress:
            task = progress.add_task("export", total=total)
            for entry in c.client.export(at):
                out.write(entry_line(entry))
                count += 1
                progress.advance(task)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if file != "-":
        c.emit({"exported": count, "file": file}, lambda: c.err.print(f"exported {count} keys to {file}"))


def _file_lines(f: IO[bytes], progress: Progress, task: Any) -> Iterator[bytes]:
    with f:
        for line in f:
            progress.advance(task, len(line))
            yield line


@main.command(name="import")
@click.argument("file", type=click.Path())
@pass_context
def import_(c: Context, file: str) -> None:
    """Write every entry of FILE (as export writes it) with its own version; newer data is kept."""
    try:  # not click's path check: a file that cannot be read is exit status 1, as for export
        f = open(file, "rb")  # noqa: SIM115 - closed by _file_lines
        size = os.fstat(f.fileno()).st_size
    except OSError as e:
        fail(f"import: cannot read {file}: {e.strerror or e}", 1)
    with _progress(c, in_bytes=True) as progress:
        task = progress.add_task("import", total=size)
        body = c.client.import_lines(_file_lines(f, progress, task))
    summary = {k: v for k, v in body.items() if k != "success"}
    c.emit(summary, lambda: c.err.print(f"imported {file}: " + ", ".join(f"{k} {v}" for k, v in summary.items())))


if __name__ == "__main__":  # pragma: no cover
    main()
