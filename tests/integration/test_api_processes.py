"""Real processes: TTL on every replica and across a restart, listing and batches through a gateway."""

from __future__ import annotations

import json
import time

import pytest

from kvd.testing.processes import Kvd, Processes, free_port, http_request, request

from .test_cluster_processes import eventually

pytestmark = pytest.mark.timeout(120)


def static_cluster(processes: Processes) -> tuple[list[Kvd], Kvd]:
    nodes = [processes.node(n).start() for n in ("a", "b", "c")]
    port = free_port()
    gateway = processes.kvd(
        "static-gateway",
        "--role",
        "gateway",
        "--timeout",
        "2",
        *[f"--node={n}=http://127.0.0.1:{node.port}" for n, node in zip("abc", nodes, strict=True)],
        "--listen",
        f"tcp:{port}:interface=127.0.0.1",
        port=port,
    ).start()
    return nodes, gateway


def sleep_until(when: float) -> None:
    delay = when - time.time()
    assert delay < 10, "the test waits for at most a few seconds"
    if delay > 0:
        time.sleep(delay)


def test_a_2_second_ttl_is_live_before_and_absent_after_on_every_replica(processes: Processes) -> None:
    nodes, gateway = static_cluster(processes)
    status, body = request(gateway.port, "PUT", "/kv/session?ttl=2", b"token")
    assert status == 200
    expires = body["expires"]
    assert time.time() < expires <= time.time() + 2.1
    request(gateway.port, "PUT", "/kv/stays", b"x")
    # The third replica's apply may still be under way after W answered: wait for it (before the expiry).
    eventually(
        lambda: all(request(node.port, "GET", "/kv/session")[0] == 200 for node in nodes),
        seconds=expires - time.time(),
        what="the entry on every replica",
    )
    for node in nodes:
        status, answer = request(node.port, "GET", "/kv/session")
        assert status == 200 and answer["expires"] == expires, node.name
    assert request(gateway.port, "GET", "/kv")[1]["keys"] == ["session", "stays"]
    sleep_until(expires + 0.2)
    for node in nodes:
        assert request(node.port, "GET", "/kv/session")[0] == 404, node.name
    assert request(gateway.port, "GET", "/kv/session")[0] == 404
    assert request(gateway.port, "GET", "/kv")[1]["keys"] == ["stays"]
    deadline = time.monotonic() + 5
    while [request(node.port, "GET", "/node")[1]["keys"] for node in nodes] != [1, 1, 1]:
        assert time.monotonic() < deadline, "each node turns its expired entry into a tombstone within a second or so"
        time.sleep(0.2)


def test_a_batch_of_big_values_answers_up_to_its_budget_and_413_for_each_get_over_it(processes: Processes) -> None:
    """24 values of 1 MiB are over the 16 MiB answer budget: the answer stays within it, the rest are 413s."""
    nodes, gateway = static_cluster(processes)
    values = {f"big-{i:02d}": (f"{i:02d}" * (512 * 1024)) for i in range(24)}
    for key, value in values.items():
        assert request(gateway.port, "PUT", f"/kv/{key}", value.encode(), timeout=30)[0] == 200
    answer = http_request(gateway.port, "POST", "/batch", json.dumps({"get": list(values)}).encode(), timeout=60)
    assert answer.status == 200
    assert len(answer.body) < 17 * 1024 * 1024, "the answer is bounded by the budget, not by what was asked"
    results = answer.json()["results"]
    answered = [k for k, r in results.items() if r["status"] == 200]
    over = [k for k, r in results.items() if r["status"] == 413]
    assert len(answered) == 16 and len(over) == 8, "16 values of 1 MiB make the budget exactly"
    assert all(results[k]["value"] == values[k] for k in answered)
    assert all(results[k]["error"] == "answer too large: ask for fewer keys" for k in over)
    status, body = request(gateway.port, "POST", "/batch", json.dumps({"get": over}).encode(), timeout=60)
    assert status == 200 and all(r["status"] == 200 for r in body["results"].values()), "the rest fit in a second ask"


def test_an_expiry_survives_a_node_restart(processes: Processes) -> None:
    nodes, gateway = static_cluster(processes)
    node = nodes[0]
    # Longer than a restart takes on a busy machine (several seconds), so the entry is still live after it.
    status, body = request(node.port, "PUT", "/kv/k?ttl=8", b"v")
    assert status == 200
    expires = body["expires"]
    node.kill()
    node.start()
    status, answer = request(node.port, "GET", "/kv/k")
    assert status == 200 and answer["expires"] == expires, "the expiry came back from the journal"
    sleep_until(expires + 0.2)
    assert request(node.port, "GET", "/kv/k")[0] == 404


def test_a_batch_and_a_listing_through_a_gateway(processes: Processes) -> None:
    nodes, gateway = static_cluster(processes)
    puts = {f"user/{i:03d}": f"v{i}" for i in range(200)}
    status, body = request(gateway.port, "POST", "/batch", json.dumps({"put": puts}).encode())
    assert status == 200 and all(r["status"] == 200 for r in body["results"].values())
    status, body = request(
        gateway.port, "POST", "/batch", json.dumps({"get": ["user/000", "nope"], "delete": ["user/001"]}).encode()
    )
    results = body["results"]
    assert results["user/000"]["value"] == "v0" and results["nope"]["status"] == 404
    assert results["user/001"]["status"] == 200
    listed, after = [], ""
    while True:
        status, page = request(gateway.port, "GET", f"/kv?prefix=user/&limit=64&after={after}")
        assert status == 200
        listed += page["keys"]
        if page["next"] is None:
            break
        after = page["next"]
    assert listed == sorted(set(puts) - {"user/001"})
    status, body = request(gateway.port, "POST", "/batch", json.dumps({"get": [str(i) for i in range(1001)]}).encode())
    assert status == 413 and body["success"] is False
