"""The command line: what twistd kvd accepts, its defaults, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from kvd.tap import Options, advertised_url, makeService


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_node_options_and_defaults() -> None:
    options = parse("--role", "node", "--node-id", "a", "--data-dir", "/tmp/a")
    assert {k: options[k] for k in ("role", "node-id", "data-dir", "listen", "fsync", "max-value-bytes")} == {
        "role": "node",
        "node-id": "a",
        "data-dir": "/tmp/a",
        "listen": "tcp:5000:interface=127.0.0.1",
        "fsync": "always",
        "max-value-bytes": 1024 * 1024,
    }
    assert options["access-log"] == 0


def test_every_node_option_is_parsed() -> None:
    options = parse(
        "--role=node",
        "--node-id=b",
        "--data-dir=/d",
        "--listen=tcp:0",
        "--fsync=never",
        "--max-value-bytes=10",
        "--access-log",
    )
    assert (options["listen"], options["fsync"], options["max-value-bytes"], options["access-log"]) == (
        "tcp:0",
        "never",
        10,
        1,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "--role is required"),
        (("--role", "primary"), "unknown role 'primary'"),
        (("--role", "node", "--data-dir", "/d"), "needs --node-id"),
        (("--role", "node", "--node-id", "a"), "needs --data-dir"),
        (("--role", "node", "--node-id", "a", "--data-dir", "/d", "--fsync", "sometimes"), "--fsync must be"),
        (("--role", "node", "--node-id", "a", "--data-dir", "/d", "--max-value-bytes", "lots"), "must be a number"),
        (("--role", "node", "--node-id", "a", "--data-dir", "/d", "--max-value-bytes", "0"), "at least 1"),
        (("--role", "node", "--bogus"), "bogus"),
    ],
)
def test_bad_options_exit_non_zero_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_node_service_listens_on_the_endpoint_and_stops_cleanly(tmp_path: Path) -> None:
    reactor = MemoryReactorClock()
    options = parse("--role", "node", "--node-id", "a", "--data-dir", str(tmp_path / "a"), "--listen", "tcp:7001")
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    try:
        assert [port for port, *_ in reactor.tcpServers] == [7001]
        assert (tmp_path / "a" / "journal-0.jsonl").exists()
    finally:
        top.stopService()


def test_a_data_dir_that_cannot_be_created_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    options = parse("--role", "node", "--node-id", "a", "--data-dir", str(blocker / "a"))
    with pytest.raises(SystemExit) as e:
        makeService(options, reactor=MemoryReactorClock())
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot use data dir" in err, err


def test_a_bad_endpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    options = parse("--role", "node", "--node-id", "a", "--data-dir", str(tmp_path), "--listen", "tcp:notaport")
    with pytest.raises(SystemExit):
        makeService(options, reactor=MemoryReactorClock())
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tcp:notaport" in err, err


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("tcp:5001:interface=127.0.0.1", "http://127.0.0.1:5001"),
        ("ssl:5443:interface=10.0.0.6:privateKey=k.pem", "https://10.0.0.6:5443"),
        ("tcp:5001:interface=\\:\\:1", "http://[::1]:5001"),
    ],
)
def test_the_advertised_url_follows_the_listen_address(listen: str, url: str) -> None:
    assert advertised_url(listen) == url


def test_listening_on_every_address_advertises_the_host_name() -> None:
    import socket

    assert advertised_url("tcp:5001") == f"http://{socket.gethostname()}:5001"


def test_options_of_another_role_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--role", "registry", "--node-id", "a")
    assert "--node-id does not apply to --role registry" in capsys.readouterr().err


def test_a_gateway_needs_a_registry_or_static_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--role", "gateway")
    assert "--registry" in capsys.readouterr().err
    options = parse("--role", "gateway", "--node", "a=http://127.0.0.1:5001", "--node", "b=http://127.0.0.1:5002")
    assert options["static-nodes"] == {"a": "http://127.0.0.1:5001", "b": "http://127.0.0.1:5002"}
