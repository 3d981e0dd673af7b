"""Stage 4: decode tokens/s of the CUDA backend against transformers `generate()`.

Llama-shaped random bf16 models (1B and 8B shapes; the tiny shape in the dry run) are
built on the device without files. For each number of streams, tgi prefills that many
prompts through the contract (`StepPlan.new`, in chunks) and times decode steps of all
rows (`RunningSequence` decode rows, a block appended at each block boundary), taking
each step's greedy tokens to the host as the engine does; then the same through the
engine core, in turn and overlapped (what keeping sampled ids on the device between
steps buys). transformers' decode time is
`generate()` of `steps + 1` tokens minus `generate()` of one (its prefill), same prompts.

The HBM roof is measured in the same run: a device-to-device copy, bytes read plus
written, and the batch-1 roof of a shape is that bandwidth over the weight bytes one
decode step reads. `stage4-bench.json` and `.md` are rewritten after every measurement.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tgi.backend.contract import Limits, NewSequence, RunningSequence, StepOutput, StepPlan
from tgi_backend_cuda.gpu_check._record import (
    Mode,
    describe_device,
    error_text,
    write_json,
    write_text,
)
from tgi_backend_cuda.gpu_check._shapes import BENCH_SHAPES, Shape, hf_config, random_tgi_model

__all__ = ["BenchSettings", "run_bench"]

logger = logging.getLogger(__name__)

_PREFILL_CHUNK_TOKENS = 4096  # prompt tokens per prefill step


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """What stage 4 measures."""

    shapes: tuple[str, ...] = ("1b", "8b")
    streams: tuple[int, ...] = (1, 32, 128)
    prompt_tokens: int = 128
    decode_steps: int = 64  # timed decode steps per measurement
    roof_bytes: int = 4 * 2**30  # the bandwidth copy's size

    @classmethod
    def dry_run(cls) -> BenchSettings:
        return cls(("tiny",), (1, 4), 16, 8, 64 * 2**20)


@dataclass(slots=True)
class BenchRow:
    """One (shape, streams) measurement; None until measured."""

    shape: str
    streams: int
    tgi_ms_per_step: float | None = None
    tgi_tok_s: float | None = None
    tgi_error: str | None = None
    # the same decode through the engine core (sampling included): one step in turn,
    # and overlapped (the next plan submitted before this step is collected)
    engine_tok_s: float | None = None
    engine_overlap_tok_s: float | None = None
    engine_error: str | None = None
    transformers_ms_per_step: float | None = None
    transformers_tok_s: float | None = None
    transformers_error: str | None = None


@dataclass(slots=True)
class ShapeReport:
    """What a shape costs and how tgi ran it."""

    name: str
    weight_bytes: int  # read by one decode step
    roof_tok_s: float | None = None  # batch-1: bandwidth / weight_bytes
    attention: str | None = None  # the kind CudaBackend chose
    warmup_s: float | None = None
    error: str | None = None  # building either model failed


@dataclass(slots=True)
class BenchReport:
    """stage4-bench.json."""

    environment: dict[str, Any]
    settings: BenchSettings
    bandwidth_gb_s: float | None = None  # device-to-device copy, read + written
    bandwidth_error: str | None = None
    shapes: list[ShapeReport] = field(default_factory=list)
    rows: list[BenchRow] = field(default_factory=list)


def run_bench(mode: Mode, settings: BenchSettings) -> BenchReport:
    """Measure the roof, then every shape: tgi first, transformers second."""
    report = BenchReport(describe_device(mode.device), settings)

    def save() -> None:
        write_json(mode.out / "stage4-bench.json", report)
        write_text(mode.out / "stage4-bench.md", _markdown(report))

    try:
        report.bandwidth_gb_s = _copy_bandwidth(mode.device, settings.roof_bytes)
    except Exception as exc:  # recorded: the decode numbers stand without a roof
        report.bandwidth_error = error_text(exc)
    for name in settings.shapes:
        shape = BENCH_SHAPES[name]
        info = ShapeReport(name, shape.decode_weight_bytes(torch.bfloat16))
        if report.bandwidth_gb_s is not None:
            info.roof_tok_s = report.bandwidth_gb_s * 1e9 / info.weight_bytes
        report.shapes.append(info)
        rows = [BenchRow(name, streams) for streams in settings.streams]
        report.rows.extend(rows)
        save()
        _bench_tgi(shape, mode, settings, info, rows, save)
        _free(mode.device)
        _bench_transformers(shape, mode, settings, info, rows, save)
        _free(mode.device)
    return report


def _bench_tgi(
    shape: Shape,
    mode: Mode,
    settings: BenchSettings,
    info: ShapeReport,
    rows: Sequence[BenchRow],
    save: Callable[[], None],
) -> None:
    from tgi_backend_cuda.backend import CudaBackend

    dtype, device = torch.bfloat16, mode.device
    max_streams = max(settings.streams)
    total_tokens = settings.prompt_tokens + settings.decode_steps + 1  # + the untimed step
    backend: Any = None
    try:
        model = random_tgi_model(shape, device, dtype)
        kv_bytes = model.spec.kv_bytes_per_token(dtype) * (max_streams + 1) * (total_tokens + 64)
        backend = CudaBackend.from_model(
            model, device=str(device), dtype=dtype, kv_cache_memory=kv_bytes
        )
        del model
        info.attention = backend.attention_name
        block_size = int(backend.capabilities.block_size)
        blocks_per_seq = -(-total_tokens // block_size)
        started = time.monotonic()
        warm = backend.warmup(
            Limits(
                max_input_tokens=settings.prompt_tokens,
                max_total_tokens=blocks_per_seq * block_size,
                max_batch_prefill_tokens=max(_PREFILL_CHUNK_TOKENS, settings.prompt_tokens),
                max_batch_total_tokens=max_streams * blocks_per_seq * block_size,
                max_batch_size=max_streams,
            )
        )
        info.warmup_s = time.monotonic() - started
        if warm.kv.num_blocks is not None and warm.kv.num_blocks < max_streams * blocks_per_seq:
            raise RuntimeError(f"the KV pool holds {warm.kv.num_blocks} blocks")
    except Exception as exc:  # recorded on every row: transformers still runs
        info.error = f"tgi: {error_text(exc)}"
        for row in rows:
            row.tgi_error = info.error
        save()
        _close(backend)
        return
    seq_ids = itertools.count()
    for row in rows:
        try:
            decode = _TgiDecode(backend, block_size, blocks_per_seq, seq_ids)
            ms = decode.run(row.streams, settings, int(shape.config["vocab_size"]), device)
            row.tgi_ms_per_step, row.tgi_tok_s = ms, row.streams * 1000 / ms
        except Exception as exc:  # recorded: the next streams count still runs
            row.tgi_error = error_text(exc)
        logger.info(
            "stage 4: tgi %s x%d: %s tok/s", shape.name, row.streams, _num(row.tgi_tok_s, 1)
        )
        try:
            engine = _EngineDecode(backend, block_size, blocks_per_seq, seq_ids)
            vocab = int(shape.config["vocab_size"])
            for overlap in (False, True):
                ms = engine.run(row.streams, settings, vocab, device, overlap=overlap)
                tok_s = row.streams * 1000 / ms
                if overlap:
                    row.engine_overlap_tok_s = tok_s
                else:
                    row.engine_tok_s = tok_s
        except Exception as exc:  # recorded: the next streams count still runs
            row.engine_error = error_text(exc)
        logger.info(
            "stage 4: engine %s x%d: %s tok/s in turn, %s overlapped",
            shape.name,
            row.streams,
            _num(row.engine_tok_s, 1),
            _num(row.engine_overlap_tok_s, 1),
        )
        save()
    _close(backend)


class _Batch:
    """One batch of streams' plans: each sequence owns the blocks
    [i * blocks_per_seq, (i + 1) * blocks_per_seq); a new sequence names those covering
    its prompt, and a decode row at a block boundary appends the next one, as the
    scheduler's policy does:

        prompt 128, block 16:  new: blocks 0..7   position 128: +8   position 144: +9
    """

    def __init__(
        self,
        streams: int,
        settings: BenchSettings,
        vocab: int,
        block_size: int,
        blocks_per_seq: int,
        seq_ids: Iterator[int],
    ) -> None:
        self.ids = [next(seq_ids) for _ in range(streams)]
        self.block_size = block_size
        self.first = {seq_id: i * blocks_per_seq for i, seq_id in enumerate(self.ids)}
        generator = torch.Generator().manual_seed(streams)
        self.prompts = torch.randint(vocab, (streams, settings.prompt_tokens), generator=generator)
        self.prompt_tokens = settings.prompt_tokens
        self.steps = itertools.count(1)

    def prefill_plans(self) -> Iterator[StepPlan]:
        """The prompts, as many per plan as `_PREFILL_CHUNK_TOKENS` allows."""
        prompt_blocks = -(-self.prompt_tokens // self.block_size)
        per_step = max(1, _PREFILL_CHUNK_TOKENS // self.prompt_tokens)
        for start in range(0, len(self.ids), per_step):
            new = tuple(
                NewSequence(
                    seq_id,
                    tuple(self.prompts[start + i].tolist()),
                    block_ids=tuple(range(self.first[seq_id], self.first[seq_id] + prompt_blocks)),
                )
                for i, seq_id in enumerate(self.ids[start : start + per_step])
            )
            yield StepPlan(new=new, step_index=next(self.steps))

    def decode_plan(self, position: int, last: dict[int, int] | None = None) -> StepPlan:
        """Every stream's decode row at `position`, feeding `last[seq_id]` (None: the
        engine fills the tokens in)."""
        appends = position % self.block_size == 0
        block = position // self.block_size
        return StepPlan(
            running=tuple(
                RunningSequence(
                    seq_id,
                    position,
                    decode=True,
                    last_token=last[seq_id] if last is not None else None,
                    new_block_ids=(self.first[seq_id] + block,) if appends else (),
                )
                for seq_id in self.ids
            ),
            step_index=next(self.steps),
        )


class _TgiDecode:
    """One batch of streams through the contract: prefill, then timed decode steps,
    each step's greedy tokens taken to the host as the engine does."""

    def __init__(
        self, backend: Any, block_size: int, blocks_per_seq: int, seq_ids: Iterator[int]
    ) -> None:
        self.backend, self.block_size, self.blocks_per_seq = backend, block_size, blocks_per_seq
        self.seq_ids = seq_ids
        self.last: dict[int, int] = {}  # seq_id -> the token its next decode row feeds

    def run(self, streams: int, settings: BenchSettings, vocab: int, device: torch.device) -> float:
        """Milliseconds per decode step of `streams` rows."""
        batch = _Batch(streams, settings, vocab, self.block_size, self.blocks_per_seq, self.seq_ids)
        try:
            for plan in batch.prefill_plans():
                self._take(self.backend.step(plan))
            position = settings.prompt_tokens
            self._take(self.backend.step(batch.decode_plan(position, self.last)))  # untimed
            _sync(device)
            started = time.perf_counter()
            for step in range(1, settings.decode_steps + 1):
                self._take(self.backend.step(batch.decode_plan(position + step, self.last)))
            _sync(device)
            elapsed = time.perf_counter() - started
        finally:
            self.backend.release(batch.ids)
        return elapsed * 1000 / settings.decode_steps

    def _take(self, output: StepOutput) -> None:
        """The greedy tokens, on the host: the engine's one copy per step."""
        if output.token_ids is not None:
            tokens = output.token_ids.tolist()
        elif output.logits is not None:
            tokens = output.logits[:, -1].argmax(-1).tolist()
        else:
            raise RuntimeError("the step returned neither token ids nor logits")
        self.last.update(zip(output.seq_ids, tokens, strict=True))


