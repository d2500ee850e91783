"""
Issue 8's "Done when", shown on real ``twistd kvd`` processes.

- A fake node answering every internal call with malformed chunked framing (a negative
  chunk size, a non-hex one, chunk data without its CRLF) or with a well-framed answer that
  is not JSON leaves the gateway serving /healthz at once, the request that met it gets a
  503 naming the node, well within the gateway's --timeout, and /cluster shows it unreachable.
- A value of --max-value-bytes bytes, of control characters (JSON escapes each into six
  bytes), written through the gateway reads back through it, exactly.
- Without --access-log, a loop of 404s (GETs and DELETEs of absent keys) writes no log line.
- HTTP/1.0 clients asking ``Connection: Keep-Alive`` (``ab -k``) keep their connection.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvd.testing.processes import Kvd, Processes, http_request, request

from .test_cluster_processes import eventually

pytestmark = pytest.mark.timeout(180)

#: The gateway's --timeout in the fake-node tests: an answer must come well before it.
GATEWAY_TIMEOUT = 10.0


# --- a fake node answering garbage ------------------------------------------------------------


class FakeNode:
    """
    A server thread on 127.0.0.1 answering every request it receives with C{answer} and then
    keeping the connection open (never closing it itself), counting the requests it was asked.
    """

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.asked = 0
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fake-node", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection.settimeout(0.1)
            self.connections.append(connection)
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        buffered = b""
        while not self.stopping.is_set():
            try:
                data = connection.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                # The gateway closed it; the fake never does.
                return
            buffered += data
            # One answer per request head received (bodies carry no blank line of their own here).
            while b"\r\n\r\n" in buffered:
                _, _, buffered = buffered.partition(b"\r\n\r\n")
                self.asked += 1
                try:
                    connection.sendall(self.answer)
                except OSError:
                    return

    def __enter__(self) -> FakeNode:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.listener.close()
        self.thread.join(5)
        for connection in self.connections:
            connection.close()


MALFORMED = {
    "negative size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nabcdef\r\n0\r\n\r\n",
    "non-hex size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabcdef\r\n0\r\n\r\n",
    "missing CRLF": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdefXY0\r\n\r\n",
    # Well framed, but no kvd node's JSON, to /internal/ calls and /healthz probes alike.
    "not JSON": b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 14\r\n\r\n<html>no</html",
}


@pytest.fixture(params=sorted(MALFORMED))
def fake(request: pytest.FixtureRequest) -> Iterator[FakeNode]:
    with FakeNode(MALFORMED[request.param]) as node:
        yield node


def timed(port: int, method: str, path: str, body: bytes | None = None) -> tuple[float, int, dict[str, object]]:
    started = time.monotonic()
    status, answer = request(port, method, path, body, timeout=GATEWAY_TIMEOUT * 2)
    return time.monotonic() - started, status, answer


def test_a_node_answering_malformed_chunks_gets_a_503_naming_it_and_healthz_stays_quick(
    processes: Processes, fake: FakeNode
) -> None:
    gateway = processes.gateway(
        "--node",
        f"fake={fake.url}",
        "--replicas",
        "1",
        "--read-quorum",
        "1",
        "--write-quorum",
        "1",
        "--timeout",
        str(GATEWAY_TIMEOUT),
        "--repair-interval",
        "0.2",
    ).start()
    assert gateway.port is not None
    outcomes: dict[str, tuple[float, int, dict[str, object]]] = {}

    def ask() -> None:
        outcomes["GET"] = timed(gateway.port, "GET", "/kv/x")
        outcomes["PUT"] = timed(gateway.port, "PUT", "/kv/x", b"v")
        outcomes["DELETE"] = timed(gateway.port, "DELETE", "/kv/x")

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    # While the gateway is asking the fake (and its repair sweep asks it every 0.2 s), it answers /healthz at once.
    health = []
    until = time.monotonic() + 1.0
    while asking.is_alive() or time.monotonic() < until:
        started = time.monotonic()
        status = http_request(gateway.port, "GET", "/healthz", timeout=5).status
        health.append((time.monotonic() - started, status))
        time.sleep(0.02)
    asking.join()
    # The three requests, and repair sweeps asking for digests.
    assert fake.asked > 3, fake.asked
    assert all(status == 200 for _, status in health), health
    assert max(seconds for seconds, _ in health) < 1.0, health
    for method, (seconds, status, answer) in outcomes.items():
        assert status == 503, (method, status, answer)
        error = str(answer["error"])
        assert "fake" in error or fake.url in error, (method, error)
        assert seconds < GATEWAY_TIMEOUT / 4, (method, seconds, error)
    # And it still answers once the fake has been met many times.
    assert http_request(gateway.port, "GET", "/healthz", timeout=1).status == 200
    # /cluster says the gateway cannot use it, and goes on saying so while its probes get garbage.
    for _ in range(2):
        status, cluster = request(gateway.port, "GET", "/cluster")
        assert status == 200 and [(n["id"], n["reachable"]) for n in cluster["nodes"]] == [("fake", False)], cluster
        time.sleep(1.0)


# --- limits follow --max-value-bytes -----------------------------------------------------------


def one_node_behind_a_gateway(processes: Processes, *options: str) -> tuple[Kvd, Kvd]:
    node = processes.node("a", None, *options).start()
    gateway = processes.gateway(
        "--node",
        f"a={node.url}",
        "--replicas",
        "1",
        "--read-quorum",
        "1",
        "--write-quorum",
        "1",
        *options,
    ).start()
    return node, gateway


def put_and_read_back(gateway: Kvd, value: bytes) -> tuple[float, float]:
    assert gateway.port is not None
    started = time.monotonic()
    put = http_request(gateway.port, "PUT", "/kv/big", value, timeout=120)
    wrote = time.monotonic() - started
    assert put.status == 200, put.body[:300]
    got = http_request(gateway.port, "GET", "/kv/big", timeout=120)
    read = time.monotonic() - started - wrote
    assert got.status == 200, got.body[:300]
    assert got.json()["value"].encode() == value
    return wrote, read


def test_a_value_of_max_value_bytes_escaped_sixfold_reads_back_through_the_gateway(processes: Processes) -> None:
    size = 3_000_000
    node, gateway = one_node_behind_a_gateway(processes, "--max-value-bytes", str(size))
    put_and_read_back(gateway, b"\x01" * size)
    # One byte more is refused from its Content-Length, before the body is sent, at the gateway as at the node.
    for process in (gateway, node):
        assert process.port is not None
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as connection:
            connection.sendall(f"PUT /kv/over HTTP/1.1\r\nHost: x\r\nContent-Length: {size + 1}\r\n\r\n".encode())
            status, _, body, _ = read_answer(connection, b"")
        assert status == 413, (process.name, body)


@pytest.mark.timeout(240)
def test_a_20_mb_value_reads_back_through_the_gateway(processes: Processes, capsys: pytest.CaptureFixture[str]) -> None:
    size = 20_000_000
    node, gateway = one_node_behind_a_gateway(processes, "--max-value-bytes", str(size))
    wrote, read = put_and_read_back(gateway, b"\x01" * size)
    with capsys.disabled():
        print(f"\n20 MB of control characters through the gateway: PUT {wrote:.2f} s, GET {read:.2f} s")
    assert wrote + read < 60


# --- 404s are not log events -------------------------------------------------------------------


def log_lines(process: Kvd) -> list[str]:
    return process.log.read_text(errors="replace").splitlines()


def test_a_loop_of_404s_writes_no_log_line_without_access_log(processes: Processes) -> None:
    node, gateway = one_node_behind_a_gateway(processes)
    assert node.port is not None and gateway.port is not None
    time.sleep(0.5)
    before = {p.name: len(log_lines(p)) for p in (node, gateway)}
    for port in (gateway.port, node.port):
        # 1,000 reads and 100 deletions of absent keys, and 50 requests that are bad (a key that is empty).
        absent = {http_request(port, "GET", f"/kv/absent-{i}").status for i in range(1000)}
        absent |= {http_request(port, "DELETE", f"/kv/absent-{i}").status for i in range(100)}
        assert absent == {404}
        bad = {http_request(port, "PUT", "/kv/", b"v").status for _ in range(50)}
        assert bad <= {400, 404, 405}, bad
    time.sleep(0.5)
    for process in (node, gateway):
        new = log_lines(process)[before[process.name] :]
        # No line at all, periodic or not: with static members there is no heartbeat, and a repair
        # sweep with nothing to do and the gateway's connections to the node log nothing.
        assert new == [], (process.name, len(new), new[:5])


def test_with_access_log_every_request_is_logged(processes: Processes) -> None:
    """The same loop with --access-log does log (the check above can see log lines)."""
    node = processes.node("a", None, "--access-log").start()
    assert node.port is not None
    before = len(log_lines(node))
    for i in range(20):
        assert http_request(node.port, "GET", f"/kv/absent-{i}").status == 404

    def logged() -> bool:
        return sum("absent" in line for line in log_lines(node)[before:]) >= 20

    eventually(logged, seconds=10, what="20 access log lines")


# --- HTTP/1.0 keep-alive -----------------------------------------------------------------------


def read_answer(connection: socket.socket, buffered: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """One answer with a Content-Length from C{connection}: status, headers, body, what is left over."""
    while b"\r\n\r\n" not in buffered:
        data = connection.recv(65536)
        assert data, f"closed before an answer: {buffered!r}"
        buffered += data
    head, _, buffered = buffered.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    length = int(headers["content-length"])
    while len(buffered) < length:
        data = connection.recv(65536)
        assert data, "closed mid-body"
        buffered += data
    return int(status_line.split()[1]), headers, buffered[:length], buffered[length:]


def keep_alive_over_one_socket(port: int, count: int) -> list[int]:
    statuses = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        buffered = b""
        for i in range(count):
            path = "/kv/ka" if i % 2 else f"/kv/absent-{i}"
            connection.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: Keep-Alive\r\n\r\n".encode())
            status, headers, _, buffered = read_answer(connection, buffered)
            assert headers.get("connection", "").lower() == "keep-alive", headers
            statuses.append(status)
        # Without Keep-Alive, HTTP/1.0 still closes after the answer.
        connection.sendall(b"GET /kv/ka HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, _, buffered = read_answer(connection, buffered)
        statuses.append(status)
        assert connection.recv(1) == b""
    return statuses


def test_http_10_keep_alive_keeps_the_connection(processes: Processes) -> None:
    node, gateway = one_node_behind_a_gateway(processes)
    for process in (node, gateway):
        assert process.port is not None
        assert request(process.port, "PUT", "/kv/ka", b"v")[0] == 200
        assert keep_alive_over_one_socket(process.port, 10) == [404, 200] * 5 + [200]


@pytest.mark.skipif(shutil.which("ab") is None, reason="ab (apache2-utils) is not installed")
def test_ab_k_keeps_its_connections(processes: Processes, tmp_path: Path) -> None:
    node, gateway = one_node_behind_a_gateway(processes)
    for process in (node, gateway):
        assert process.port is not None
        assert request(process.port, "PUT", "/kv/ka", b"v")[0] == 200
        done = subprocess.run(
            ["ab", "-k", "-n", "200", "-c", "4", f"http://127.0.0.1:{process.port}/kv/ka"],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr
        assert re.search(r"Keep-Alive requests:\s+200\b", done.stdout), done.stdout
        assert re.search(r"Failed requests:\s+0\b", done.stdout), done.stdout
