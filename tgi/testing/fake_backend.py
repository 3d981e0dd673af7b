"""Deterministic toy backends for router, engine and server tests: no weights, instant steps.

`FakeBackend`'s "model" prefers token `(sum of the sequence's tokens + length) % vocab`,
so the output of any prompt is computable (`expected_tokens`). Every fake is strict about
the contract, where a real backend would silently compute garbage: a plan that names a
sequence twice, a chunk at the wrong position, a decode row for a sequence it does not
hold, KV beyond capacity, a feature the capabilities do not declare, or a step outside
the declared `StepConstraints` all raise `BackendError` before any state changes.
Failures can be injected per prompt, and `step_gate` paces steps from a test.

- `FakeBackend`: continuous, one token list per sequence (`KvLayout.PER_ROW`).
- `FakeDeviceSamplingBackend`: the same, but samples on its device (`samples_on_device`)
  and returns token ids instead of logits.
- `FakePagedBackend` (`tgi.testing._fake_paged`): token ids in a real block pool.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    RunningSequence,
    StepConstraints,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError
from tgi.sampling.params import SamplingParams
from tgi.testing._fake_paged import (
    FakePagedBackend,
    NextToken,
    mixing_next_token,
    paged_expected_tokens,
)
from tgi.testing._fake_plan import check_plan, log_calls, logits_ends, pad_logits

__all__ = [
    "DEVICE_SAMPLING_PARAMETERS",
    "FakeBackend",
    "FakeDeviceSamplingBackend",
    "FakePagedBackend",
    "NextToken",
    "device_expected_tokens",
    "device_next_token",
    "expected_tokens",
    "mixing_next_token",
    "paged_expected_tokens",
]


def _next_token(tokens: Sequence[int], vocab_size: int) -> int:
    return (sum(tokens) + len(tokens)) % vocab_size


def expected_tokens(prompt: Sequence[int], num_tokens: int, vocab_size: int) -> list[int]:
    """The greedy output of `FakeBackend` for `prompt`."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(_next_token(tokens, vocab_size))
    return tokens[len(prompt) :]