class _EngineDecode:
    """`_TgiDecode`'s batch through `EngineCore`, which samples (greedy) and feeds each
    decode row its token: in turn (`run`), or overlapped, each plan submitted before the
    step before is collected, so its forward starts while that step's tokens land (fed
    from the device: `tgi.engine.core`'s NOTE). What overlap buys is the ratio."""

    def __init__(
        self, backend: Any, block_size: int, blocks_per_seq: int, seq_ids: Iterator[int]
    ) -> None:
        self.backend, self.block_size, self.blocks_per_seq = backend, block_size, blocks_per_seq
        self.seq_ids = seq_ids

    def run(
        self,
        streams: int,
        settings: BenchSettings,
        vocab: int,
        device: torch.device,
        *,
        overlap: bool,
    ) -> float:
        """Milliseconds per decode step of `streams` rows."""
        from tgi.engine.core import EngineCore

        core = EngineCore(self.backend)
        batch = _Batch(streams, settings, vocab, self.block_size, self.blocks_per_seq, self.seq_ids)
        try:
            for plan in batch.prefill_plans():
                core.run(plan)
            position = settings.prompt_tokens
            core.run(batch.decode_plan(position))  # untimed: this batch size's first step
            _sync(device)
            started = time.perf_counter()
            if overlap:
                core.submit(batch.decode_plan(position + 1))
                for step in range(2, settings.decode_steps + 1):
                    core.submit(batch.decode_plan(position + step))
                    core.collect()
                core.collect()
            else:
                for step in range(1, settings.decode_steps + 1):
                    core.run(batch.decode_plan(position + step))
            _sync(device)
            elapsed = time.perf_counter() - started
        finally:
            core.release(batch.ids)
            while True:  # a step left in flight by a failure is collected, not kept
                try:
                    core.collect()
                except RuntimeError:
                    break
        return elapsed * 1000 / settings.decode_steps


