"""kvd.testing.processes itself: fixed ports taken on this machine never stop a test, nor skip it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import kvd.testing.processes as processes_module
from kvd.testing.processes import ProcessError, Processes, free_port, private_network_for, private_network_unavailable

pytestmark = pytest.mark.timeout(60)


@contextmanager
def listening(port: int) -> Iterator[socket.socket]:
    """Something else listening on 127.0.0.1:port in this (the host's) network namespace."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield s


def test_a_process_in_a_private_network_listens_on_a_port_taken_here(processes: Processes) -> None:
    why = private_network_unavailable()
    if why is not None:
        pytest.skip(f"no private network namespace here: {why}")
    port = free_port()
    with listening(port):
        assert private_network_for(port)
        node = processes.node("a", port, private_network=True).start()
        with node.network():
            assert processes_module.request(port, "GET", "/healthz")[0] == 200
        assert os.stat(f"/proc/{node.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


def test_without_a_private_network_a_taken_port_is_an_error_that_names_its_holder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(processes_module, "private_network_unavailable", lambda: "not here")
    port = free_port()
    assert private_network_for(port) is False
    with listening(port), pytest.raises(ProcessError) as raised:
        private_network_for(port)
    message = str(raised.value)
    assert f"{port} held by" in message and f"pid {os.getpid()}" in message and "not here" in message
