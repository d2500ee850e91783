"""Pinning a server and its load generator to separate cores (taskset), when the machine allows it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any


def can_pin() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """C{argv} run on core C{cpu} (all its threads) when C{cpu} is given."""
    if cpu is None:
        return list(argv)
    return ["taskset", "-c", str(cpu), *argv]


def add_pin_arguments(parser: Any) -> None:
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the server to core 0 and wrk to core 1 with taskset (pinned by default when possible)",
    )


def pin_cores(args: Any) -> tuple[int | None, int | None]:
    """(server core, wrk core), or (None, None) when not pinning."""
    if args.no_pin or not can_pin():
        return None, None
    return 0, 1
