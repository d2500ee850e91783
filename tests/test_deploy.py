"""
The systemd units in deploy/: they parse, carry the settings an operator relies on (restart,
state directory, dedicated user, hardening), and their ExecStart, expanded the way systemd
expands it with the example environment files, is a command line twistd kvd accepts.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trustme
from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.scripts.twistd import ServerOptions

from kvd.tap import Options

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
INSTALLED_TWISTD = "/opt/kvd/bin/twistd"
TWISTD_OPTIONS = ["--nodaemon", "--pidfile=", "--logfile=-"]
INSTANCE = "a"

#: unit file -> (role, the example environment file, where the unit reads it from)
UNITS = {
    "kvd-node@.service": ("node", "node.env", "/etc/kvd/node-%i.env"),
    "kvd-registry.service": ("registry", "registry.env", "/etc/kvd/registry.env"),
    "kvd-gateway.service": ("gateway", "gateway.env", "/etc/kvd/gateway.env"),
}

#: Settings every unit must have, exactly.
REQUIRED = {
    "Service": {
        "Type": ["simple"],
        "User": ["kvd"],
        "Group": ["kvd"],
        "Restart": ["on-failure"],
        "KillSignal": ["SIGTERM"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "CapabilityBoundingSet": [""],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
    },
    "Install": {"WantedBy": ["multi-user.target"]},
}

#: The hardening block, identical in every unit: everything after this comment in [Service].
HARDENING_MARK = "# Hardening"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """
    A unit file as systemd reads it: sections of keys, each key with all its values in order
    (systemd allows repeated keys), backslash-newline joining lines. Anything else is an error.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith(("#", ";")) or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if re.fullmatch(r"\[[A-Za-z]+\]", line):
            section = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if not sep or section is None or not re.fullmatch(r"[A-Za-z]+", key.strip()):
            raise ValueError(f"line {number}: not a setting in a section: {raw!r}")
        section.setdefault(key.strip(), []).append(value.strip())
    if pending:
        raise ValueError("the file ends in a continued line")
    return sections


def parse_env(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """
    An environment file as systemd reads it: NAME=VALUE lines, an optional pair of quotes
    around the value. Returns the variables set, and the commented-out examples ("#NAME=VALUE").
    """
    assignment = re.compile(r"([A-Z_][A-Z0-9_]*)=(.*)")

    def value(text: str) -> str:
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            return text[1:-1]
        return text

    variables: dict[str, str] = {}
    examples: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith(("# ", ";")) or line == "#":
            continue
        match = assignment.fullmatch(line[1:] if line.startswith("#") else line)
        if match is None:
            raise ValueError(f"line {number}: neither NAME=VALUE, a #NAME=VALUE example nor a '# ' comment: {line!r}")
        name, text_value = match.group(1), value(match.group(2))
        if line.startswith("#"):
            examples.append((name, text_value))
        else:
            variables[name] = text_value
    return variables, examples


def expand(command: str, environment: dict[str, str]) -> list[str]:
    """
    An Exec line's words as systemd makes them: %i and %% first, then words split like a shell's,
    then "$NAME" as a whole word is replaced by the value split on whitespace (nothing when
    unset or empty) and "${NAME}" anywhere by the whole value as part of the same word.
    """
    assert set(re.findall(r"%.", command)) <= {"%i", "%%"}, f"a specifier the tests do not expand in {command!r}"
    words = shlex.split(re.sub(r"%[i%]", lambda m: INSTANCE if m.group() == "%i" else "%", command))
    argv: list[str] = []
    for word in words:
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += environment.get(whole.group(1), "").split()
            continue
        word = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: environment.get(m.group(1), ""), word)
        assert "$" not in word, f"a $ systemd would not expand as meant: {word!r} in {command!r}"
        argv.append(word)
    return argv


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((DEPLOY / name).read_text())


