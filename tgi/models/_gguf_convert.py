"""Turn a GGUF file into a float32 transformers checkpoint directory.

Why convert rather than load the GGUF each start: transformers dequantizes every
tensor and parses the whole token table on each `from_pretrained(gguf_file=...)`
(about 30 s for SmolLM2 on two cores), and the rest of tgi (weights loading, tensor
parallel slicing) reads safetensors. Dequantizing through transformers itself keeps
the weights bit-identical to what transformers' own `generate()` sees, which the
correctness tests compare against.

The special tokens are the exception: bos/eos/pad come from the GGUF's own
`tokenizer.ggml.*_token_id` metadata, not from transformers, whose reading differs by
version (4.57 gives SmolLM2-Instruct's eos as `<|im_start|>`, 5.x as `<|im_end|>`,
which is what the file says); a wrong eos makes every generation run to its limit.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path

from tgi.errors import ModelNotFound
from tgi.models._gguf_meta import read_gguf_metadata

logger = logging.getLogger(__name__)

__all__ = ["convert_gguf"]


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, tokenizer files and float32 safetensors of `gguf_path` to `out_dir`.

    `out_dir` must exist and should be empty; the caller makes it a temporary
    directory and renames it into place, so a crash here leaves nothing reusable.
    Raises `ModelNotFound` when transformers cannot read this GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers resolves `gguf_file` inside a directory and may also read a
    # tokenizer_config.json or config.json lying next to it; a scratch directory
    # holding only a link to the file makes the GGUF the single source.
    with tempfile.TemporaryDirectory(prefix="tgi-gguf-src-") as scratch:
        source_dir = Path(scratch)
        (source_dir / gguf_path.name).symlink_to(gguf_path.resolve())
        kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source_dir, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32, **kwargs)
        except ValueError as exc:
            # transformers says "GGUF model with architecture X is not supported yet."
            raise ModelNotFound(f"transformers cannot convert {gguf_path}: {exc}") from exc
    try:
        _strip_quantization(model)
        _apply_gguf_special_tokens(model, tokenizer, _gguf_special_token_ids(gguf_path))
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    finally:
        del model
        gc.collect()
    _check_saved(out_dir, gguf_path)


def _strip_quantization(model: object) -> None:
    """Make the dequantized model look like a plain float32 checkpoint.

    transformers marks a GGUF-loaded model as quantized with method "gguf" and refuses
    to save it, though its weights are already float32 tensors; dropping the marker
    is what makes `save_pretrained` write them as they are.
    """
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None  # type: ignore[attr-defined]
    config.dtype = "float32"


# GGUF metadata key -> the name transformers gives that special token.
_SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
}


def _gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """{"bos": id, "eos": id, "pad": id} for those the GGUF's metadata names."""
    metadata = read_gguf_metadata(gguf_path)
    found = {}
    for role, key in _SPECIAL_TOKEN_KEYS.items():
        value = metadata.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            found[role] = value
    return found


def _apply_gguf_special_tokens(model: object, tokenizer: object, token_ids: dict[str, int]) -> None:
    """Make tokenizer, config and generation config all use the GGUF's special tokens.

    Written into tokenizer_config.json, config.json and generation_config.json by
    `save_pretrained`, so the checkpoint says the same under every transformers.
    """
    vocab_size = len(tokenizer)  # type: ignore[arg-type]
    generation_config = getattr(model, "generation_config", None)
    for role, token_id in token_ids.items():
        if not 0 <= token_id < vocab_size:
            logger.warning("GGUF %s token id %d is outside the vocabulary; ignored", role, token_id)
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)  # type: ignore[attr-defined]
        if getattr(tokenizer, f"{role}_token", None) != token:
            logger.info("GGUF metadata sets the %s token to %r (id %d)", role, token, token_id)
        setattr(tokenizer, f"{role}_token", token)
        setattr(model.config, f"{role}_token_id", token_id)  # type: ignore[attr-defined]
        if generation_config is not None:
            setattr(generation_config, f"{role}_token_id", token_id)


def _check_saved(out_dir: Path, gguf_path: Path) -> None:
    """Fail the conversion, before it is published, if the result would not load plainly."""
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    problems = []
    if "quantization_config" in config:
        problems.append("config.json still carries quantization_config")
    if config.get("dtype", config.get("torch_dtype")) != "float32":
        problems.append(f"config.json dtype is {config.get('dtype')!r}, not float32")
    if not any(out_dir.glob("*.safetensors")):
        problems.append("no *.safetensors were written")
    if not (out_dir / "tokenizer.json").is_file():
        problems.append("no tokenizer.json was written")
    if problems:
        raise ModelNotFound(f"converting {gguf_path} went wrong: {'; '.join(problems)}")
    logger.debug("converted %s into %s", gguf_path, out_dir)
