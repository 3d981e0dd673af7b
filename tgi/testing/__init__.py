"""Public test helpers for tgi and its backend plugins: tiny models, fake backends, the
conformance suite and its `Driver`.

The conformance names load lazily so `import tgi.testing` does not pull in pytest.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SUITE_LIMITS",
    "BackendConformance",
    "Driver",
    "FakeBackend",
    "FakeDeviceSamplingBackend",
    "FakePagedBackend",
    "ReferenceModel",
    "make_prompt",
]

_LAZY = {
    "SUITE_LIMITS": "tgi.testing.conformance",
    "BackendConformance": "tgi.testing.conformance",
    "Driver": "tgi.testing.driver",
    "FakeBackend": "tgi.testing.fake_backend",
    "FakeDeviceSamplingBackend": "tgi.testing.fake_backend",
    "FakePagedBackend": "tgi.testing.fake_backend",
    "ReferenceModel": "tgi.testing.reference",
    "make_prompt": "tgi.testing.reference",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tgi.testing' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
