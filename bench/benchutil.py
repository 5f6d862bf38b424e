"""What the benchmarks share (imported from the scripts beside it)."""

from __future__ import annotations

import os
from pathlib import Path


def drop_page_cache() -> bool:
    """Write back and drop the clean page cache, so that every run starts with free memory; False without root.

    On the development VM, writes into a page cache that first had to evict gigabytes of other files cost 2-3x the
    CPU and made the same run vary by 2x (docs/benchmarks.md, S3 section)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1")
    except OSError:
        return False
    return True


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (its threads included), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15 of stat)
