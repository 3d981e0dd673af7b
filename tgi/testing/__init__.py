"""Public test helpers for tgi and its backend plugins: tiny models, conformance suite.

The conformance names load lazily so `import tgi.testing` does not pull in pytest.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BackendConformance", "Driver", "ReferenceModel", "make_prompt"]

_CONFORMANCE = frozenset(__all__)


def __getattr__(name: str) -> Any:
    if name in _CONFORMANCE:
        from tgi.testing import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module 'tgi.testing' has no attribute {name!r}")
