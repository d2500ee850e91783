"""Fixtures the unit suites share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvd.store import Store
from kvd.testing.cluster import Harness


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """A registry and a gateway on one Clock and in-memory network; the test starts its nodes."""
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def opened() -> Iterator[list[Store]]:
    """Stores a test opened; abandoned (file descriptors closed) at the end."""
    stores: list[Store] = []
    yield stores
    for store in stores:
        if not store._closed:
            store.abandon()