def _bench_transformers(
    shape: Shape,
    mode: Mode,
    settings: BenchSettings,
    info: ShapeReport,
    rows: Sequence[BenchRow],
    save: Callable[[], None],
) -> None:
    from transformers import AutoModelForCausalLM

    device = mode.device
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model: Any = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)
        model.eval()
    except Exception as exc:  # recorded on every row
        info.error = f"{info.error or ''} transformers: {error_text(exc)}".strip()
        for row in rows:
            row.transformers_error = error_text(exc)
        save()
        return
    vocab = int(shape.config["vocab_size"])
    for row in rows:
        try:
            ms = _generate_ms_per_step(model, row.streams, settings, vocab, device)
            row.transformers_ms_per_step, row.transformers_tok_s = ms, row.streams * 1000 / ms
        except Exception as exc:  # recorded: the next streams count still runs
            row.transformers_error = error_text(exc)
        logger.info(
            "stage 4: transformers %s x%d: %s tok/s",
            shape.name,
            row.streams,
            _num(row.transformers_tok_s, 1),
        )
        save()
    del model


def _generate_ms_per_step(
    model: Any, streams: int, settings: BenchSettings, vocab: int, device: torch.device
) -> float:
    """Milliseconds per decode step: generate(steps + 1) minus generate(1), same batch."""
    generator = torch.Generator().manual_seed(streams)
    input_ids = torch.randint(vocab, (streams, settings.prompt_tokens), generator=generator)
    input_ids = input_ids.to(device)  # [streams, prompt]

    def generate(num_tokens: int) -> float:
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=num_tokens,
                min_new_tokens=num_tokens,
                pad_token_id=0,
            )
        _sync(device)
        return time.perf_counter() - started

    generate(2)  # warm: kernels, allocator
    prefill_s = generate(1)
    total_s = generate(settings.decode_steps + 1)
    return max(total_s - prefill_s, 1e-9) * 1000 / settings.decode_steps


