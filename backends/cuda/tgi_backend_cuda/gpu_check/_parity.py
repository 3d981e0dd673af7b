"""Stage 3: greedy tokens of the CUDA backend against transformers `generate()`, same GPU.

A random-weight model of SmolLM2-135M's shape (the tiny shape in the dry run) is saved
once; each attention kind the device offers loads it through `CudaBackend.from_path` and
runs `tgi.testing.ranks.greedy_steps` (one prompt alone, then all of them in one mixed
batch), and each prompt's tokens are compared with transformers' on the same weights.

NOTE: float32 must match token for token. In bfloat16, two correct implementations
differ in rounding, so a random model's near-ties flip: the report gives the first
divergence and transformers' top-1 minus top-2 logit there, for a person to judge.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tgi_backend_cuda.gpu_check._record import Mode, describe_device, error_text, write_json
from tgi_backend_cuda.gpu_check._shapes import SMOLLM2_135M, TINY, Shape, hf_config

__all__ = ["ATTENTION_KINDS", "run_parity"]

logger = logging.getLogger(__name__)

ATTENTION_KINDS = ("flashinfer", "triton", "sdpa")
# greedy_steps' limits: prompts of at most 64 tokens, 256 prompt tokens in all, and
# prompt + new tokens within 128; mixed lengths make the batch ragged
PROMPT_LENGTHS = (24, 7, 64, 40)
MAX_NEW_TOKENS = 32
DRY_RUN_MAX_NEW_TOKENS = 8
# decode graphs for the batch sizes greedy_steps runs (1 and 4 rows, 3 padded to 4), not
# the serving default's 19 sizes: the replay path is checked at a tenth of the warmup
GRAPH_SIZES = (1, 2, 4)


@dataclass(slots=True)
class RowParity:
    """One prompt of the mixed batch against transformers."""

    prompt_tokens: int
    match: bool
    first_divergence: int | None  # index of the first new token that differs
    margin: float | None  # transformers' top-1 minus top-2 logit at that index
    first_step_max_abs_diff: float  # |tgi - transformers| over the first step's logits
    tgi: list[int]
    transformers: list[int]


@dataclass(slots=True)
class ParityRun:
    """One (dtype, attention) pair."""

    dtype: str
    attention: str
    status: str  # ok | diverged | failed | not run: <why>
    match: bool | None = None  # every prompt's tokens equal transformers'
    alone_match: bool | None = None  # the first prompt alone equals it in the batch
    matmul_precision: str | None = None  # torch's float32 matmul precision afterwards
    seconds: float = 0.0
    error: str | None = None
    rows: list[RowParity] = field(default_factory=list)


@dataclass(slots=True)
class ParityReport:
    """stage3-parity.json."""

    environment: dict[str, Any]
    shape: str
    prompt_lengths: list[int]
    max_new_tokens: int
    cuda_graphs: list[int]
    runs: list[ParityRun] = field(default_factory=list)
    fp32_exact: bool | None = None  # every float32 run that ran matched; None: none ran

    def add(self, run: ParityRun) -> None:
        self.runs.append(run)
        ran = [r for r in self.runs if r.dtype == "float32" and r.match is not None]
        self.fp32_exact = all(r.match for r in ran) if ran else None


@dataclass(frozen=True, slots=True)
class _Reference:
    tokens: list[int]
    logits: torch.Tensor  # [T, V] float32 on the host, one row per new token


def run_parity(mode: Mode) -> ParityReport:
    """Run every (dtype, attention) pair; rewrite stage3-parity.json after each one."""
    from transformers.utils import logging as hf_logging

    from tgi.testing.reference import make_prompt
    from tgi_backend_cuda.attention import available_attention

    hf_logging.disable_progress_bar()  # log.txt is read in a 12,000-character tail
    # transformers' float32 reference must not run on TF32 matmuls
    torch.set_float32_matmul_precision("highest")
    shape = TINY if mode.dry_run else SMOLLM2_135M
    dtypes = (torch.float32,) if mode.dry_run else (torch.float32, torch.bfloat16)
    max_new = DRY_RUN_MAX_NEW_TOKENS if mode.dry_run else MAX_NEW_TOKENS
    report = ParityReport(
        describe_device(mode.device),
        shape.name,
        list(PROMPT_LENGTHS),
        max_new,
        list(GRAPH_SIZES),
    )

    def record(run: ParityRun) -> None:
        report.add(run)
        write_json(mode.out / "stage3-parity.json", report)
        logger.info("stage 3: %s %s: %s", run.dtype, run.attention, run.status)

    vocab = int(shape.config["vocab_size"])
    prompts = [make_prompt(seed, n, vocab) for seed, n in enumerate(PROMPT_LENGTHS)]
    available = available_attention(str(mode.device))
    with tempfile.TemporaryDirectory() as scratch:
        for dtype in dtypes:
            name = str(dtype).removeprefix("torch.")
            try:
                model_dir = _save_random_checkpoint(shape, Path(scratch), mode.device)
                references = _reference(model_dir, dtype, mode.device, prompts, max_new)
            except Exception as exc:  # recorded: the next dtype still runs
                for attention in ATTENTION_KINDS:
                    record(ParityRun(name, attention, "failed", error=error_text(exc)))
                continue
            for attention in ATTENTION_KINDS:
                if attention not in available:
                    record(ParityRun(name, attention, f"not run: {_why_not(attention, mode)}"))
                    continue
                record(_run_one(model_dir, mode, dtype, attention, prompts, references))
    return report


def _why_not(attention: str, mode: Mode) -> str:
    if attention == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        return "flashinfer-python not installed"
    return f"not available on {mode.device.type}"


def _save_random_checkpoint(shape: Shape, scratch: Path, device: torch.device) -> Path:
    """A random model of `shape` built on `device`, saved as a hub checkpoint would be.

    bfloat16 on disk (half the bytes to write and read); float32 runs load the same
    values widened, so both dtypes and both implementations share one set of weights.
    """
    from transformers import AutoModelForCausalLM

    model_dir = scratch / shape.name
    if (model_dir / "model.safetensors").exists():  # saved for the previous dtype
        return model_dir
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    _free(device)
    return model_dir


def _reference(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
) -> list[_Reference]:
    """transformers' greedy tokens and raw logits for each prompt, one at a time."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    references = []
    with torch.inference_mode():
        for prompt in prompts:
            input_ids = torch.tensor([list(prompt)], device=device)  # [1, n]
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                pad_token_id=0,
                output_logits=True,
                return_dict_in_generate=True,
            )
            tokens = [int(t) for t in out.sequences[0, len(prompt) :]]
            logits = torch.cat(out.logits).float().cpu()  # [T, V]
            references.append(_Reference(tokens, logits))
    del model
    _free(device)
    return references


