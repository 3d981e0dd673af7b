"""The embedded SmolLM2, converted for real: the result loads plainly and generates.

Uses the session fixture `smollm2_model_files`, cached in <repo>/.cache/tgi-test, so
only a cold checkout pays the ~30 s conversion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgi.config import resolve_config
from tgi.models import _cache, _gguf_convert
from tgi.models.source import (
    ModelFiles,
    ModelKind,
    embedded_model_path,
    inspect_model,
    materialize,
)

pytestmark = pytest.mark.smollm2

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def test_converted_dir_layout(smollm2_model_files: ModelFiles) -> None:
    files = smollm2_model_files
    assert files.kind is ModelKind.EMBEDDED
    assert files.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (files.architecture, files.max_position_embeddings) == ("LlamaForCausalLM", 8192)
    assert files.path.name == "SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f"
    config = json.loads((files.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 8192
    assert (files.path / "model.safetensors").is_file()
    assert (files.path / _cache.MARKER_FILE).is_file()


def test_tokenizer_reloads_with_chat_template(smollm2_model_files: ModelFiles) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_files.path)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == 2
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_model_reloads_and_generates_greedily(smollm2_model_files: ModelFiles) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model_files.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model_files.path)
    assert model.dtype == torch.float32
    inputs = tokenizer.apply_chat_template(
        PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    assert tokenizer.decode(new_tokens) == "The capital of France is Paris.<|im_end|>"


def test_second_materialize_reuses_without_converting(
    smollm2_model_files: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = smollm2_model_files.path / "model.safetensors"
    mtime_ns = weights.stat().st_mtime_ns

    def refuse(gguf_path: Path, out_dir: Path) -> None:
        raise AssertionError(f"converted {gguf_path} again instead of reusing")

    monkeypatch.setattr(_gguf_convert, "convert_gguf", refuse)
    config = resolve_config({"cache_dir": str(smollm2_model_files.path.parents[1])}, environ={})
    again = materialize(inspect_model(config), config)
    assert again == smollm2_model_files
    assert weights.stat().st_mtime_ns == mtime_ns


@pytest.mark.slow
def test_fresh_conversion_equals_transformers_gguf_load(
    smollm2_model_files: ModelFiles, tmp_path: Path
) -> None:
    """Convert anew (the session cache may be warm) and compare every tensor bit for bit.

    Bit-identical to what transformers dequantizes, which correctness tests compare to.
    """
    gguf_path = embedded_model_path()
    _gguf_convert.convert_gguf(gguf_path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    converted = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).state_dict()
    assert sorted(converted) == sorted(reference)
    different = [name for name in reference if not torch.equal(reference[name], converted[name])]
    assert different == []
