"""
A real node whose data dir holds a paxos.jsonl of before (the acceptor's own file): it carries
the acceptor's state into its journal, removes the file, and keeps every answered promise
through kill -9.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from kvd.paxos import FILE, Acceptor, Proposal
from kvd.testing.processes import Processes, request

pytestmark = pytest.mark.timeout(120)

B1, B2, B3 = "018f00000000000001.gw1", "018f00000000000002.gw2", "018f00000000000003.gw1"


def paxos(port: int, *items: list[Any]) -> list[Any]:
    status, body = request(port, "POST", "/internal/paxos", json.dumps({"items": list(items)}).encode())
    assert status == 200, body
    return body["answers"]  # type: ignore[no-any-return]


def test_a_node_on_a_data_dir_with_a_paxos_jsonl_migrates_it_and_keeps_its_promises(processes: Processes) -> None:
    data = processes.workdir / "data" / "a"
    data.mkdir(parents=True)
    old = Acceptor.open(str(data), lambda key, version: False)
    old.prepare("j", B2)
    old.accept("k", Proposal(B2, "v", B2))
    old.close()
    assert (data / FILE).exists()
    node = processes.node("a").start()
    # What the old file promised and accepted holds: lower ballots are refused.
    assert paxos(node.port, ["p", "k", B1], ["p", "j", B1]) == [
        [False, B2, [B2, "v", B2], None],
        [False, B2, None, None],
    ]
    deadline = time.monotonic() + 10
    while (data / FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (data / FILE).exists(), "removed once the journal holds its state"
    assert paxos(node.port, ["p", "k", B3]) == [[True, B3, [B2, "v", B2], None]]
    node.kill()  # kill -9: nothing more is written
    node = processes.node("a", node.port).start()
    assert not Path(data / FILE).exists()
    assert paxos(node.port, ["p", "k", B2], ["p", "j", B1]) == [
        [False, B3, [B2, "v", B2], None],
        [False, B2, None, None],
    ]


def test_a_corrupt_paxos_jsonl_stops_a_real_node_with_one_line_and_changes_no_file(processes: Processes) -> None:
    node = processes.node("a").start()
    request(node.port, "PUT", "/kv/k", b"v")
    node.kill()
    data = processes.workdir / "data" / "a"
    (data / FILE).write_bytes(b'{"k": "k", "p": "' + B1.encode() + b'"}\nnot json\n{"k": "j", "p": "x"}\n')
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.name != "LOCK"}
    status, output = node.run_to_exit()
    assert status != 0 and "paxos.jsonl" in output and output.strip().count("\n") == 0, output
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.name != "LOCK"} == before, "the incarnation too"
