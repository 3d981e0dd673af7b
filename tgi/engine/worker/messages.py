"""The messages of the front-worker channel besides the contract's plans and results.

Everything here is plain frozen data that `tgi.backend.wire` encodes field by field
(msgpack, never pickle). A conversation is strictly request, answer:

    front                                   worker
    StartWorker  ─────────────────────────► load the backend
                 ◄─────────────────────────  WorkerReady | WorkerFailure
    Limits       ─────────────────────────► warmup
                 ◄─────────────────────────  WarmupReport | WorkerFailure
    StepPlan     ─────────────────────────► EngineCore.run
                 ◄─────────────────────────  StepResult
    Release      ─────────────────────────► free sequences outside a step
                 ◄─────────────────────────  KVUsage | WorkerFailure
    Query        ─────────────────────────► kv_usage / health / stats / shutdown
                 ◄─────────────────────────  KVUsage | Done | EngineStats | WorkerFailure
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tgi.backend.contract import Capabilities
from tgi.models.source import ModelFiles, ModelKind

__all__ = [
    "EXIT_PEER_LOST",
    "EXIT_RANK_FAILED",
    "Done",
    "Query",
    "Release",
    "StartWorker",
    "WorkerFailure",
    "WorkerReady",
]

EXIT_PEER_LOST = 4  # a rank's exit status when another rank of its group went away
EXIT_RANK_FAILED = 5  # ... when a call failed on it alone (its state left rank 0's)


@dataclass(frozen=True, slots=True)
class StartWorker:
    """The first message: what to load, as the front process resolved it."""

    config_json: str  # the validated ServeConfig (`model_dump_json`), derived limits included
    backend: str  # the plugin the front process selected
    model_id: str
    model_kind: ModelKind
    model_path: str  # the local transformers directory (`ModelFiles.path`)
    architecture: str | None
    max_position_embeddings: int | None
    sha: str | None
    eos_token_ids: tuple[int, ...]  # for grammar matchers compiled in the worker
    rank: int = 0
    world_size: int = 1

    @classmethod
    def for_model(
        cls, config_json: str, backend: str, files: ModelFiles, eos_token_ids: Iterable[int]
    ) -> StartWorker:
        """The message for `files` (a `ModelFiles` crosses as its fields)."""
        return cls(
            config_json=config_json,
            backend=backend,
            model_id=files.model_id,
            model_kind=files.kind,
            model_path=str(files.path),
            architecture=files.architecture,
            max_position_embeddings=files.max_position_embeddings,
            sha=files.sha,
            eos_token_ids=tuple(sorted(eos_token_ids)),
        )

    def model_files(self) -> ModelFiles:
        """The `ModelFiles` the front process resolved, rebuilt in the worker."""
        return ModelFiles(
            model_id=self.model_id,
            kind=self.model_kind,
            path=Path(self.model_path),
            architecture=self.architecture,
            max_position_embeddings=self.max_position_embeddings,
            sha=self.sha,
        )


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """The backend loaded: what it is, for /info and the policy."""

    capabilities: Capabilities
    dtype: str | None
    device_type: str
    pid: int
    dtype_reason: str | None = None
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Release:
    """Free these sequences now, outside a step (shutdown)."""

    seq_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Query:
    """A call without arguments."""

    call: Literal["collect", "kv_usage", "health", "stats", "shutdown"]


@dataclass(frozen=True, slots=True)
class Done:
    """The call succeeded and returns nothing."""


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """A call raised in the worker; the front process raises it again, by kind."""

    call: str  # what failed: "load", "warmup", "health", ...
    kind: Literal["config", "backend", "unavailable", "other"]
    message: str
