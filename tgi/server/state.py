"""What the HTTP layer needs from a running server, handed to routes through `Depends`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from anyio import CapacityLimiter
from fastapi import Request

from tgi.backend.contract import Capabilities, KVCapacity, StepConstraints
from tgi.config import ServeConfig
from tgi.metrics import Metrics
from tgi.router.router import Router
from tgi.router.validation import Validator

__all__ = ["ServedModel", "ServerState", "get_state"]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """What /info says about the model and the backend serving it."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    backend: str  # the plugin's name, e.g. "cpu"
    backend_version: str
    device_type: str  # what the backend runs on, e.g. "cpu", "neuron (emulated)"
    capabilities: Capabilities
    capacity: KVCapacity
    constraints: StepConstraints = field(default_factory=StepConstraints)  # from warmup


@dataclass(slots=True)
class ServerState:
    config: ServeConfig
    model: ServedModel
    router: Router
    validator: Validator
    tokenizer: Any  # a transformers tokenizer
    metrics: Metrics
    # `--validation-workers`, TGI's tokenizer workers: how many threads may tokenize and
    # template requests at once (`tgi.server.serving.on_validation_workers`)
    validation_workers: CapacityLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.validation_workers = CapacityLimiter(self.config.validation_workers)


def get_state(request: Request) -> ServerState:
    """FastAPI dependency; tests override it with `app.dependency_overrides`."""
    state: ServerState = request.app.state.tgi
    return state
