"""The backend contract (v2), its plugin hooks and the plugin manager."""

from tgi.backend.contract import (
    CONTRACT_VERSION,
    Backend,
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    NewSequence,
    RunningSequence,
    StepConstraints,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.backend.hookspecs import BackendProbe, hookimpl

__all__ = [
    "CONTRACT_VERSION",
    "Backend",
    "BackendProbe",
    "Batching",
    "Capabilities",
    "KVCapacity",
    "KVUsage",
    "KvLayout",
    "Limits",
    "NewSequence",
    "RunningSequence",
    "StepConstraints",
    "StepOutput",
    "StepPlan",
    "WarmupReport",
    "hookimpl",
]
