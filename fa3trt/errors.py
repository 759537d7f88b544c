"""The project's exception tree: every exception class of ``fa3trt``, ``deploy`` and ``build_jobs``.

Every message names the offending value and says how to fix it. Client mistakes
(`InvalidInputError`; `RequestError` for what the HTTP layer refuses) are recoverable and map
to 4xx answers; the rest are configuration or environment problems that stop a stage before it
does harm, or failures of a build or a run that name what failed. Store errors are named for
artifacts (`ArtifactNotFoundError`, `ArtifactCorruptError`: ONNX exports, weights, build
records, timing caches); their `Engine...` subclasses are raised for TensorRT engines, so
catching the artifact class catches both.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Fa3TrtError",
    "InvalidInputError",
    "RequestError",
    "ConfigError",
    "MissingDependencyError",
    "ArtifactNotFoundError",
    "ArtifactCorruptError",
    "EngineNotFoundError",
    "EngineMismatchError",
    "EngineCorruptError",
    "EngineBuildError",
    "EngineExecutionError",
    "BuildItemError",
    "RayUnavailableError",
    "PluginNotRegisteredError",
    "ExportError",
    "CudnnGraphUnsupportedError",
]


class Fa3TrtError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(Fa3TrtError, ValueError):
    """A caller passed a tensor or request the model cannot take (a 4xx, never a 5xx)."""


class RequestError(InvalidInputError):
    """An HTTP request refused before its input is looked at, with the answer's ``status``.

    400: the body could not be parsed at all (where a well-formed but invalid input is an
    ``InvalidInputError``, 422); 413: the body is too large; 415: its Content-Type is not served.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class DeadlineError(RequestError):
    """A generation refused at admission: its deadline cannot be met (HTTP 429). ``estimate_s``
    is the time it would have taken, from now."""

    def __init__(self, message: str, estimate_s: float) -> None:
        super().__init__(message, status=429)
        self.estimate_s = estimate_s

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles it back to the caller
        return (type(self), (str(self), self.estimate_s))


class ConfigError(Fa3TrtError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class MissingDependencyError(Fa3TrtError, ImportError):
    """An optional dependency (TensorRT, CUDA, FA3, ...) is needed for what was asked."""


class ArtifactNotFoundError(Fa3TrtError, LookupError):
    """No entry of this kind and key in the store; the message names the build command."""


class EngineNotFoundError(ArtifactNotFoundError):
    """No engine for this key in the store; the message names the build command."""


class EngineMismatchError(Fa3TrtError):
    """An engine was built for another GPU / TensorRT / plugin than this process has."""


class ArtifactCorruptError(Fa3TrtError):
    """A stored artifact failed its checksum or could not be parsed; the message says how to rebuild it."""


class EngineCorruptError(ArtifactCorruptError):
    """A stored engine failed its checksum, or TensorRT could not deserialize it or it does not match its metadata."""


class EngineBuildError(Fa3TrtError, RuntimeError):
    """TensorRT or its ONNX parser failed to build an engine; the parser's errors are logged."""


class EngineExecutionError(Fa3TrtError, RuntimeError):
    """TensorRT refused a shape or address, or ``execute_async_v3`` returned False."""


class BuildItemError(Fa3TrtError, RuntimeError):
    """A build item failed in its worker; the message names the item, the worker and the cause."""

    def __init__(self, message: str, where: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.where = dict(where or {})

    def __reduce__(self) -> tuple[Any, ...]:  # Ray pickles it back to the driver
        return (type(self), (str(self), self.where))


class RayUnavailableError(Fa3TrtError, ConnectionError):
    """The Ray cluster could not be started or reached; nothing was built."""


class PluginNotRegisteredError(Fa3TrtError, RuntimeError):
    """The TensorRT plugin was not registered in this process before a parse or deserialize."""


class ExportError(Fa3TrtError, RuntimeError):
    """Exporting the model to ONNX failed or produced a graph that fails verification."""


class CudnnGraphUnsupportedError(Fa3TrtError, RuntimeError):
    """cuDNN refused (or failed to build) its ragged attention graph for a shape; the caller falls back."""
