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

from kvd.paxos import FILE, Proposal
from kvd.testing.paxos_jsonl import write_paxos_jsonl
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
    write_paxos_jsonl(str(data), [("j", B2, None), ("k", B2, Proposal(B2, "v", B2))])  # a promise, an acceptance
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


def test_a_real_node_past_a_compaction_keeps_every_answered_promise_and_acceptance_through_kill_9(
    processes: Processes,
) -> None:
    node = processes.node("a").start()
    data = processes.workdir / "data" / "a"
    promised: dict[str, str] = {}
    accepted: dict[str, list[Any]] = {}
    big = "v" * 100_000
    snapshot = data / "snapshot.json"
    for i in range(1, 81):  # 100 KB acceptances until the journal passes 4 MiB: a compaction
        if snapshot.exists() and snapshot.read_bytes()[:9] == b'{"kvd":4,':
            break  # the keys' last records are mostly in the snapshot now, not the new journal
        key, ballot = f"k{i % 5}", f"018f{i:010x}0000.gw1"
        if i % 3 == 0:
            [answer] = paxos(node.port, ["p", key, ballot])
            assert answer[0], answer
            promised[key] = ballot
        else:
            value = None if i % 7 == 0 else f"{i}{big}"
            [answer] = paxos(node.port, ["a", key, ballot, value, ballot])
            assert answer == [True, ballot], answer
            promised[key], accepted[key] = ballot, [ballot, value, ballot]
            if i % 4 == 0:  # some committed too: their proposals may go, their values stay
                paxos(node.port, ["c", key, value, ballot])
    assert snapshot.read_bytes()[:9] == b'{"kvd":4,', "compacted, the acceptor's state in the snapshot"
    node.kill()
    node = processes.node("a", node.port).start()
    low = "018f00000000000000.gw1"
    for key, ballot in promised.items():
        [answer] = paxos(node.port, ["p", key, low])
        assert answer[0] is False and answer[1] >= ballot, (key, answer)
        if key in accepted:
            proposal, entry = answer[2], answer[3]
            kept = proposal is not None and proposal[0] >= accepted[key][0]
            assert kept or (entry is not None and entry[1] >= accepted[key][2]), (key, answer)
