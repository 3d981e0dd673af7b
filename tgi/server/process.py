"""What the server's processes cost, for /info: resident memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["resident_memory_bytes"]


def resident_memory_bytes(pid: int | None = None) -> int | None:
    """Resident set size of this process (or `pid`) now; for this process where /proc
    is missing, the peak instead (getrusage); None for another process without /proc."""
    statm = Path(f"/proc/{pid}/statm" if pid is not None else "/proc/self/statm")
    try:
        pages = int(statm.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        if pid is not None:
            return None
        # ru_maxrss is in KiB on Linux (bytes on macOS, where /proc is missing anyway)
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return pages * os.sysconf("SC_PAGE_SIZE")
