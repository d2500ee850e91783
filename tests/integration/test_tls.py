"""A cluster entirely over TLS with a cluster secret and a client token, made with trustme's own CA."""

from __future__ import annotations

import ssl
import time
from pathlib import Path

import pytest
import trustme

from kvd.testing.processes import Processes, free_port, request

pytestmark = pytest.mark.timeout(180)
SECRET = "cluster-secret-for-tests"
TOKEN = "client-token-for-tests"


def tls_listen(port: int, pem: Path) -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={pem}"


def test_a_cluster_over_tls_with_secrets_and_an_untrusted_node_refused(processes: Processes, tmp_path: Path) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(server))
    stranger = tmp_path / "stranger.pem"
    trustme.CA().issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(stranger))
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "token").write_text(TOKEN + "\n")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    common = ["--ca-cert", str(tmp_path / "ca.pem"), "--cluster-secret-file", str(tmp_path / "secret")]

    registry_port = free_port()
    registry = processes.kvd(
        "registry",
        "--role",
        "registry",
        "--ttl",
        "2",
        "--listen",
        tls_listen(registry_port, server),
        *common,
        port=registry_port,
        tls=client,
    ).start()
    registry_url = f"https://127.0.0.1:{registry_port}"

    def node(node_id: str, pem: Path) -> int:
        port = free_port()
        processes.kvd(
            f"node-{node_id}",
            "--role",
            "node",
            "--node-id",
            node_id,
            "--data-dir",
            str(tmp_path / node_id),
            "--listen",
            tls_listen(port, pem),
            "--advertise",
            f"https://127.0.0.1:{port}",
            "--registry",
            registry_url,
            "--client-token-file",
            str(tmp_path / "token"),
            *common,
            port=port,
            tls=client if pem == server else ssl._create_unverified_context(),
        ).start()
        return port

    node("a", server)
    node("b", server)
    gateway_port = free_port()
    gateway = processes.kvd(
        "gateway",
        "--role",
        "gateway",
        "--registry",
        registry_url,
        "--listen",
        tls_listen(gateway_port, server),
        "--client-token-file",
        str(tmp_path / "token"),
        *common,
        port=gateway_port,
        tls=client,
    ).start()

    def cluster() -> list[str]:
        return [n["id"] for n in request(gateway.port, "GET", "/cluster", tls=client)[1]["nodes"]]

    deadline = time.monotonic() + 20
    while cluster() != ["a", "b"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster() == ["a", "b"], "nodes registered over TLS with the secret"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(gateway.port, "PUT", "/kv/k", b"v", tls=client)[0] == 401
    for i in range(20):
        assert request(gateway.port, "PUT", f"/kv/k{i}", b"v", tls=client, headers=auth)[0] == 200
        assert request(gateway.port, "GET", f"/kv/k{i}", tls=client, headers=auth)[1]["value"] == "v"

    # A rogue without the secret can neither list nor join.
    assert request(registry.port, "GET", "/registry/nodes", tls=client)[0] == 401
    assert (
        request(registry.port, "PUT", "/registry/nodes/rogue", b'{"url": "https://127.0.0.1:1"}', tls=client)[0] == 401
    )
    status, body = request(
        registry.port, "GET", "/registry/nodes", tls=client, headers={"Authorization": f"Bearer {SECRET}"}
    )
    assert status == 200 and [n["id"] for n in body["nodes"]] == ["a", "b"]

    # A node whose certificate no trusted CA signed is refused by the gateway: writes go on
    # (a and b make the quorum) but none reaches c.
    c_port = node("c", stranger)
    deadline = time.monotonic() + 20
    while cluster() != ["a", "b", "c"] and time.monotonic() < deadline:
        time.sleep(0.1)
    key = next(
        f"x{i}"
        for i in range(1000)
        if request(gateway.port, "GET", f"/cluster/owners/x{i}", tls=client)[1]["nodes"][0] == "c"
    )
    status, body = request(gateway.port, "PUT", f"/kv/{key}", b"v", tls=client, headers=auth)
    assert status == 200, body
    deadline = time.monotonic() + 15  # a repair sweep, which must not get through to c either
    while request(gateway.port, "GET", "/cluster", tls=client)[1]["repair"]["last_error"] is None:
        assert time.monotonic() < deadline, "no repair sweep reported c"
        time.sleep(0.2)
    unverified = ssl._create_unverified_context()
    assert request(c_port, "GET", "/node", tls=unverified)[1]["keys"] == 0, "c received nothing"
    repair = request(gateway.port, "GET", "/cluster", tls=client)[1]["repair"]
    assert f"127.0.0.1:{c_port}" in repair["last_error"] and "certificate verify failed" in repair["last_error"], repair
    for text in (registry.tail(), gateway.tail()):
        assert SECRET not in text and TOKEN not in text, "secrets never reach the logs"
