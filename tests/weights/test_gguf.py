"""`load_gguf`: HF names, the q/k un-permutation, config values, against transformers' load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from tgi.errors import ModelNotFound
from tgi.models.source import ModelFiles, embedded_model_path
from tgi.testing.fixtures import smollm2_files
from tgi.weights.gguf import gguf_llama_config, iter_gguf_tensors, load_gguf

# The same cache tests/models uses, so the ~30 s conversion happens once per checkout.
_SMOLLM2_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "tgi-test"


def _llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (LlamaModel.permute)."""
    return (
        weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_tiny_llama_gguf(path: Path, hf: dict[str, np.ndarray], **extra: Any) -> Path:
    """A one-layer llama GGUF holding `hf` (HF-named float32 arrays), as llama.cpp writes it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(extra.get("context_length", 256))
    writer.add_embedding_length(16)
    writer.add_feed_forward_length(32)
    writer.add_block_count(1)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(50000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.mlp.down_proj.weight": "blk.0.ffn_down.weight",
    }
    for hf_name, values in hf.items():
        if hf_name.endswith("q_proj.weight"):
            values = _llama_cpp_permute(values, 4)
        elif hf_name.endswith("k_proj.weight"):
            values = _llama_cpp_permute(values, 2)
        writer.add_tensor(names.get(hf_name, hf_name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "model.embed_tokens.weight": (40, 16),
        "model.norm.weight": (16,),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),  # 4 heads of 4
        "model.layers.0.self_attn.k_proj.weight": (8, 16),  # 2 kv heads of 4
        "model.layers.0.self_attn.v_proj.weight": (8, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 32),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def test_tiny_gguf_round_trips_names_values_and_config(tmp_path: Path) -> None:
    hf = _tiny_weights()
    config, tensors = load_gguf(_write_tiny_llama_gguf(tmp_path / "tiny.gguf", hf))
    assert set(tensors) == set(hf)
    for name, expected in hf.items():
        # q/k come back in HF row order: the llama.cpp permutation is undone exactly.
        assert torch.equal(tensors[name], torch.from_numpy(expected)), name
        assert tensors[name].dtype == torch.float32
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 4 and config["hidden_size"] == 16
    assert config["vocab_size"] == 40  # no llama.vocab_size: counted from the embedding
    assert config["tie_word_embeddings"] is True  # no output.weight
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rope_theta"] == 50000.0 and config["max_position_embeddings"] == 256


def test_only_selects_tensors(tmp_path: Path) -> None:
    path = _write_tiny_llama_gguf(tmp_path / "tiny.gguf", _tiny_weights())
    _, tensors = load_gguf(path, only=lambda name: "k_proj" in name)
    assert list(tensors) == ["model.layers.0.self_attn.k_proj.weight"]


def test_unknown_tensor_and_architecture_are_errors(tmp_path: Path) -> None:
    hf = _tiny_weights()
    hf["blk.0.mystery.weight"] = np.zeros((2, 2), dtype=np.float32)
    path = _write_tiny_llama_gguf(tmp_path / "odd.gguf", hf)
    with pytest.raises(ModelNotFound, match=r"blk\.0\.mystery\.weight"):
        load_gguf(path)
    writer = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelNotFound, match="'qwen2' is not 'llama'"):
        load_gguf(tmp_path / "qwen.gguf")


# SmolLM2: the real GGUF against the checkpoint transformers converted from it.


@pytest.fixture(scope="module")
def smollm2_gguf_path() -> Path:
    try:
        return embedded_model_path()
    except ModelNotFound as exc:
        pytest.skip(f"the embedded model is not installed: {exc}")


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf_path)  # ~5 s: parses the 49k-token arrays


@pytest.fixture(scope="module")
def smollm2_converted(smollm2_gguf_path: Path) -> ModelFiles:
    _SMOLLM2_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return smollm2_files(_SMOLLM2_CACHE_DIR)


def _safetensors(files: ModelFiles) -> Path:
    (path,) = files.path.glob("*.safetensors")
    return path


@pytest.mark.smollm2
def test_smollm2_config_matches_transformers(
    smollm2_gguf_path: Path, smollm2_reader: gguf.GGUFReader, smollm2_converted: ModelFiles
) -> None:
    ours = gguf_llama_config(smollm2_gguf_path, smollm2_reader)
    theirs = json.loads((smollm2_converted.path / "config.json").read_text(encoding="utf-8"))
    # transformers 5 keeps rope_theta in rope_parameters only, 4.x at the top level only
    their_theta = theirs.get("rope_theta", theirs.get("rope_parameters", {}).get("rope_theta"))
    assert ours["rope_theta"] == their_theta
    for key, value in ours.items():
        if key == "rope_theta" or (key == "rope_parameters" and key not in theirs):
            continue
        assert value == theirs[key], key
    # SmolLM2-Instruct: <|im_start|> = 1 begins, <|im_end|> = 2 ends a turn.
    assert (ours["bos_token_id"], ours["eos_token_id"]) == (1, 2)


@pytest.mark.smollm2
def test_smollm2_shapes_and_some_tensors_match_transformers(
    smollm2_reader: gguf.GGUFReader, smollm2_gguf_path: Path, smollm2_converted: ModelFiles
) -> None:
    config = gguf_llama_config(smollm2_gguf_path, smollm2_reader)
    # Q4_1 q/k (permuted) of the first and last layer, Q8_0 embedding, an F32 norm.
    picked = {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    }
    ours = dict(iter_gguf_tensors(smollm2_reader, config, only=picked.__contains__))
    with safe_open(str(_safetensors(smollm2_converted)), "pt") as theirs:
        shapes = {name: tuple(theirs.get_slice(name).get_shape()) for name in theirs.keys()}  # noqa: SIM118
        for name in picked:
            assert torch.equal(ours[name], theirs.get_tensor(name)), name
    ours_shapes = {
        name: tuple(int(d) for d in reversed(tensor.shape))
        for name, tensor in zip(_hf_names(smollm2_reader), smollm2_reader.tensors, strict=True)
    }
    assert ours_shapes == shapes
    assert len(shapes) == 2 + 9 * 30  # tied: no lm_head.weight


def _hf_names(reader: gguf.GGUFReader) -> list[str]:
    from tgi.weights.gguf import _hf_name

    return [_hf_name(tensor.name)[0] for tensor in reader.tensors]


@pytest.mark.slow
@pytest.mark.smollm2
def test_smollm2_every_tensor_equals_transformers(
    smollm2_gguf_path: Path, smollm2_converted: ModelFiles
) -> None:
    _, ours = load_gguf(smollm2_gguf_path)
    with safe_open(str(_safetensors(smollm2_converted)), "pt") as theirs:
        assert set(ours) == set(theirs.keys())
        for name in theirs.keys():  # noqa: SIM118
            assert torch.equal(ours[name], theirs.get_tensor(name)), name