def _copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 10) -> float:
    """GB/s of a device-to-device copy of `num_bytes`, counting bytes read and written."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _sync(device)
    elapsed = time.perf_counter() - started
    del source, target
    _free(device)
    return 2 * num_bytes * repeats / elapsed / 1e9


def _markdown(report: BenchReport) -> str:
    env = report.environment
    bandwidth = (
        f"{report.bandwidth_gb_s:.0f} GB/s"
        if report.bandwidth_gb_s is not None
        else f"not measured ({report.bandwidth_error})"
    )
    lines = [
        "# Decode benchmark (gpu-check stage 4)",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, "
        f"triton {env.get('triton')}. Copy bandwidth (read + written): {bandwidth}. "
        f"Random bf16 weights, prompts of {report.settings.prompt_tokens} tokens, "
        f"{report.settings.decode_steps} decode steps timed.",
        "",
    ]
    for info in report.shapes:
        roof = f"{info.roof_tok_s:.0f} tok/s" if info.roof_tok_s else "n/a"
        lines.append(
            f"- {info.name}: {info.weight_bytes / 1e6:.1f} MB of weights per step, batch-1 "
            f"roof {roof}; tgi attention {info.attention}, warmup {_num(info.warmup_s, 1)} s"
            + (f"; {info.error}" if info.error else "")
        )
    lines += [
        "",
        "| shape | streams | tgi ms/step | tgi tok/s | transformers ms/step "
        "| transformers tok/s | tgi / transformers | tgi % of batch-1 roof "
        "| engine tok/s | engine overlapped tok/s | overlapped / in turn |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    roofs = {info.name: info.roof_tok_s for info in report.shapes}
    for row in report.rows:
        ratio = (
            row.tgi_tok_s / row.transformers_tok_s
            if row.tgi_tok_s and row.transformers_tok_s
            else None
        )
        roof_tok_s = roofs.get(row.shape)
        of_roof = (
            100 * row.tgi_tok_s / roof_tok_s
            if row.streams == 1 and row.tgi_tok_s and roof_tok_s
            else None
        )
        overlap = (
            row.engine_overlap_tok_s / row.engine_tok_s
            if row.engine_overlap_tok_s and row.engine_tok_s
            else None
        )
        lines.append(
            f"| {row.shape} | {row.streams} | {_num(row.tgi_ms_per_step, 2)} "
            f"| {_num(row.tgi_tok_s, 0)} | {_num(row.transformers_ms_per_step, 2)} "
            f"| {_num(row.transformers_tok_s, 0)} | {_num(ratio, 2)} | {_num(of_roof, 0)} "
            f"| {_num(row.engine_tok_s, 0)} | {_num(row.engine_overlap_tok_s, 0)} "
            f"| {_num(overlap, 2)} |"
        )
    errors = [
        f"- {row.shape} x{row.streams}: {side} {error}"
        for row in report.rows
        for side, error in (
            ("tgi", row.tgi_error),
            ("engine", row.engine_error),
            ("transformers", row.transformers_error),
        )
        if error
    ]
    return "\n".join([*lines, *(["", "Errors:", *errors] if errors else [])]) + "\n"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _close(backend: Any) -> None:
    if backend is not None:
        backend.close()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
