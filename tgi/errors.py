"""The exceptions the core raises; `tgi.server.errors` maps each one to an HTTP status."""

from __future__ import annotations


class TgiError(Exception):
    """Base of every error tgi raises on purpose."""


class InvalidRequest(TgiError):
    """The request breaks a validation rule (HTTP 422, `error_type: validation`)."""


class Overloaded(TgiError):
    """Too many requests are in flight (HTTP 429, `error_type: overloaded`)."""


class GenerationError(TgiError):
    """The backend failed while generating (HTTP 424, `error_type: generation`)."""


class BackendUnavailable(TgiError):
    """The backend cannot serve right now (HTTP 503, `error_type: unhealthy`)."""


class BackendError(TgiError):
    """A backend broke its contract or failed to start."""


class ModelNotFound(TgiError):
    """`--model-id` names nothing that can be loaded here."""


class ConfigError(TgiError):
    """A setting is invalid or contradicts another; raised before any weight loads."""


class PluginError(TgiError):
    """A backend plugin failed to load or to answer a hook."""

    def __init__(self, message: str, *, plugin: str) -> None:
        super().__init__(f"plugin {plugin!r}: {message}")
        self.plugin = plugin
