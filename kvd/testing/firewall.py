"""
Network partitions between real processes on loopback, with iptables, for the integration
suite and bench/faults.py.

Every rule goes in one chain of its own (``KVD-TEST-<pid>`` by default), jumped to from
OUTPUT, so cleaning up is one unlink, flush and delete however many rules were added. On
loopback every process is 127.0.0.1, so a cut is by port: dropping TCP packets sent to a
node's port cuts off everyone who calls the node (a gateway) while the node still calls out
(its lease renewals to the registry go to the registry's port).

It blocks (subprocess) and imports no test framework, like L{kvd.testing.processes}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType


def iptables_unavailable() -> str | None:
    """Why iptables rules cannot be added here, or None when they can."""
    if shutil.which("iptables") is None:
        return "no iptables binary on PATH (apt-get install iptables)"
    if os.geteuid() != 0:
        return "not root: iptables needs CAP_NET_ADMIN"
    chain = f"KVD-PROBE-{os.getpid()}"
    try:
        done = subprocess.run(["iptables", "-w", "-N", chain], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"iptables failed: {e}"
    if done.returncode != 0:
        return f"iptables -N failed: {done.stderr.strip() or done.returncode}"
    subprocess.run(["iptables", "-w", "-X", chain], capture_output=True, timeout=10)
    return None


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["iptables", "-w", *args], capture_output=True, text=True, timeout=10)
    if check and done.returncode != 0:
        raise RuntimeError(f"iptables {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


class Firewall:
    """
    A chain of DROP rules by destination port, jumped to from OUTPUT while open; as a context
    manager, removed on exit whatever happened.
    """

    def __init__(self, chain: str | None = None) -> None:
        self.chain = chain or f"KVD-TEST-{os.getpid()}"
        self.open = False

    def start(self) -> Firewall:
        self.remove()  # a chain left by a crashed run with this pid
        _iptables("-N", self.chain)
        _iptables("-I", "OUTPUT", "-j", self.chain)
        self.open = True
        return self

    def cut(self, port: int) -> None:
        """Drop every TCP packet sent to 127.0.0.1:port (new connections and kept-alive ones)."""
        _iptables("-A", self.chain, "-p", "tcp", "-d", "127.0.0.1", "--dport", str(port), "-j", "DROP")

    def heal(self) -> None:
        """Remove every cut (the chain stays)."""
        _iptables("-F", self.chain)

    def rules(self) -> str:
        return _iptables("-S", self.chain, check=False).stdout

    def remove(self) -> None:
        """Unlink, flush and delete the chain; nothing if it is not there."""
        while _iptables("-D", "OUTPUT", "-j", self.chain, check=False).returncode == 0:
            pass
        _iptables("-F", self.chain, check=False)
        _iptables("-X", self.chain, check=False)
        self.open = False

    def __enter__(self) -> Firewall:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()


__all__ = ["Firewall", "iptables_unavailable"]
