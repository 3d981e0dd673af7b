"""The core's half of contract v2, by hand, for the CPU backend's tests.

`StepDriver` plays the scheduler: it allocates blocks from a `tgi.router.paging.BlockPool`,
sends a new sequence its whole table and a running one only the blocks appended since,
builds each `StepPlan`, and picks greedy tokens from the logits (accepting drafts the
model confirms, as the speculative scheduler does). Tests get it through the
`make_driver` fixture. `PagedCpuSuite` is the conformance suite on the paged engine, for
the modules that run it (one shard, several).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu.paged import PagedCpuBackend
from tgi_backend_cpu.plugin import ENGINE_ENV

from tgi.backend.contract import Backend, NewSequence, RunningSequence, StepOutput, StepPlan
from tgi.config import snapshot_environ
from tgi.engine.worker.messages import StartWorker
from tgi.router.paging import BlockPool
from tgi.testing import BackendConformance
from tgi.testing.worker import start_worker


@dataclass(slots=True)
class _Seq:
    prompt: list[int]
    in_kv: int = 0  # tokens the backend holds
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_shared: int = 0  # leading blocks borrowed from another sequence
    num_sent: int = 0  # blocks the backend has been told about


class StepDriver:
    """Builds v2 plans for `backend` and keeps what the scheduler would keep."""

    def __init__(self, backend: Backend, num_blocks: int = 4096) -> None:
        self.backend = backend
        self.block_size = backend.capabilities.block_size
        self.pool = BlockPool(num_blocks, self.block_size) if self.block_size else None
        self.seqs: dict[int, _Seq] = {}
        self.outputs: list[StepOutput] = []

    # -- rows ---------------------------------------------------------------------------

    def new(
        self,
        seq_id: int,
        prompt: Sequence[int],
        *,
        end: int | None = None,
        start: int = 0,
        shared_from: int | None = None,
        want_prompt_logits: bool = False,
    ) -> NewSequence:
        """A new sequence computing prompt[start:end] (`end` < len: a first chunk, no
        logits); `shared_from`: borrow that sequence's first start / block_size blocks."""
        seq = self.seqs[seq_id] = _Seq(list(prompt))
        end = len(prompt) if end is None else end
        if shared_from is not None and self.block_size:
            seq.num_shared = start // self.block_size
            seq.blocks = self.seqs[shared_from].blocks[: seq.num_shared]
        self._grow(seq, end)
        seq.num_sent = len(seq.blocks)
        return NewSequence(
            seq_id,
            tuple(prompt[start:end]),
            start_position=start,
            block_ids=tuple(seq.blocks),
            want_logits=end == len(prompt),
            want_prompt_logits=want_prompt_logits,
        )

    def chunk(self, seq_id: int, end: int | None = None) -> RunningSequence:
        """The next chunk of the prompt, up to `end` (default: the rest)."""
        seq = self.seqs[seq_id]
        end = len(seq.prompt) if end is None else end
        self._grow(seq, end)
        return RunningSequence(
            seq_id,
            seq.in_kv,
            tuple(seq.prompt[seq.in_kv : end]),
            new_block_ids=self._appended(seq),
            want_logits=end == len(seq.prompt),
        )

    def decode(self, seq_id: int, drafts: Sequence[int] = ()) -> RunningSequence:
        """A decode row feeding the last generated token, then `drafts`."""
        seq = self.seqs[seq_id]
        self._grow(seq, seq.in_kv + 1 + len(drafts))
        return RunningSequence(
            seq_id,
            seq.in_kv,
            tuple(drafts),
            decode=True,
            last_token=seq.generated[-1],
            new_block_ids=self._appended(seq),
        )

    def resume(self, seq_id: int) -> NewSequence:
        """A preempted sequence back as new: its prompt and generated tokens but the last."""
        seq = self.seqs[seq_id]
        history = seq.prompt + seq.generated[:-1]
        self._grow(seq, len(history))
        seq.num_sent = len(seq.blocks)
        return NewSequence(seq_id, tuple(history), block_ids=tuple(seq.blocks), want_logits=False)

    # -- steps --------------------------------------------------------------------------

    def step(
        self,
        *rows: NewSequence | RunningSequence,
        finished: Sequence[int] = (),
        preempted: Sequence[int] = (),
    ) -> StepOutput:
        """Run one plan of `rows`; take greedy tokens; free finished/preempted blocks."""
        for seq_id in (*finished, *preempted):
            self._free(self.seqs[seq_id])
        plan = StepPlan(
            new=tuple(row for row in rows if isinstance(row, NewSequence)),
            running=tuple(row for row in rows if isinstance(row, RunningSequence)),
            finished=tuple(finished),
            preempted=tuple(preempted),
        )
        out = self.backend.step(plan)
        self.outputs.append(out)
        assert out.seq_ids == tuple(row.seq_id for row in plan.logits_rows)
        assert out.logits is not None
        width = max((row.num_logits for row in plan.logits_rows), default=1)
        assert tuple(out.logits.shape[:2]) == (len(out.seq_ids), width)
        picked = dict(zip(out.seq_ids, out.logits.argmax(dim=-1).tolist(), strict=True))
        for row in plan.rows:
            seq = self.seqs[row.seq_id]
            start = row.start_position
            if isinstance(row, RunningSequence) and row.decode:
                tokens = picked[row.seq_id]
                accepted = 0
                while accepted < len(row.token_ids) and row.token_ids[accepted] == tokens[accepted]:
                    accepted += 1
                seq.generated.extend([*row.token_ids[:accepted], tokens[accepted]])
                seq.in_kv = start + 1 + accepted
                continue
            seq.in_kv = start + len(row.token_ids)
            if row.seq_id in picked:
                seq.generated.append(picked[row.seq_id][0])
        return out

    def release(self, seq_ids: Sequence[int]) -> None:
        self.backend.release(seq_ids)
        for seq_id in seq_ids:
            self._free(self.seqs[seq_id])

    def tokens(self, seq_id: int) -> list[int]:
        return self.seqs[seq_id].generated

    def _grow(self, seq: _Seq, num_tokens: int) -> None:
        if self.pool is not None:
            while len(seq.blocks) * self.pool.block_size < num_tokens:
                seq.blocks.append(self.pool.allocate())

    def _appended(self, seq: _Seq) -> tuple[int, ...]:
        appended = tuple(seq.blocks[seq.num_sent :])
        seq.num_sent = len(seq.blocks)
        return appended

    def _free(self, seq: _Seq) -> None:
        if self.pool is not None:
            for block in seq.blocks[seq.num_shared :]:
                self.pool.release(block)
        seq.blocks, seq.num_shared, seq.num_sent, seq.in_kv = [], 0, 0, 0


