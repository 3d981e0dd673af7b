"""What the server process itself costs, for /info: resident memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["resident_memory_bytes"]

_STATM = Path("/proc/self/statm")


def resident_memory_bytes() -> int:
    """Resident set size now; where /proc is missing, the peak instead (getrusage)."""
    try:
        pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        # ru_maxrss is in KiB on Linux (bytes on macOS, where /proc is missing anyway)
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return pages * os.sysconf("SC_PAGE_SIZE")
