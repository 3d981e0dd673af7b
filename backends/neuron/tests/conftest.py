"""Tiny models for the neuron backend's tests, plain or "exported" (a neuron section or a
neuron_config.json next to the weights, as optimum-neuron writes them); transformers'
greedy output as the oracle; and `Steps`, which builds step plans as the static-slots
policy does."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tgi.backend.contract import Backend, NewSequence, RunningSequence, StepOutput, StepPlan
from tgi.testing.tiny_models import build_tiny_model

ExportedFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tiny llama checkpoint (config.json, safetensors, tokenizer)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_neuron_section(model_dir: Path, **neuron: Any) -> Path:
    """Record compiled shapes the way transformers-neuronx exports did: config.json["neuron"]."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["neuron"] = neuron
    config_path.write_text(json.dumps(config))
    return model_dir


def write_neuron_config(model_dir: Path, **neuron: Any) -> Path:
    """Record compiled shapes the way optimum-neuron's NxD exports do: neuron_config.json."""
    (model_dir / "neuron_config.json").write_text(json.dumps(neuron))
    return model_dir


@pytest.fixture
def exported(tiny_model: Path, tmp_path: Path) -> ExportedFactory:
    """Copy the tiny model to a fresh directory and give it a neuron section."""

    def factory(name: str = "model", **neuron: Any) -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_model, target)
        defaults: dict[str, Any] = {"batch_size": 4, "sequence_length": 128, "num_cores": 2}
        return write_neuron_section(target, **{**defaults, **neuron})

    return factory


def make_prompt(seed: int, num_tokens: int, vocab_size: int = 200) -> tuple[int, ...]:
    """Deterministic token ids in [0, vocab_size), different for each seed."""
    rng = random.Random(seed)
    return tuple(rng.randrange(vocab_size) for _ in range(num_tokens))


class Reference:
    """transformers' `generate(do_sample=False)` on the same weights: the oracle."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model: Any = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32
        ).eval()

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """The new tokens; fewer than `max_new_tokens` only when it stopped at EOS."""
        input_ids = torch.tensor([list(prompt)], dtype=torch.long)  # [1, n]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.model.generation_config.pad_token_id,
            )
        return [int(token) for token in out[0, len(prompt) :]]


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> Reference:
    return Reference(tiny_model)


def greedy(out: StepOutput) -> list[int]:
    """Each row's token: the argmax of its [T, V] logits, or the one sampled on the
    device (greedy rows sample the argmax there)."""
    if out.logits is None:
        assert out.token_ids is not None, "a step returned neither logits nor token ids"
        return [int(token) for token in out.token_ids]
    return [int(token) for token in out.logits[:, -1].argmax(dim=-1)]


@dataclass
class Steps:
    """Drives a backend as the static-slots policy does: every live sequence decodes at
    each step (its last sampled token at the position its KV reaches), new ones join
    with the slot they are given, and tokens are chosen greedily."""

    backend: Backend
    generated: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> its tokens
    prompts: dict[int, tuple[int, ...]] = field(default_factory=dict)  # seq_id -> prompt
    in_kv: dict[int, int] = field(default_factory=dict)  # seq_id -> tokens in its KV
    outputs: list[StepOutput] = field(default_factory=list)

    def step(
        self,
        new: Mapping[int, tuple[int, Sequence[int]]] | None = None,  # seq_id -> (slot, prompt)
        *,
        finished: Iterable[int] = (),
    ) -> StepOutput:
        finished = tuple(finished)
        for seq_id in finished:
            self.in_kv.pop(seq_id)
        running = tuple(
            RunningSequence(seq_id, n, decode=True, last_token=self.generated[seq_id][-1])
            for seq_id, n in self.in_kv.items()
        )
        new_rows = tuple(
            NewSequence(seq_id, tuple(prompt), slot=slot)
            for seq_id, (slot, prompt) in (new or {}).items()
        )
        out = self.backend.step(StepPlan(new=new_rows, running=running, finished=finished))
        for row in running:
            self.in_kv[row.seq_id] += 1
        for row in new_rows:
            self.in_kv[row.seq_id] = len(row.token_ids)
            self.generated[row.seq_id] = []
            self.prompts[row.seq_id] = tuple(row.token_ids)
        for seq_id, token in zip(out.seq_ids, greedy(out), strict=True):
            self.generated[seq_id].append(token)
        self.outputs.append(out)
        return out

    def run(
        self, prompts: Mapping[int, tuple[int, Sequence[int]]], num_tokens: int
    ) -> dict[int, list[int]]:
        """Start `prompts` together and decode until each has `num_tokens` tokens."""
        self.step(prompts)
        while len(self.generated[next(iter(prompts))]) < num_tokens:
            self.step()
        return {seq_id: self.generated[seq_id] for seq_id in prompts}
