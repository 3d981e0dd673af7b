"""The paged model runner: contract-v2 steps over `tgi.models` and a paged KV pool.

Device-neutral: it imports torch and `tgi.models`, never a device library. A backend
plugs in what differs by device through `RunnerDevice` and `AttentionBackend`
(`tgi.runner._device`): the CPU backend supplies dense-row SDPA, a CUDA one would supply
a paged kernel, and both reuse the block tables, the step layout and the step logic here.
"""

from tgi.runner._backend import RunnerBackend
from tgi.runner._device import AttentionBackend, ModelForward, RunnerDevice
from tgi.runner._kv import BlockTables, KvPool
from tgi.runner._layout import StepLayout, StepRows, build_step
from tgi.runner._runner import DEFAULT_BLOCK_SIZE, WARMUP_MAX_TOKENS, PagedModelRunner

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "WARMUP_MAX_TOKENS",
    "AttentionBackend",
    "BlockTables",
    "KvPool",
    "ModelForward",
    "PagedModelRunner",
    "RunnerBackend",
    "RunnerDevice",
    "StepLayout",
    "StepRows",
    "build_step",
]
