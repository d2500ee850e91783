"""A real `twistd -n kvd --role node` process: the README's session, crashes, and start-up errors."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvd.testing.processes import Processes, free_port, request, twistd_command

pytestmark = pytest.mark.timeout(120)


def test_the_readme_session(processes: Processes) -> None:
    node = processes.node("a").start()
    status, body = request(node.port, "PUT", "/kv/mykey1", b"myvalue1")
    version = body.pop("version")
    assert (status, body) == (200, {"success": True, "key": "mykey1", "value": "myvalue1"})
    assert request(node.port, "GET", "/kv/mykey1") == (
        200,
        {"success": True, "key": "mykey1", "value": "myvalue1", "version": version},
    )
    assert request(node.port, "DELETE", "/kv/mykey1") == (200, {"success": True, "key": "mykey1"})
    assert request(node.port, "GET", "/kv/mykey1")[0] == 404
    assert request(node.port, "GET", "/node") == (200, {"success": True, "id": "a", "keys": 0})


def test_every_acknowledged_write_survives_kill_9_under_32_writers(processes: Processes) -> None:
    node = processes.node("a").start()
    acknowledged: dict[str, str | None] = {}  # key -> value, None for an acknowledged delete
    uncertain: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def writer(number: int) -> None:
        rng = random.Random(number)
        for i in range(10_000):
            if stop.is_set():
                return
            key = f"w{number}-{rng.randrange(40)}"
            delete = rng.random() < 0.25
            value = f"{number}:{i}:" + "x" * rng.randrange(200)
            try:
                status, _ = request(
                    node.port, "DELETE" if delete else "PUT", f"/kv/{key}", None if delete else value.encode()
                )
            except OSError:
                with lock:
                    uncertain.add(key)
                return
            with lock:
                if status == 200:
                    acknowledged[key] = None if delete else value
                elif delete and status == 404:
                    acknowledged[key] = None
                else:
                    uncertain.add(key)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 600 and time.monotonic() < deadline:
        time.sleep(0.05)
    node.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acknowledged) >= 600, "the writers made too little progress to test anything"

    node.start()
    checked = 0
    for key, value in acknowledged.items():
        if key in uncertain:
            continue
        status, body = request(node.port, "GET", f"/kv/{key}")
        if value is None:
            assert status == 404, (key, body)
        else:
            assert (status, body.get("value")) == (200, value), key
        checked += 1
    assert checked >= 300


def test_sigterm_finishes_writes_and_exits_0(processes: Processes) -> None:
    node = processes.node("a").start()
    for i in range(50):
        assert request(node.port, "PUT", f"/kv/k{i}", b"v")[0] == 200
    assert node.terminate() == 0
    node.start()
    assert request(node.port, "GET", "/node")[1]["keys"] == 50


def test_sigterm_under_32_writers_answers_in_flight_writes_and_keeps_them(processes: Processes) -> None:
    node = processes.node("a").start()
    acknowledged: dict[str, str] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def writer(number: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            key, value = f"w{number}-{i}", f"value {number} {i}"
            try:
                status, _ = request(node.port, "PUT", f"/kv/{key}", value.encode(), timeout=15)
            except OSError:
                return  # refused: the node has stopped listening
            if status == 200:
                with lock:
                    acknowledged[key] = value
            elif status != 503:  # 503: the node is shutting down and took no more writes
                raise AssertionError(status)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acknowledged) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    status = node.terminate(timeout=30)  # raises if it hangs
    stop.set()
    for t in threads:
        t.join(30)
    assert status == 0
    node.start()
    missing = [k for k, v in acknowledged.items() if request(node.port, "GET", f"/kv/{k}")[1].get("value") != v]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"


def test_a_flood_of_connections_does_not_stop_healthz(processes: Processes) -> None:
    import resource
    import socket

    node = processes.node("a").start()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    count = max(50, min(600, soft - 100))
    flood = []
    try:
        for i in range(count):
            s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
            if i % 3 == 0:
                s.sendall(b"PUT /kv/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npart")  # and stalls
            elif i % 3 == 1:
                s.sendall(b"GET /kv/k HTTP/1.1\r\n")  # headers never finish
            flood.append(s)
        assert request(node.port, "GET", "/healthz", timeout=5) == (200, {"success": True, "status": "ok"})
        assert request(node.port, "PUT", "/kv/k", b"v")[0] == 200
    finally:
        for s in flood:
            s.close()


def test_a_port_in_use_is_one_line_and_non_zero(processes: Processes) -> None:
    first = processes.node("a").start()
    second = processes.node("b", first.port)
    status, output = second.run_to_exit()
    assert status != 0
    assert "cannot listen" in output and "Traceback" not in output and output.strip().count("\n") == 0, output


def test_a_data_dir_in_use_is_one_line_and_non_zero(processes: Processes) -> None:
    processes.node("a").start()
    again = processes.node("a")
    status, output = again.run_to_exit()
    assert status != 0 and "in use" in output and output.strip().count("\n") == 0, output


def test_corrupt_data_stops_start_up_and_changes_nothing(processes: Processes, tmp_path: Path) -> None:
    node = processes.node("a").start()
    for i in range(5):
        request(node.port, "PUT", f"/kv/k{i}", b"v")
    node.kill()
    journal = tmp_path / "data" / "a" / "journal-0.jsonl"
    lines = journal.read_bytes().split(b"\n")
    lines[1] = b"{not json"
    journal.write_bytes(b"\n".join(lines))
    before = journal.read_bytes()
    status, output = node.run_to_exit()
    assert status != 0 and "not valid JSON" in output and output.strip().count("\n") == 0, output
    assert journal.read_bytes() == before


def test_bad_option_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        twistd_command() + ["-n", "kvd", "--role", "node", "--node-id", "a"],
        capture_output=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    output = done.stderr.decode() + done.stdout.decode()
    assert output.strip().count("\n") == 0 and "--data-dir" in output, output


def test_help_documents_every_node_option(tmp_path: Path) -> None:
    done = subprocess.run(twistd_command() + ["kvd", "--help"], capture_output=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0
    text = done.stdout.decode()
    for option in ("--role", "--listen", "--node-id", "--data-dir", "--fsync", "--max-value-bytes", "--access-log"):
        assert option in text, option


def test_oversized_body_gets_413_from_a_real_node(processes: Processes) -> None:
    node = processes.node("a", None, "--max-value-bytes", "100").start()
    status, body = request(node.port, "PUT", "/kv/k", b"x" * 101)
    assert status == 413 and body["success"] is False
    assert request(node.port, "PUT", "/kv/k", b"x" * 100)[0] == 200
    assert json.dumps(request(node.port, "GET", "/kv/k")[1]["value"]) == json.dumps("x" * 100)


def test_port_helper_gives_distinct_ports() -> None:
    assert free_port() != 0
