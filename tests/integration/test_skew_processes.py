"""
Real processes: gateways whose clocks are an hour off (``faketime``, Debian package
faketime). A write acknowledged after another write to the same key was acknowledged wins
over it, and a delete likewise, whichever gateway's clock is ahead: 0 lost, 0 undone, read
through every gateway. The skewed gateway exports the skew and logs it once, and reckons
TTLs by its nodes' clocks.

Skipped with the reason where libfaketime is not installed or does not move this Python's clock.
"""

from __future__ import annotations

import re
import time

import pytest

from kvd.testing.clocks import faketime_launcher, faketime_unavailable
from kvd.testing.processes import Kvd, Processes, free_port, http_request, listen_on, request

from .test_cluster_processes import eventually

pytestmark = pytest.mark.timeout(180)
HOUR = 3600.0


def skewed_gateway(processes: Processes, name: str, offset: str, registry: Kvd) -> Kvd:
    port = free_port()
    return processes.kvd(
        name,
        *("--role", "gateway", "--registry", registry.url, "--listen", listen_on(port)),
        port=port,
        launcher=faketime_launcher(offset),
    )


def skew_metric(gateway: Kvd) -> float:
    assert gateway.port is not None
    text = request_text(gateway.port, "/metrics")
    found = re.search(r"^kvd_clock_skew_seconds(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert found, "kvd_clock_skew_seconds is exported"
    return float(found.group(1))


def request_text(port: int, path: str) -> str:
    return http_request(port, "GET", path).body.decode()


def check(gateways: list[Kvd], expected: dict[str, str | None]) -> tuple[list[str], list[str]]:
    """Keys whose acknowledged overwrite was lost, and keys whose acknowledged delete was undone."""
    lost, undone = [], []
    for gateway in gateways:
        for key, value in expected.items():
            status, body = request(gateway.port, "GET", f"/kv/{key}")
            if value is None and status != 404:
                undone.append(f"{key} via {gateway.name}: {status} {body.get('value')}")
            elif value is not None and (status != 200 or body["value"] != value):
                lost.append(f"{key} via {gateway.name}: {status} {body.get('value')}")
    return lost, undone


@pytest.mark.parametrize(("offset", "sign"), [("+1h", 1), ("-1h", -1)], ids=["ahead", "behind"])
def test_writes_and_deletes_after_a_skewed_gateways_writes_win(processes: Processes, offset: str, sign: int) -> None:
    why = faketime_unavailable(offset, sign * HOUR)
    if why is not None:
        pytest.skip(why)
    cluster = processes.cluster(gateway_options=("--replicas", "3", "--write-quorum", "2", "--read-quorum", "2"))
    normal = cluster.gateway
    skewed = skewed_gateway(processes, f"gateway{offset}", offset, cluster.registry).start()
    eventually(lambda: len(request(skewed.port, "GET", "/cluster")[1]["nodes"]) == 3, what="skewed gateway sees 3")
    expected: dict[str, str | None] = {}
    # The skewed gateway writes first, the normal one after each was acknowledged; then the other way round.
    for first, then, prefix in ((skewed, normal, "s"), (normal, skewed, "n")):
        for i in range(120):
            status, _ = request(first.port, "PUT", f"/kv/{prefix}{i}", f"first {i}".encode())
            assert status == 200
        for i in range(100):
            status, body = request(then.port, "PUT", f"/kv/{prefix}{i}", f"then {i}".encode())
            assert status == 200, body
            expected[f"{prefix}{i}"] = f"then {i}"
        for i in range(100, 120):
            status, body = request(then.port, "DELETE", f"/kv/{prefix}{i}")
            assert status in (200, 204), body
            expected[f"{prefix}{i}"] = None
    lost, undone = check([normal, skewed], expected)
    assert (lost[:5], undone[:5]) == ([], []), "0 lost, 0 undone"
    # Having heard its nodes, the skewed gateway reckons TTLs by their clocks: ten minutes from
    # now by the nodes' reckoning, neither already expired nor an hour longer.
    status, body = request(skewed.port, "PUT", "/kv/lease?ttl=600", b"held")
    assert status == 200 and abs(body["expires"] - (time.time() + 600)) < 60, body
    assert request(normal.port, "GET", "/kv/lease")[1].get("value") == "held"
    assert request(skewed.port, "GET", "/kv/lease")[1].get("value") == "held"
    assert abs(skew_metric(skewed) - sign * HOUR) < 120, skew_metric(skewed)
    assert abs(skew_metric(normal)) < 60
    lines = [line for line in skewed.log.read_text().splitlines() if "clock is" in line and "off node" in line]
    # Logged once per node it is off from (kvd.gateway.skew), not once per answer.
    assert sorted(re.findall(r"off node (\w+)'s", "\n".join(lines))) == ["a", "b", "c"], lines