def _run_one(
    model_dir: Path,
    mode: Mode,
    dtype: torch.dtype,
    attention: str,
    prompts: Sequence[Sequence[int]],
    references: Sequence[_Reference],
) -> ParityRun:
    """Load the backend with one attention kind, decode greedily, compare."""
    from tgi.testing.ranks import greedy_steps
    from tgi_backend_cuda.backend import CudaBackend

    run = ParityRun(str(dtype).removeprefix("torch."), attention, "failed")
    started = time.monotonic()
    backend: Any = None
    try:
        backend = CudaBackend.from_path(
            model_dir,
            device=str(mode.device),
            dtype=dtype,
            attention=attention,
            cuda_graphs=GRAPH_SIZES,
        )
        greedy = greedy_steps(backend, prompts, references[0].logits.shape[0])
        run.rows = [
            _compare(len(prompt), tokens, ref, greedy.first_logits[i])
            for i, (prompt, tokens, ref) in enumerate(
                zip(prompts, greedy.tokens, references, strict=True)
            )
        ]
        run.match = all(row.match for row in run.rows)
        run.alone_match = greedy.alone == greedy.tokens[0]
        run.status = "ok" if run.match and run.alone_match else "diverged"
    except Exception as exc:  # recorded: the next attention kind still runs
        run.error = error_text(exc)
    finally:
        if backend is not None:
            backend.close()
        del backend
        _free(mode.device)
    run.matmul_precision = torch.get_float32_matmul_precision()
    run.seconds = time.monotonic() - started
    return run


def _compare(
    prompt_tokens: int, tokens: list[int], reference: _Reference, first_logits: torch.Tensor
) -> RowParity:
    diverged = next(
        (i for i, (a, b) in enumerate(zip(tokens, reference.tokens, strict=False)) if a != b), None
    )
    if diverged is None and len(tokens) != len(reference.tokens):
        diverged = min(len(tokens), len(reference.tokens))
    margin = None
    if diverged is not None and diverged < reference.logits.shape[0]:
        top2 = reference.logits[diverged].topk(2).values
        margin = float(top2[0] - top2[1])
    first_diff = (first_logits.float().cpu() - reference.logits[0]).abs().max()
    return RowParity(
        prompt_tokens,
        diverged is None,
        diverged,
        margin,
        float(first_diff),
        tokens,
        reference.tokens,
    )


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
