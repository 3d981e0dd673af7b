"""Turn a GGUF file into a float32 transformers checkpoint directory.

Why convert rather than load the GGUF each start: transformers dequantizes every
tensor and parses the whole token table on each `from_pretrained(gguf_file=...)`
(about 30 s for SmolLM2 on two cores), and the rest of tgi (weights loading, tensor
parallel slicing) reads safetensors. Dequantizing through transformers itself keeps
the weights bit-identical to what transformers' own `generate()` sees, which the
correctness tests compare against.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path

from tgi.errors import ModelNotFound

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
