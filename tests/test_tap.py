"""The command line: what twistd kvd accepts, its defaults, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from twisted.internet.testing import MemoryReactorClock

from kvd.options import CONFIGS, OPTIONS, DevConfig, GatewayConfig, NodeConfig, RegistryConfig
from kvd.ring import DEFAULT_VNODES
from kvd.tap import Options, makeService


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


COMMON = {"access_log": False, "no_metrics": False, "cluster_secret_file": None, "ca_cert": None}


def test_a_node_parses_to_its_whole_config() -> None:
    """Every field of a node's config: what was typed, and the table's defaults for the rest."""
    assert parse(
        "--role",
        "node",
        "--node-id",
        "a",
        "--data-dir",
        "/d",
        "--registry",
        "http://r1:8500/",
        "--registry=https://r2:1",
    ).config == NodeConfig(
        listen="tcp:5000:interface=127.0.0.1",
        node_id="a",
        data_dir="/d",
        registry=("http://r1:8500", "https://r2:1"),
        advertise=None,
        fsync="always",
        max_value_bytes=1024 * 1024,
        client_token_file=None,
        **COMMON,
    )


def test_a_registry_parses_to_its_whole_config() -> None:
    assert parse("--role", "registry", "--ttl", "2.5", "--access-log", "--ca-cert", "ca.pem").config == RegistryConfig(
        listen="tcp:8500:interface=127.0.0.1",
        ttl=2.5,
        forget_after=3600.0,
        **{**COMMON, "access_log": True, "ca_cert": "ca.pem"},
    )


def test_forget_after_is_a_registry_and_dev_option(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse("--role", "registry", "--forget-after", "60").config
    assert isinstance(config, RegistryConfig) and config.forget_after == 60.0
    assert parse("--role", "dev", "--forget-after", "7").config.forget_after == 7.0  # type: ignore[attr-defined]
    for argv in (("--role", "registry", "--forget-after", "0"), ("--role", "gateway", "--forget-after", "60")):
        with pytest.raises(SystemExit):
            parse(*argv)
        assert "--forget-after" in capsys.readouterr().err


def test_a_gateway_parses_to_its_whole_config() -> None:
    assert parse(
        "--role",
        "gateway",
        "--node",
        "a=http://127.0.0.1:5001",
        "--replicas",
        "2",
        "--read-quorum",
        "1",
        "--client-token-file",
        "token",
        "--no-metrics",
    ).config == GatewayConfig(
        listen="tcp:8000:interface=127.0.0.1",
        registry=(),
        static_nodes={"a": "http://127.0.0.1:5001"},
        vnodes=DEFAULT_VNODES,
        replicas=2,
        read_quorum=1,
        write_quorum=2,
        repair_interval=2.0,
        tombstone_grace=3600.0,
        timeout=5.0,
        max_value_bytes=1024 * 1024,
        client_token_file="token",
        **{**COMMON, "no_metrics": True},
    )


def test_a_small_dev_cluster_shrinks_its_replicas_and_quorums() -> None:
    assert parse("--role", "dev", "--nodes", "1", "--fsync", "never").config == DevConfig(
        data_dir="./kvd-data",
        nodes=1,
        ttl=10.0,
        forget_after=3600.0,
        vnodes=DEFAULT_VNODES,
        replicas=1,
        read_quorum=1,
        write_quorum=1,
        repair_interval=2.0,
        tombstone_grace=3600.0,
        timeout=5.0,
        fsync="never",
        max_value_bytes=1024 * 1024,
        client_token_file=None,
        **COMMON,
    )


def test_every_role_config_has_a_field_for_each_option_of_its_role() -> None:
    """The table and the configs agree: adding a row without its field (or a field without its row) fails."""
    for role, config in CONFIGS.items():
        assert {f.name for f in attrs.fields(config)} == {o.attribute for o in OPTIONS if role in o.roles}, role


def test_help_shows_the_real_defaults_and_the_roles(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "[default: always]" in text and "[default: 1048576]" in text and "[default: 10.0]" in text
    assert "registry tcp:8500:interface=127.0.0.1" in text
    assert "node, gateway: a registry's URL" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--role", "registry", "--fsync", "always"), "--fsync does not apply to --role registry"),
        (("--role", "registry", "--client-token-file", "t"), "--client-token-file does not apply to --role registry"),
        (("--role", "node", "--node-id", "a", "--data-dir", "/d", "--node", "a=http://h:1"), "--node does not apply"),
        (("--role", "dev", "--listen", "tcp:1"), "--listen does not apply to --role dev"),
        (("--role", "node", "--node-id", "a", "--data-dir", "/d", "--advertise", "http://h:1/?x"), "query"),
        (("--role", "node", "--node-id", "a", "--data-dir", "/d", "--registry", "http://h:1#f"), "query or fragment"),
        (("--role", "gateway", "--node", "a=ftp://h"), "http:// or https://"),
        (("--role", "gateway", "--registry", "http://r:1", "--node", "a=http://h:1"), "not both"),
        (
            ("--role", "gateway", "--node", "a=http://h:1", "--replicas", "1"),
            "--read-quorum 2 is more than --replicas 1",
        ),
        (("--role", "node", "--node-id", "-a", "--data-dir", "/d"), "--node-id: The node id '-a' is not valid"),
        (("--role", "registry", "--ttl", "nan"), "--ttl must be at least 0.1, not nan"),
    ],
)
def test_more_bad_options_are_one_line(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (("--role", "gateway", "--registry", "foo"), "--registry 'foo' must start with http:// or https://"),
        (("--role", "gateway", "--registry", "http://r:99999"), "--registry 'http://r:99999' has an invalid port"),
        (
            ("--role", "node", "--node-id", "a", "--data-dir", "/d", "--advertise", "http://"),
            "--advertise 'http://' has no host",
        ),
        (
            ("--role", "node", "--node-id", "-a", "--data-dir", "/d"),
            "--node-id: The node id '-a' is not valid: it must be 1 to 128 characters of ASCII letters, digits, "
            "'.', '_' or '-', starting with a letter or a digit",
        ),
    ],
)
def test_a_bad_url_or_id_reads_like_every_other_bad_option(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], line: str
) -> None:
    """No full stop before the pointer to --help, as in "--ttl must be at least 0.1, not nan (see ...)"."""
    with pytest.raises(SystemExit):
        parse(*argv)
    assert capsys.readouterr().err == f"twistd kvd: {line} (see twistd kvd --help)\n"


def test_once_running_start_up_objects_leave_the_collector_and_the_young_generation_is_collected_less_often() -> None:
    import gc

    from kvd.tap import GC_YOUNG_THRESHOLD

    reactor = MemoryReactorClock()
    makeService(parse("--role=registry", "--listen=tcp:0"), reactor=reactor)
    threshold = gc.get_threshold()
    try:
        assert gc.get_threshold() == threshold, "nothing changes before the reactor runs"
        reactor.run()  # MemoryReactor: runs the callWhenRunning hooks
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, threshold[1], threshold[2])
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
