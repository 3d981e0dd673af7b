"""The GGUF conversion takes bos/eos/pad from the GGUF's metadata, whatever transformers says."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from tgi.models import _gguf_convert
from tgi.models.source import ModelFiles


def _gguf_with_token_ids(path: Path, **token_ids: int) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for role, token_id in token_ids.items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_special_token_ids_are_read_from_the_metadata(tmp_path: Path) -> None:
    path = _gguf_with_token_ids(tmp_path / "m.gguf", bos=1, eos=2, pad=0)
    assert _gguf_convert._gguf_special_token_ids(path) == {"bos": 1, "eos": 2, "pad": 0}
    bare = _gguf_with_token_ids(tmp_path / "bare.gguf")
    assert _gguf_convert._gguf_special_token_ids(bare) == {}


def test_gguf_special_tokens_win_and_are_saved_everywhere(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A transformers reading that got eos wrong (as 4.57 does on SmolLM2) is overridden."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    wrong_eos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    right_eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.eos_token = "<|im_start|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = wrong_eos

    _gguf_convert._apply_gguf_special_tokens(
        model, tokenizer, {"bos": wrong_eos, "eos": right_eos, "pad": 10**9}
    )
    out = tmp_path / "out"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = AutoTokenizer.from_pretrained(out)
    assert (reloaded.eos_token, reloaded.eos_token_id) == ("<|im_end|>", right_eos)
    assert reloaded.bos_token == "<|im_start|>"
    assert reloaded.pad_token == "<|endoftext|>"  # out-of-vocabulary id: left alone
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (wrong_eos, right_eos)
    assert GenerationConfig.from_pretrained(out).eos_token_id == right_eos


@pytest.mark.smollm2
def test_converted_smollm2_ends_turns_with_im_end(
    smollm2_model_files: ModelFiles, smollm2_gguf: Path
) -> None:
    """SmolLM2-Instruct's GGUF says bos = 1 <|im_start|>, eos = pad = 2 <|im_end|>."""
    assert _gguf_convert._gguf_special_token_ids(smollm2_gguf) == {"bos": 1, "eos": 2, "pad": 2}
    path = smollm2_model_files.path
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.pad_token == "<|im_end|>"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    generation = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    for saved in (config, generation):
        assert (saved["bos_token_id"], saved["eos_token_id"], saved["pad_token_id"]) == (1, 2, 2)
