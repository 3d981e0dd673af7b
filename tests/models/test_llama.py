"""tgi.models.llama against transformers on the same weights: prefill and step decode."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tgi.errors import ConfigError
from tgi.models.attention import DenseAttention
from tgi.models.llama import LlamaForCausalLM, LlamaSpec, load_llama
from tgi.models.rope import RopeSpec
from tgi.testing.tiny_models import build_tiny_model
from tgi.weights import open_checkpoint


def _rope(parameters: dict[str, Any]) -> dict[str, Any]:
    """Rope settings as the installed transformers writes them: `rope_parameters` in 5.x,
    `rope_theta` + `rope_scaling` in 4.x (tgi reads both)."""
    if int(transformers.__version__.split(".")[0]) >= 5:
        return {"rope_parameters": parameters}
    scaling = dict(parameters)
    return {"rope_theta": scaling.pop("rope_theta"), "rope_scaling": scaling}


# name -> (architecture preset, config.json overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        _rope(
            {
                "rope_theta": 500000.0,
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "linear-rope": (
        "llama",
        _rope({"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}),
    ),
    "yarn-rope": (
        "llama",
        _rope(
            {
                "rope_theta": 10000.0,
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        ),
    ),
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-window": (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": 5,
            "max_window_layers": 1,
            "layer_types": None,
        },
    ),
}


def _build(root: Path, name: str) -> Path:
    architecture, overrides = VARIANTS[name]
    path = build_tiny_model(root / name, architecture, seed=3)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config.update(overrides)
    config = {
        key: value for key, value in config.items() if value is not None or key != "layer_types"
    }
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, LlamaForCausalLM]:
    import transformers

    path = _build(tmp_path_factory.mktemp("llama"), request.param)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if json.loads((path / "config.json").read_text()).get("tie_word_embeddings"):
        reference.tie_weights()
    return reference.eval(), load_llama(path, torch.float32)


def test_prefill_logits_match_transformers(pair: tuple[Any, LlamaForCausalLM]) -> None:
    reference, model = pair
    ids = torch.randint(0, model.spec.vocab_size, (23,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = reference(ids[None]).logits[0]  # [n, V]
        got = model(ids, torch.arange(23), DenseAttention(model.spec.layer_windows))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    if any(window is not None for window in model.spec.layer_windows):
        # the window must matter at this length, or the test proves nothing about it
        full = model(ids, torch.arange(23), DenseAttention([None] * model.spec.num_layers))
        assert not torch.allclose(full, expected, atol=1e-2)


def test_step_decode_logits_match_transformers(pair: tuple[Any, LlamaForCausalLM]) -> None:
    from transformers import DynamicCache

    reference, model = pair
    ids = torch.randint(0, model.spec.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    op = DenseAttention(model.spec.layer_windows)
    cache = DynamicCache(config=reference.config)
    with torch.inference_mode():
        # a 9-token prefill, then one token at a time, then a 3-token step; last logits only
        for lo, hi in ((0, 9), *((i, i + 1) for i in range(9, 17)), (17, 20)):
            chunk = ids[lo:hi]
            expected = reference(
                chunk[None],
                position_ids=torch.arange(lo, hi)[None],
                past_key_values=cache,
                use_cache=True,
            ).logits[0]
            last = torch.tensor([hi - lo - 1])
            got = model(chunk, torch.arange(lo, hi), op, None, last)
            torch.testing.assert_close(got, expected[-1:], atol=2e-4, rtol=1e-4)


def test_spec_reads_sliding_windows_per_architecture() -> None:
    base = {
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "sliding_window": 4,
    }
    mistral = LlamaSpec.from_hf({**base, "architectures": ["MistralForCausalLM"]})
    assert mistral.layer_windows == (4, 4, 4)
    qwen_off = LlamaSpec.from_hf({**base, "architectures": ["Qwen2ForCausalLM"]})
    assert (
        qwen_off.layer_windows == (None, None, None) and qwen_off.qkv_bias and not qwen_off.o_bias
    )
    qwen_on = LlamaSpec.from_hf(
        {
            **base,
            "architectures": ["Qwen2ForCausalLM"],
            "use_sliding_window": True,
            "max_window_layers": 1,
        }
    )
    assert qwen_on.layer_windows == (None, 4, 4)
    assert qwen_on.num_kv_heads == 2 and qwen_on.head_dim == 4
    assert qwen_on.kv_bytes_per_token(torch.float32) == 2 * 3 * 2 * 4 * 4


def test_spec_refuses_other_architectures_and_dynamic_rope() -> None:
    with pytest.raises(ConfigError, match="GPT2LMHeadModel is not a Llama-family"):
        LlamaSpec.from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="'dynamic' is not supported"):
        RopeSpec.from_hf({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, 8)


def test_sharded_checkpoint_loads_the_same_model(tmp_path: Path) -> None:
    whole = build_tiny_model(tmp_path / "whole", "llama", seed=5)
    sharded = build_tiny_model(tmp_path / "sharded", "llama", seed=5, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    _, tensors = open_checkpoint(sharded)
    assert "model.layers.1.mlp.down_proj.weight" in tensors
    a, b = load_llama(whole), load_llama(sharded)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = build_tiny_model(tmp_path / "m", "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(KeyError, match=re.escape("model.layers.1.mlp.up_proj.weight")):
        load_llama(path)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_from_gguf_equals_the_converted_checkpoint() -> None:
    """`load_llama(.gguf)` (through tgi.weights.gguf) and the converted safetensors dir
    build the same model: same spec, same logits."""
    from tgi.errors import ModelNotFound
    from tgi.models.source import embedded_model_path
    from tgi.testing.fixtures import smollm2_files

    try:
        gguf_path = embedded_model_path()
        converted = smollm2_files(Path(__file__).resolve().parents[2] / ".cache" / "tgi-test")
    except ModelNotFound as exc:
        pytest.skip(f"the embedded SmolLM2 is not installed: {exc}")
    from_gguf, from_dir = load_llama(gguf_path), load_llama(converted)
    assert from_gguf.spec == from_dir.spec and from_dir.spec.tie_word_embeddings
    ids = torch.arange(100, 110)
    with torch.inference_mode():
        a = from_gguf(ids, torch.arange(10), DenseAttention(from_gguf.spec.layer_windows))
        b = from_dir(ids, torch.arange(10), DenseAttention(from_dir.spec.layer_windows))
    torch.testing.assert_close(a, b)
