"""Fetch a hub model's serving files into the Hugging Face cache, as TGI's launcher does.

Called from `tgi.models.source` in the front process only, before any worker starts:
workers receive the local snapshot path (`ModelFiles.path`) and never touch the hub.

What is fetched: config.json, tokenizer and generation files (the small top-level
*.json / *.txt / *.model / *.jinja / *.tiktoken files), safetensors weights (the shards
the index names, else every top-level *.safetensors) and, with --trust-remote-code, the
repository's top-level *.py. PyTorch pickles (*.bin, *.pt, *.pth) are never fetched: a
repository that has only those is refused, naming them.

Downloads go through huggingface_hub (`snapshot_download`): the cache layout shared with
transformers, resumed partial files, its progress bars on stderr. `HF_ENDPOINT`,
`HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN` and `HF_HUB_OFFLINE` are read from the config's
environment snapshot (`ServeConfig.environ`); without a token there, huggingface_hub's
own (a stored login) is used. Every failure becomes a `ModelNotFound` with what to do.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tgi.config import ServeConfig
from tgi.errors import ModelNotFound

logger = logging.getLogger(__name__)

__all__ = [
    "METADATA_FILES",
    "HubAccess",
    "RepoPlan",
    "cached_snapshot",
    "fetch",
    "hub_errors",
    "is_offline",
    "plan_repo",
    "restrict_to_index",
    "select_files",
]

# Read by `inspect_model` before any weight: the architecture, context length and shards.
METADATA_FILES = ("config.json", "model.safetensors.index.json")
# Small top-level files the tokenizer and generation config may need.
_SIDE_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken")
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
_TRUE = frozenset({"1", "true", "yes", "on"})
_TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True, slots=True)
class HubAccess:
    """Where and how to reach the hub, from a `ServeConfig`."""

    endpoint: str  # e.g. "https://huggingface.co", without a trailing slash
    token: str | None  # HF_TOKEN / HUGGING_FACE_HUB_TOKEN; None: huggingface_hub's own
    cache: Path  # the hub cache directory (shared with transformers)

    @classmethod
    def from_config(cls, config: ServeConfig, cache: Path) -> HubAccess:
        from huggingface_hub import constants

        environ = config.environ
        endpoint = environ.get("HF_ENDPOINT") or constants.ENDPOINT
        token = next((environ[name] for name in _TOKEN_VARIABLES if environ.get(name)), None)
        return cls(endpoint=endpoint.rstrip("/"), token=token, cache=cache)


@dataclass(frozen=True, slots=True)
class RepoPlan:
    """What one revision of a repository holds, and which of its files tgi fetches."""

    sha: str  # the commit the revision resolved to
    metadata_files: tuple[str, ...]  # fetched by inspect_model: METADATA_FILES present
    serving_files: tuple[str, ...]  # every file to fetch, metadata included


def is_offline(config: ServeConfig) -> bool:
    """True when HF_HUB_OFFLINE is set, in the config's environment or huggingface_hub's."""
    from huggingface_hub import constants

    value = config.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def cached_snapshot(model_id: str, revision: str, cache: Path) -> Path | None:
    """The cached snapshot directory of `revision` (a branch, tag or sha), or None.

    Found by its config.json, without network and without huggingface_hub's own
    completeness check (which counts files tgi deliberately skips, such as *.bin);
    the caller checks the directory with `check_model_dir`.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_id, "config.json", cache_dir=cache, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def select_files(
    model_id: str, revision: str, names: Iterable[str], trust_remote_code: bool
) -> tuple[str, ...]:
    """The files of a repository listing (`names`) that serving needs, sorted.

    Raises `ModelNotFound` when the listing lacks config.json, a tokenizer or
    safetensors weights, naming what it has instead (PyTorch pickles, GGUF files).
    """
    top_level = sorted(name for name in names if "/" not in name)
    what = f"hub model {model_id!r} (revision {revision})"
    if "config.json" not in top_level:
        ggufs = fnmatch.filter(top_level, "*.gguf")
        hint = f"; it holds GGUF files: pass one as --model-id ({', '.join(ggufs[:3])})"
        raise ModelNotFound(
            f"{what} has no config.json, so it is not a transformers model"
            + (hint if ggufs else "")
        )
    weights = fnmatch.filter(top_level, "*.safetensors")
    if not weights:
        pickles = sorted({n for p in _PICKLE_PATTERNS for n in fnmatch.filter(top_level, p)})
        if pickles:
            raise ModelNotFound(
                f"{what} has only PyTorch weights ({', '.join(pickles[:3])}); tgi serves "
                "safetensors only, which load without running pickled code, and does not "
                "download pickles. Pass a --revision that has safetensors (the hub's "
                "conversion bot often opens one as refs/pr/N), or convert once: "
                "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst), then "
                "--model-id dst"
            )
        raise ModelNotFound(f"{what} has no weights: expected *.safetensors")
    if not any(name in top_level for name in _TOKENIZER_FILES):
        raise ModelNotFound(
            f"{what} has no tokenizer: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    patterns = (*_SIDE_FILE_PATTERNS, "*.safetensors", *(("*.py",) if trust_remote_code else ()))
    return tuple(n for n in top_level if any(fnmatch.fnmatch(n, p) for p in patterns))


def plan_repo(model_id: str, revision: str, access: HubAccess, trust_remote_code: bool) -> RepoPlan:
    """List `revision` of `model_id` on the hub (one API call) and choose what to fetch."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=access.endpoint, token=access.token)
    with hub_errors(model_id, revision, access):
        info = api.model_info(model_id, revision=revision)
    if info.sha is None:
        raise ModelNotFound(
            f"the hub at {access.endpoint} did not say which commit revision {revision} of "
            f"{model_id!r} is; check HF_ENDPOINT points at a Hugging Face hub"
        )
    names = [sibling.rfilename for sibling in info.siblings or []]
    serving = select_files(model_id, revision, names, trust_remote_code)
    metadata = tuple(name for name in METADATA_FILES if name in serving)
    return RepoPlan(sha=info.sha, metadata_files=metadata, serving_files=serving)


def fetch(model_id: str, revision: str, access: HubAccess, names: Iterable[str], sha: str) -> Path:
    """Download `names` of `model_id` at `revision` into the cache; return the snapshot.

    Files already in the snapshot of `sha` are not downloaded again, and partial ones
    resume. Logs what was downloaded and how many bytes.
    """
    from huggingface_hub import snapshot_download

    wanted = sorted(set(names))
    present = _present(access.cache, model_id, sha, wanted)
    missing = [name for name in wanted if name not in present]
    if missing:
        logger.info(
            "downloading %d files of %s (revision %s) from %s into %s: %s",
            len(missing),
            model_id,
            revision,
            access.endpoint,
            access.cache,
            ", ".join(missing),
        )
    with hub_errors(model_id, revision, access):
        snapshot = Path(
            snapshot_download(
                model_id,
                revision=revision,
                cache_dir=access.cache,
                allow_patterns=[_escape_glob(name) for name in wanted],
                endpoint=access.endpoint,
                token=access.token,
            )
        )
    if missing:
        num_bytes = sum((snapshot / name).stat().st_size for name in missing)
        logger.info(
            "downloaded %s (revision %s, commit %s): %d files, %d bytes, into %s",
            model_id,
            revision,
            snapshot.name,
            len(missing),
            num_bytes,
            snapshot,
        )
    return snapshot


def _present(cache: Path, model_id: str, sha: str, names: list[str]) -> set[str]:
    snapshot = cache / f"models--{model_id.replace('/', '--')}" / "snapshots" / sha
    return {name for name in names if (snapshot / name).is_file()}


def _escape_glob(name: str) -> str:
    # allow_patterns are fnmatch globs; a literal name must not match its neighbours.
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextmanager
def hub_errors(model_id: str, revision: str, access: HubAccess) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP client's errors into `ModelNotFound`."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"hub model {model_id!r}"
    token_hint = (
        "the token sent (HF_TOKEN) has no access to it"
        if access.token
        else "set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) to a token that can read it"
    )
    unreachable: tuple[type[Exception], ...] = (LocalEntryNotFoundError, *_transport_errors())
    try:
        yield
    except GatedRepoError:
        raise ModelNotFound(
            f"{what} is gated: accept its conditions at {access.endpoint}/{model_id} while "
            f"logged in, then {token_hint}"
        ) from None
    except RepositoryNotFoundError as exc:
        raise ModelNotFound(
            f"{what} was not found at {access.endpoint} (HTTP {_status(exc)}): check the "
            f"id; if the repository is private, {token_hint}"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFound(
            f"{what} has no revision {revision!r} at {access.endpoint}: check --revision"
        ) from None
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise ModelNotFound(
                f"the hub at {access.endpoint} refused access to {what} (HTTP {status}): "
                f"{token_hint}"
            ) from None
        raise ModelNotFound(
            f"the hub at {access.endpoint} answered HTTP {status} for {what} (revision "
            f"{revision}): {_first_line(exc)}"
        ) from None
    except unreachable as exc:
        raise ModelNotFound(
            f"{what} (revision {revision}) is not in the Hugging Face cache at "
            f"{access.cache} (or only in part), and the hub at {access.endpoint} cannot be reached "
            f"({type(exc).__name__}: {_first_line(exc)}). Check the network, HF_ENDPOINT "
            "and proxy settings; or, without network, fill the cache elsewhere "
            f"(`hf download {model_id} --cache-dir <dir>`), point HF_HUB_CACHE at it and "
            "set HF_HUB_OFFLINE=1"
        ) from None
    except OSError as exc:
        raise ModelNotFound(
            f"downloading {what} (revision {revision}) into {access.cache} failed: {exc}"
        ) from None


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"


def _transport_errors() -> tuple[type[Exception], ...]:
    """The HTTP client's connection errors: httpx2 or httpx (huggingface_hub >= 1),
    requests (older releases), whichever are installed."""
    errors: list[type[Exception]] = []
    for module_name, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        errors.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(errors)


def restrict_to_index(names: Iterable[str], snapshot: Path) -> tuple[str, ...]:
    """`names` less the *.safetensors that `snapshot`'s safetensors index does not name.

    Some repositories keep a consolidated copy beside the shards (Mistral's
    consolidated.safetensors); only the shards transformers loads are fetched.
    Without an index, `names` is returned unchanged.
    """
    index_path = snapshot / "model.safetensors.index.json"
    if not index_path.is_file():
        return tuple(names)
    try:
        shards = set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelNotFound(f"{index_path} is not a safetensors index: {exc}") from None
    return tuple(n for n in names if not n.endswith(".safetensors") or n in shards)