class FakeBackend:
    """Implements the `Backend` protocol with per-sequence token lists as its "KV".

    Records what it was asked: `plans` (every `StepPlan`, as received), `calls`
    (per step, `("prefill", ids of new and chunk rows)` then `("decode", ids of decode
    rows)`, each only when there are such rows) and `released` (every id it dropped,
    through `finished`, `preempted` or `release`, in order).

    `constraints` is what warmup reports; a step that breaks a hard one (more rows than
    `constraints.max_rows`, a new sequence's chunk longer than `constraints.max_chunk`,
    more tokens than `max_tokens_per_step`, more adapters than `max_adapters_per_step`)
    raises, so a router test sees admission enforce them.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        capacity_tokens: int = 4096,
        *,
        fail_prompts: Sequence[tuple[int, ...]] = (),
        step_gate: threading.Event | None = None,
        constraints: StepConstraints | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.capacity_tokens = capacity_tokens
        self.fail_prompts = set(fail_prompts)  # a new row or chunk equal to one raises
        self.step_gate = step_gate  # when set, each step waits for it (tests pace steps)
        self.constraints = constraints or StepConstraints()
        self.kv: dict[int, list[int]] = {}  # seq_id -> every token it holds in KV
        self.adapters: dict[int, str | None] = {}  # seq_id -> its LoRA adapter
        self.plans: list[StepPlan] = []
        self.calls: list[tuple[str, tuple[int, ...]]] = []  # (kind, seq_ids)
        self.released: list[int] = []
        self.healthy = True
        self._capabilities = Capabilities(
            batching=Batching.CONTINUOUS, kv_layout=KvLayout.PER_ROW, prompt_logits=True
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def warmup(self, limits: Limits) -> WarmupReport:
        if limits.max_total_tokens > self.capacity_tokens:
            raise BackendError("max_total_tokens does not fit the fake KV capacity")
        capacity = KVCapacity(total_tokens=self.capacity_tokens, bytes_per_token=4)
        return WarmupReport(kv=capacity, constraints=self.constraints)

    # ---- the step ----------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepOutput:
        """Validate the whole plan, drop `finished`/`preempted`, then run the rows."""
        self._wait()
        self.plans.append(plan)
        log_calls(self.calls, plan)
        self.check(plan)
        self._drop((*plan.finished, *plan.preempted))
        for new in plan.new:
            self.kv[new.seq_id] = list(new.token_ids)
            self.adapters[new.seq_id] = new.adapter_id
        for row in plan.running:
            history = self.kv[row.seq_id]
            del history[row.start_position :]  # only rejected drafts: check() made sure
            history.extend(row.input_ids)
        return self.output(plan)

    def check(self, plan: StepPlan) -> None:
        """Raise `BackendError` for anything in `plan` a real backend could not run.
        Subclasses extend it (slots, say) and call it first."""
        check_plan(plan, self.capabilities, self.constraints, self.adapters)
        for seq_id in (*plan.finished, *plan.preempted):
            if seq_id not in self.kv:
                raise BackendError(f"seq {seq_id} ended but the backend does not hold it")
        dropped = {*plan.finished, *plan.preempted}
        held = {s: len(h) for s, h in self.kv.items() if s not in dropped}
        for new in plan.new:
            if new.seq_id in held:
                raise BackendError(f"seq {new.seq_id} is new but already held")
            if new.start_position != 0:
                raise BackendError(f"seq {new.seq_id}: a per-row KV has no cached prefix")
            if new.token_ids in self.fail_prompts:
                raise BackendError(f"injected failure for prompt {new.token_ids}")
        for row in plan.running:
            self._check_running(row, held.get(row.seq_id))
        grown = sum(len(row.input_ids) for row in plan.rows) - sum(
            held[row.seq_id] - row.start_position for row in plan.running
        )
        if sum(held.values()) + grown > self.capacity_tokens:
            raise BackendError("KV capacity exceeded")

    def _check_running(self, row: RunningSequence, held: int | None) -> None:
        if held is None:
            raise BackendError(f"seq {row.seq_id} runs but the backend does not hold it")
        rewinds = row.decode and self.capabilities.speculation
        if row.start_position > held or (row.start_position < held and not rewinds):
            raise BackendError(f"seq {row.seq_id}: step at {row.start_position}, KV holds {held}")
        if not row.decode and row.token_ids in self.fail_prompts:
            raise BackendError(f"injected failure for prompt {row.token_ids}")
        if row.decode and row.last_token is None:
            raise BackendError(
                f"decode row of seq {row.seq_id} reached the backend without a token"
            )

    def output(self, plan: StepPlan) -> StepOutput:
        """Logits for `plan.logits_rows` from the histories the step left."""
        rows: list[torch.Tensor] = []  # each [num_logits, V]
        for row in plan.logits_rows:
            history = self.kv[row.seq_id]
            ends = logits_ends(row, len(history))
            rows.append(torch.stack([self._logits_for(history[:end]) for end in ends]))
        prompt_logits = {
            new.seq_id: torch.stack(
                [self._logits_for(new.token_ids[: i + 1]) for i in range(len(new.token_ids))]
            )
            for new in plan.new
            if new.want_prompt_logits
        }
        seq_ids = tuple(row.seq_id for row in plan.logits_rows)
        return StepOutput(seq_ids, pad_logits(rows, self.vocab_size), prompt_logits)

    def _logits_for(self, tokens: Sequence[int]) -> torch.Tensor:
        logits = torch.zeros(self.vocab_size)  # [V]
        logits[_next_token(tokens, self.vocab_size)] = 10.0
        return logits

    def _drop(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.adapters.pop(seq_id, None)
            if self.kv.pop(seq_id, None) is not None:
                self.released.append(seq_id)

    def _wait(self) -> None:
        if self.step_gate is not None:
            self.step_gate.wait(timeout=30)

    # ---- outside steps -----------------------------------------------------------------

    def release(self, seq_ids: Sequence[int]) -> None:
        self._drop(seq_ids)

    def kv_usage(self) -> KVUsage:
        used = sum(len(tokens) for tokens in self.kv.values())
        return KVUsage(frozenset(self.kv), used, self.capacity_tokens)

    def health(self) -> None:
        if not self.healthy:
            raise BackendError("fake backend marked unhealthy")

    def close(self) -> None:
        self.kv.clear()


# The SamplingParams fields `FakeDeviceSamplingBackend` honours by default.
DEVICE_SAMPLING_PARAMETERS = frozenset({"do_sample", "temperature", "top_k", "top_p", "seed"})


def device_next_token(history: Sequence[int], sampling: SamplingParams, vocab_size: int) -> int:
    """What `FakeDeviceSamplingBackend` samples after `history`: `FakeBackend`'s greedy
    token, or, for `do_sample` rows, one shifted by the seed and the position (so two
    seeds differ, and a preempted sequence samples the same tokens again)."""
    greedy = _next_token(history, vocab_size)
    if not sampling.do_sample:
        return greedy
    return (greedy + 1 + sampling.seed + len(history)) % vocab_size


def device_expected_tokens(
    prompt: Sequence[int], num_tokens: int, vocab_size: int, sampling: SamplingParams
) -> list[int]:
    """The output of `FakeDeviceSamplingBackend` for `prompt` sampled with `sampling`."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(device_next_token(tokens, sampling, vocab_size))
    return tokens[len(prompt) :]


