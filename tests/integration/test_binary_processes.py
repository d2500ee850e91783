"""Binary values with real processes: random bytes in, the same bytes out, through a kill, a restart and repair."""

from __future__ import annotations

import os

import pytest

from kvd.testing.processes import Processes, http_request, request

from .test_cluster_processes import eventually, start_cluster

pytestmark = pytest.mark.timeout(180)


def test_random_bytes_come_back_exactly_raw_also_after_a_node_restarts_and_is_repaired(processes: Processes) -> None:
    _, nodes, gateway = start_cluster(
        processes, "--replicas", "3", "--write-quorum", "2", "--read-quorum", "2", "--repair-interval", "0.3"
    )
    values = {f"blob{i}": os.urandom(1000 + i) for i in range(20)}
    for key, value in values.items():
        status, body = request(gateway.port, "PUT", f"/kv/{key}", value, headers={"Content-Type": "image/png"})
        assert status == 200 and body["encoding"] == "base64", body
    for key, value in values.items():
        answer = http_request(gateway.port, "GET", f"/kv/{key}?raw=true")
        assert answer.status == 200 and answer.body == value
        assert {k.lower(): v for k, v in answer.headers.items()}["content-type"] == "image/png"
    nodes[0].kill()
    later = {f"late{i}": os.urandom(500) for i in range(10)}
    for key, value in later.items():
        assert request(gateway.port, "PUT", f"/kv/{key}", value)[0] == 200
    nodes[0].start()

    def repaired() -> bool:
        for key, value in {**values, **later}.items():
            answer = http_request(nodes[0].port, "GET", f"/kv/{key}?raw=true")
            if answer.status != 200 or answer.body != value:
                return False
        return True

    eventually(repaired, seconds=60, what="the restarted node holds every value, byte for byte")
    answer = http_request(nodes[0].port, "GET", "/kv/late0?raw=true")
    assert {k.lower(): v for k, v in answer.headers.items()}["content-type"] == "application/octet-stream"
