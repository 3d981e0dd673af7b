"""What `tgi backends` prints: every discovered plugin, as a table or as JSON.

The CLI owns the command; this module only renders records, so the output can be tested
without running discovery.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from tgi.backend.manager import PluginRecord, PluginStatus, discover

logger = logging.getLogger(__name__)

__all__ = ["backends_json", "backends_table", "discover"]

_AVAILABLE_WORDS = {
    PluginStatus.AVAILABLE: "yes",
    PluginStatus.UNAVAILABLE: "no",
    PluginStatus.BROKEN: "broken",
    PluginStatus.DISABLED: "disabled",
}
_HEADER = ("NAME", "VERSION", "DISTRIBUTION", "AVAILABLE", "BATCHING", "REASON")


def _row(record: PluginRecord) -> tuple[str, ...]:
    available = _AVAILABLE_WORDS[record.status]
    if record.probe is not None and record.probe.emulated:
        available += " (emulated)"
    return (
        record.name,
        record.version or "-",
        record.distribution or record.value,
        available,
        record.probe.batching if record.probe is not None else "-",
        # one line per plugin: a multi-line import error would break the columns
        " ".join(record.reason.split()) or "-",
    )


def backends_table(records: Sequence[PluginRecord]) -> str:
    """A plain-text table, one plugin per line; the last column is never padded."""
    if not records:
        return "no backend plugins installed (entry-point group 'tgi.backends')"
    rows = [_HEADER, *(_row(record) for record in records)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADER) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def backends_json(records: Sequence[PluginRecord]) -> str:
    """A JSON list with one object per plugin (see `PluginRecord.to_json`)."""
    return json.dumps([record.to_json() for record in records], indent=2)