def example_environment(name: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    return parse_env((DEPLOY / UNITS[name][1]).read_text())


def variables_used(command: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", command)) - {"STATE_DIRECTORY"}


def kvd_argv(name: str, environment: dict[str, str], state_directory: Path) -> list[str]:
    """
    The unit's ExecStart with this environment: checks the part up to "kvd" is the installed
    twistd with options twistd accepts, and returns the rest, kvd's part.
    """
    [command] = unit(name)["Service"]["ExecStart"]
    argv = expand(command, {**environment, "STATE_DIRECTORY": str(state_directory)})
    assert argv[: len(TWISTD_OPTIONS) + 1] == [INSTALLED_TWISTD, *TWISTD_OPTIONS], (
        "the installed twistd, in the foreground, with no pidfile, logging to stdout (the journal)"
    )
    assert "kvd" in argv, "twistd runs the kvd plugin"
    twistd = ServerOptions()
    twistd.parseOptions(argv[1 : argv.index("kvd")])  # raises UsageError when twistd refuses it
    assert (bool(twistd["nodaemon"]), twistd["pidfile"], twistd["logfile"]) == (True, "", "-")
    return argv[argv.index("kvd") + 1 :]


def parse_kvd(argv: list[str]) -> Options:
    options = Options()
    options.parseOptions(argv)  # raises SystemExit, with the reason on stderr, when kvd refuses it
    return options


@pytest.mark.parametrize("name", UNITS)
def test_unit_has_the_required_settings(name: str) -> None:
    """Restart on failure, a dedicated user, the environment file, and the hardening the issue asks for."""
    sections = unit(name)
    for section, settings in REQUIRED.items():
        for key, values in settings.items():
            assert sections[section].get(key) == values, f"{name} [{section}] {key}"
    assert sections["Service"]["EnvironmentFile"] == [UNITS[name][2]]
    assert len(sections["Service"]["ExecStart"]) == 1


def test_node_unit_keeps_its_data_under_var_lib_kvd() -> None:
    """Each node instance gets /var/lib/kvd/ID, private to the kvd user, and its data dir is that."""
    service = unit("kvd-node@.service")["Service"]
    assert service["StateDirectory"] == ["kvd/%i"]
    assert service["StateDirectoryMode"] == ["0700"]
    assert "--data-dir=${STATE_DIRECTORY}" in service["ExecStart"][0].split()


@pytest.mark.parametrize("name", UNITS)
def test_unit_allows_write_execute_memory(name: str) -> None:
    """
    MemoryDenyWriteExecute= stays off: under it, pyOpenSSL's cffi callbacks, which every ssl:
    endpoint and https:// call sets up, fail with MemoryError.
    """
    assert unit(name)["Service"].get("MemoryDenyWriteExecute", ["no"]) == ["no"]


def test_units_share_one_hardening_block() -> None:
    """The hardening is the same in every unit, so a change to one cannot miss the others."""
    blocks = {name: (DEPLOY / name).read_text().split(HARDENING_MARK, 1)[1].split("\n", 1)[1] for name in UNITS}
    assert len(set(blocks.values())) == 1, "the units' hardening blocks differ"
    hardening = parse_unit("[Service]\n" + next(iter(blocks.values())).split("[Install]")[0])["Service"]
    assert {"NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "SystemCallFilter"} <= set(hardening)


@pytest.mark.parametrize("name", UNITS)
def test_environment_file_documents_exactly_what_the_unit_uses(name: str) -> None:
    """Every variable ExecStart reads is in the example file (set or as an example), and nothing else is."""
    [command] = unit(name)["Service"]["ExecStart"]
    variables, examples = example_environment(name)
    assert set(variables) | {example for example, _ in examples} == variables_used(command)
    # Whatever ${NAME} holds is one word of its own: it must be set, or kvd gets an empty option.
    assert set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", command)) - {"STATE_DIRECTORY"} <= set(variables)


@pytest.mark.parametrize("name", UNITS)
def test_exec_start_is_accepted_by_twistd_kvd(name: str, tmp_path: Path) -> None:
    """ExecStart, with the example environment, %i = a and the state directory, is a valid kvd command line."""
    role = UNITS[name][0]
    variables, _ = example_environment(name)
    options = parse_kvd(kvd_argv(name, variables, tmp_path))
    expected = {"role": role, "listen": variables["KVD_LISTEN"]}
    if role in ("node", "gateway"):
        expected["registry"] = [variables["KVD_REGISTRY"]]  # --registry is repeatable: a list
    if role == "node":
        expected.update({"node-id": INSTANCE, "data-dir": str(tmp_path), "advertise": variables["KVD_ADVERTISE"]})
    assert {key: options[key] for key in expected} == expected
    # The example listens where other machines can reach it, on an endpoint Twisted can build.
    assert "127.0.0.1" not in options["listen"] and "localhost" not in options["listen"]
    serverFromString(MemoryReactor(), options["listen"])


def test_expansion_keeps_braced_values_whole_and_splits_bare_ones() -> None:
    """The ExecStart expansion the tests rely on follows systemd's rules."""
    environment = {"ONE": "tcp:1:interface=10.0.0.1", "MANY": "--access-log  --ttl=3", "EMPTY": ""}
    assert expand("twistd --listen=${ONE} $MANY $EMPTY $UNSET --id=%i --p=%%i", environment) == [
        "twistd",
        "--listen=tcp:1:interface=10.0.0.1",
        "--access-log",
        "--ttl=3",
        "--id=a",
        "--p=%i",
    ]


def test_a_wrong_environment_is_refused_by_the_check(tmp_path: Path) -> None:
    """The check can fail: an option of another role in KVD_OPTIONS is refused, as twistd kvd would refuse it."""
    variables, _ = example_environment("kvd-registry.service")
    with pytest.raises(SystemExit):
        parse_kvd(kvd_argv("kvd-registry.service", {**variables, "KVD_OPTIONS": "--fsync=never"}, tmp_path))


def examples() -> list[object]:
    return [
        pytest.param(name, variable, value, id=f"{UNITS[name][1]}:{number}:{variable}")
        for name in UNITS
        for number, (variable, value) in enumerate(example_environment(name)[1], 1)
    ]


@pytest.fixture(scope="module")
def etc_kvd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for the files the examples name in /etc/kvd: secrets, a CA, a key and certificate."""
    directory = tmp_path_factory.mktemp("etc-kvd")
    ca = trustme.CA()
    issued = ca.issue_cert("10.0.0.5", "10.0.0.6")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for role in UNITS.values():
        examples = (DEPLOY / role[1]).read_text()
        for name in set(re.findall(r"/etc/kvd/([\w.-]+)", examples)) - {"ca.pem"}:
            if name.endswith("-key.pem"):
                issued.private_key_pem.write_to_path(str(directory / name))
            elif name.endswith("-cert.pem"):
                issued.cert_chain_pems[0].write_to_path(str(directory / name))
            else:
                (directory / name).write_text(f"{name}-0123456789abcdef\n")
    return directory


@pytest.mark.parametrize(("name", "variable", "value"), examples())
def test_commented_examples_are_accepted_by_twistd_kvd(
    name: str, variable: str, value: str, etc_kvd: Path, tmp_path: Path
) -> None:
    """Each "#NAME=VALUE" example, uncommented, gives a command line kvd accepts and an endpoint it can build."""
    variables, _ = example_environment(name)
    environment = {**variables, variable: value.replace("/etc/kvd/", f"{etc_kvd}/")}
    options = parse_kvd(kvd_argv(name, environment, tmp_path))
    serverFromString(MemoryReactor(), options["listen"])


def verify_copy(name: str, directory: Path) -> Path:
    """
    The unit, in a directory of its own, running the twistd of this test's Python instead of
    /opt/kvd/bin/twistd: systemd-analyze verify insists that the program exists.
    """
    twistd = Path(sys.executable).parent / "twistd"
    if not twistd.exists():
        pytest.skip(f"no twistd beside {sys.executable}")
    text = (DEPLOY / name).read_text()
    assert text.count(f"ExecStart={INSTALLED_TWISTD} ") == 1
    copy = directory / name
    copy.write_text(text.replace(f"ExecStart={INSTALLED_TWISTD} ", f"ExecStart={twistd} "))
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """systemd itself accepts the unit: no unknown setting, no bad value (it only warns, so any output fails)."""
    copy = verify_copy(name, tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_reports_a_bad_setting(tmp_path: Path) -> None:
    """The verify check can fail: a misspelt value is reported."""
    copy = verify_copy("kvd-registry.service", tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strickt"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--generators=no", "--recursive-errors=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "strickt" in result.stdout + result.stderr
