"""
Which kvd a benchmark measures: the installed one, or else the checkout bench/ lives in
(put on the path here and in child processes), and the commit it comes from.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def ensure_kvd_importable() -> str:
    """
    Make ``import kvd`` work here and in child processes; return where kvd comes from.

    kvd installed (``pip install .``) or on PYTHONPATH is used as it is; otherwise the
    checkout this script lives in is put on the path (here and in PYTHONPATH for children).
    """
    try:
        import kvd
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        import kvd
    return str(Path(kvd.__file__).resolve().parent)


def code_version(kvd_dir: str) -> str:
    """The git commit of the checkout kvd is imported from, and whether kvd/ differs from it."""
    root = Path(kvd_dir).parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "kvd", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "not a git checkout"
    if not commit:
        return "not a git checkout (installed copy?)"
    return f"commit {commit}" + (" + uncommitted changes in kvd/" if dirty else "")
