"""What the file system charges a writer per file, in a given folder (issue 22, item 1).

Stage one's writer creates one file per array and block (and a folder per block for arrays
laid out `c/B/0`), so on a file system where creating a file is slow the writer's rate is set
by that, not by the pipeline. This prints, for each folder given, microseconds (wall and CPU)
per operation of:
  create   an empty file (O_CREAT | O_EXCL | O_NOFOLLOW) in one folder;
  rename   it into place (os.replace), as the chunk writer does;
  mkdir    a folder;
  chunk    a folder per block and a file in it, as a Zarr chunk `c/B/0` lands;
  write    a 2 MB file (create, write, close): MB/s.

    python benchmarks/file_costs.py /var/tmp /dev/shm [--files 1000]

Run it beside `stage_one_writer.py` (with TMPDIR set to the same folders) to tell a slow
writer from a slow file system.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable

FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


def timed(n: int, step: Callable[[int], None]) -> tuple[float, float]:
    """(wall us, CPU us) per call of step(i) for i < n."""
    t, c = time.perf_counter(), time.process_time()
    for i in range(n):
        step(i)
    return (time.perf_counter() - t) / n * 1e6, (time.process_time() - c) / n * 1e6


def touch(path: str, data: bytes = b"") -> None:
    fd = os.open(path, FLAGS, 0o644)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def measure(base: str, n: int) -> None:
    d = tempfile.mkdtemp(dir=base, prefix="file_costs_")
    try:
        os.mkdir(f"{d}/c")
        rows = {
            "create": timed(n, lambda i: touch(f"{d}/f{i}.partial")),
            "rename": timed(n, lambda i: os.replace(f"{d}/f{i}.partial", f"{d}/f{i}")),
            "mkdir": timed(n, lambda i: os.mkdir(f"{d}/d{i}")),
            "chunk": timed(n, lambda i: (os.mkdir(f"{d}/c/{i}"), touch(f"{d}/c/{i}/0"))),
        }
        blob = os.urandom(2_000_000)
        wall, cpu = timed(max(n // 10, 1), lambda i: touch(f"{d}/w{i}", blob))
        print(f"{base}: " + ", ".join(f"{k} {w:,.1f} us (CPU {c:,.1f})"
                                      for k, (w, c) in rows.items())
              + f", write {len(blob) / wall:,.0f} MB/s (CPU {len(blob) / cpu:,.0f})")
    finally:
        shutil.rmtree(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+")
    p.add_argument("--files", type=int, default=1000, help="operations of each kind")
    args = p.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}")
    for base in args.folders:
        measure(base, args.files)


if __name__ == "__main__":
    main()