@pytest.fixture
def make_driver() -> Callable[..., StepDriver]:
    """`make_driver(backend, num_blocks=4096)`: a fresh `StepDriver`."""
    return StepDriver


_MODELS: dict[Path, Any] = {}


def _reference_model(model_dir: Path) -> Any:
    import transformers

    if model_dir not in _MODELS:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        _MODELS[model_dir] = model.eval()
    return _MODELS[model_dir]


def greedy_reference(model_dir: Path, prompt: Sequence[int], num_new: int) -> list[int]:
    """transformers' greedy continuation of `prompt` (new tokens only, never stopping)."""
    import transformers

    model = _reference_model(model_dir)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            do_sample=False,
            generation_config=transformers.GenerationConfig(pad_token_id=0),
        )
    return [int(t) for t in out[0, len(prompt) :]]


def reference_logits(model_dir: Path, prompt: Sequence[int]) -> torch.Tensor:
    """[n, V] logits of every prompt position from one transformers forward."""
    with torch.inference_mode():
        return _reference_model(model_dir)(torch.tensor([list(prompt)])).logits[0].float()


@pytest.fixture
def reference() -> Any:
    """`reference.greedy(model_dir, prompt, n)`, `reference.logits(model_dir, prompt)`."""

    class Reference:
        greedy = staticmethod(greedy_reference)
        logits = staticmethod(reference_logits)

    return Reference


KV_CACHE_MEMORY = 4 * 2**20  # a fixed pool, so the suites never size from free memory


class PagedCpuSuite(BackendConformance):
    """The conformance suite on the paged CPU engine in float32 (the reference's dtype),
    its `worker` variant built by the plugin with `worker_settings` on top."""

    worker_settings: dict[str, Any] = {}  # more `tgi serve` settings for the worker

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return lambda model_dir: PagedCpuBackend(
            model_dir, dtype=torch.float32, kv_cache_memory=KV_CACHE_MEMORY
        )

    @pytest.fixture(scope="class")
    @classmethod
    def worker_start(cls, model_dir: Path) -> StartWorker:
        environ = {**snapshot_environ(), "TGI_BACKENDS": "cpu", ENGINE_ENV: "paged"}
        settings = {"backend": "cpu", "dtype": "float32", "kv_cache_memory": KV_CACHE_MEMORY}
        return start_worker(model_dir, cls.limits, {**settings, **cls.worker_settings}, environ)
