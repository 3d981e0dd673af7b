"""The backend contract, its plugin hooks and the plugin manager."""

from tgi.backend.contract import (
    Backend,
    Batching,
    Capabilities,
    DecodeBatch,
    DecodeRow,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    PrefillBatch,
    PrefillRow,
    StepOutput,
)
from tgi.backend.hookspecs import BackendProbe, hookimpl

__all__ = [
    "Backend",
    "BackendProbe",
    "Batching",
    "Capabilities",
    "DecodeBatch",
    "DecodeRow",
    "KVCapacity",
    "KVUsage",
    "KvLayout",
    "Limits",
    "PrefillBatch",
    "PrefillRow",
    "StepOutput",
    "hookimpl",
]
