"""The hooks a backend plugin implements. Hooks only ever gain arguments, never renames.

A plugin is one module registered under the entry-point group `tgi.backends`; it
implements all three hooks below with `@tgi.backend.hookimpl`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tgi.backend.contract import Backend
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

PROJECT = "tgi"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "BackendProbe", "hookimpl", "hookspec"]


@dataclass(frozen=True, slots=True)
class BackendProbe:
    """A backend's answer to "can you run here?", cheap enough to ask at every start."""

    name: str  # what `--backend` names, e.g. "cpu"
    version: str  # the plugin's version
    available: bool  # its hardware and libraries are present
    reason: str  # why not, or what was found
    priority: int  # higher wins when no backend is named
    batching: str  # the batching policy it uses, for `tgi backends`
    emulated: bool = False  # runs on hardware other than its name says (never auto-picked)


@hookspec
def tgi_backend_probe(environ: Mapping[str, str]) -> BackendProbe:  # type: ignore[empty-body]
    """Say who you are and whether your hardware is here. Must not load weights.

    `environ` is the environment at start-up (opt-in: a hookimpl may omit it); read
    your own settings from it, never from `os.environ`.
    """
    ...


@hookspec(firstresult=True)
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """Check the settings before any weight loads; called on the chosen backend only.

    Return an adjusted copy (`config.with_values("backend <name>", ...)`) or None to
    keep it; raise `tgi.errors.ConfigError` naming the flag, its source and the fix.
    """
    ...


@hookspec(firstresult=True)
def tgi_backend_create(config: ServeConfig, model: ModelFiles) -> Backend:  # type: ignore[empty-body]
    """Build the backend and load the weights; called on the chosen backend only."""
    ...
