"""
The README's commands run as written, in order: the tour (with the dev cluster of the first
command running beside it) and "Using a node", as one bash script in a directory of their
own, in a private network namespace when there is one (the dev role's ports are fixed).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvd.testing.processes import private_network_for

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
PORTS = (8000, 8001, 8002, 8003, 8004, 8500, 5000)
#: The README's first command, less the install (the test runs in an installed copy).
DEV = "twistd -n kvd --role dev"


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def commands(markdown: str) -> list[str]:
    """The shell lines of the indented code blocks, leaving out blocks that show answers (JSON)."""
    blocks = re.findall(r"(?:^(?: {4}.*|)\n)+", markdown, re.M)
    lines: list[str] = []
    for block in blocks:
        code = [line[4:] for line in block.splitlines() if line.startswith("    ")]
        if code and not code[0].lstrip().startswith(("{", "$")):
            lines += code
    return lines


def test_the_readme_tour_and_using_a_node_run_as_written(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.splitlines()[2].strip().endswith(DEV)
    lines = commands(section(readme, "A five-minute tour")) + commands(section(readme, "Using a node"))
    assert any(line.startswith("kvd cluster") for line in lines) and "kill %%" in lines
    assert "kvd ls" in lines and "kvd export backup.ndjson && kvd import backup.ndjson" in lines
    done = beside_the_dev_cluster(tmp_path, lines)
    assert "new value 7" in done.stdout  # node4's own copy, written while it was down
    assert '"id": "a", "keys": 0' in done.stdout  # "Using a node" ran through /node


def beside_the_dev_cluster(tmp_path: Path, lines: list[str]) -> subprocess.CompletedProcess[str]:
    """Run C{lines} as one bash script in C{tmp_path}, beside a dev cluster; asserts it succeeded."""
    (tmp_path / ".venv").symlink_to(sys.prefix)  # what the README's first command made
    script = "\n".join(
        [
            "set -euo pipefail",
            f"{DEV} > dev.log 2>&1 &",
            "DEV=$!",
            "trap 'kill $DEV 2>/dev/null || true; kill $(cat node4.pid 2>/dev/null) 2>/dev/null || true' EXIT",
            "for i in $(seq 100); do curl -sf http://127.0.0.1:8000/healthz >/dev/null && break; sleep 0.2; done",
            # The dev cluster is ready once its gateway sees the three nodes.
            "for i in $(seq 100); do kvd --json cluster 2>/dev/null | grep -q node3 && break; sleep 0.2; done",
            *(f"echo '+ {line}' >&2; {line}" if not line.endswith("&") else line for line in lines),
            "kill $DEV; wait $DEV",
        ]
    )
    (tmp_path / "readme.sh").write_text(script)
    env = {**os.environ, "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin"}
    env.pop("KVD_URL", None)
    argv = ["bash", "readme.sh"]
    if private_network_for(*PORTS):
        argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]
    # Its own session, so that every process the script starts (the dev cluster, the nodes it
    # puts in the background) is killed with it, whatever happens; output to files, which
    # those processes may hold open after the script ends.
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            process.wait(timeout=200)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    done = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-3000:] + "\n--- dev.log:\n" + (tmp_path / "dev.log").read_text()[-2000:]
    return done


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


def test_the_client_examples_run_as_written(tmp_path: Path) -> None:
    """Every example of docs/client.md but the endless loops (watch, changes), against the dev cluster."""
    blocks = python_blocks((ROOT / "docs" / "client.md").read_text(encoding="utf-8"))
    runnable = [b for b in blocks if "while True" not in b and "client.watch(" not in b]
    assert len(blocks) - len(runnable) == 2 and len(runnable) >= 4
    lines = []
    for number, block in enumerate(runnable):
        (tmp_path / f"example{number}.py").write_text(block)
        lines.append(f"python example{number}.py")
    done = beside_the_dev_cluster(tmp_path, lines)
    assert "gone" in done.stdout and "hello" in done.stdout