# The logprob `FakeDeviceSamplingBackend` reports: certain for greedy rows, a fixed
# value for sampled ones (its "distribution" is a point mass it shifts).
DEVICE_GREEDY_LOGPROB = 0.0
DEVICE_SAMPLED_LOGPROB = -1.0


class FakeDeviceSamplingBackend(FakeBackend):
    """A `FakeBackend` that samples on its device: `StepOutput.token_ids` [R] and
    `logprobs` [R], no logits (`device_next_token` says which token).

    It declares `samples_on_device=True` and honours `sampling_parameters`; a new
    sequence whose `SamplingParams` set any other field raises (validation must have
    refused it). No drafts, no prompt logits: one token per row.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        capacity_tokens: int = 4096,
        *,
        sampling_parameters: frozenset[str] = DEVICE_SAMPLING_PARAMETERS,
        fail_prompts: Sequence[tuple[int, ...]] = (),
        step_gate: threading.Event | None = None,
        constraints: StepConstraints | None = None,
    ) -> None:
        super().__init__(
            vocab_size,
            capacity_tokens,
            fail_prompts=fail_prompts,
            step_gate=step_gate,
            constraints=constraints,
        )
        self.sampling: dict[int, SamplingParams] = {}  # seq_id -> how it samples
        self._capabilities = Capabilities(
            batching=Batching.CONTINUOUS,
            kv_layout=KvLayout.PER_ROW,
            samples_on_device=True,
            sampling_parameters=sampling_parameters,
        )

    def check(self, plan: StepPlan) -> None:
        super().check(plan)
        allowed = self.capabilities.sampling_parameters
        for new in plan.new:
            refused = set(new.sampling.non_default_fields()) - allowed
            if refused:
                raise BackendError(
                    f"seq {new.seq_id} asks for {sorted(refused)}; the device samples "
                    f"only {sorted(allowed)}"
                )

    def output(self, plan: StepPlan) -> StepOutput:
        for new in plan.new:
            self.sampling[new.seq_id] = new.sampling
        token_ids, logprobs = [], []
        for row in plan.logits_rows:
            sampling = self.sampling[row.seq_id]
            token_ids.append(device_next_token(self.kv[row.seq_id], sampling, self.vocab_size))
            sampled = sampling.do_sample
            logprobs.append(DEVICE_SAMPLED_LOGPROB if sampled else DEVICE_GREEDY_LOGPROB)
        return StepOutput(
            tuple(row.seq_id for row in plan.logits_rows),
            logits=None,
            token_ids=torch.tensor(token_ids, dtype=torch.long),  # [R]
            logprobs=torch.tensor(logprobs, dtype=torch.float32),  # [R]
        )

    def _drop(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.sampling.pop(seq_id, None)
        super()._drop(seq_ids)
