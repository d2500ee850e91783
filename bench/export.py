"""
Export and import on a real cluster (3 nodes, N=3, a gateway; each its own process): load
KEYS keys with POST /import, export them with GET /export, and import the export again;
the rate of each (keys/s) and the gateway's resident memory (VmRSS) before, during (the
highest sampled) and after. Nodes run with --fsync never, to load fast (the figure is the
gateway's and the pipeline's, not the disk's). Prints figures; never fails.

    python bench/export.py --keys 1000000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from checkout import ensure_kvd_importable
from servers import bench_processes

ensure_kvd_importable()

import kvd  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler:
    """The highest VmRSS of a process while a ``with`` block runs (sampled every 50 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kib(self.pid))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def lines(keys: int, version_base: int) -> Iterator[bytes]:
    for i in range(keys):
        version = f"{version_base:012x}{i % 0xFFFFFF:06x}.bench"
        entry = {"key": f"user/{i:08d}", "value": f"value-{i:08d}-" + "x" * 40, "version": version}
        yield json.dumps(entry).encode() + b"\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, bench_processes(Path(tmp)) as processes:
        cluster = processes.cluster(node_options=("--fsync", "never"), gateway_options=("--timeout", "10"))
        pid, url = cluster.gateway.pid, cluster.gateway.url
        base = int((time.time() - 3600) * 1000)
        client = kvd.Client(url, timeout=3600)
        print(f"{args.keys} keys of ~70 bytes a line, 3 nodes N=3 W=2, nodes --fsync never")
        idle = rss_kib(pid)
        for what in ("import (load)", "export", "import (again)"):
            before = rss_kib(pid)
            started = time.monotonic()
            with Sampler(pid) as sampler:
                if what == "export":
                    backup = Path(tmp) / "backup.ndjson"
                    count = 0
                    with backup.open("wb") as out:
                        for entry in client.export():
                            out.write(kvd.clients.entry_line(entry))
                            count += 1
                    result = {"exported": count}
                elif what == "import (load)":
                    result = client.import_lines(lines(args.keys, base))
                else:
                    result = client.import_lines(backup.open("rb"))
            seconds = time.monotonic() - started
            done = result.get("exported", result.get("imported", 0))
            print(
                f"{what:15} {done:>9} keys in {seconds:6.1f} s = {done / seconds:8.0f} keys/s; gateway VmRSS "
                f"before {before / 1024:.0f} MiB, peak {sampler.peak / 1024:.0f} MiB, "
                f"after {rss_kib(pid) / 1024:.0f} MiB"
                f" { ({k: v for k, v in result.items() if k in ('skipped', 'failed')}) }"
            )
        print(f"gateway VmRSS idle before loading: {idle / 1024:.0f} MiB")
        client.close()


if __name__ == "__main__":
    main()
