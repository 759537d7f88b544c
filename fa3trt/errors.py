"""The project's exception tree.

Every message names the offending value and says how to fix it. Client mistakes
(`InvalidInputError`) are recoverable and map to 4xx answers; the rest are
configuration or environment problems that stop a stage before it does harm.
"""

from __future__ import annotations

__all__ = [
    "Fa3TrtError",
    "InvalidInputError",
    "ConfigError",
    "MissingDependencyError",
    "EngineNotFoundError",
    "EngineMismatchError",
    "EngineCorruptError",
    "PluginNotRegisteredError",
    "ExportError",
    "CudnnGraphUnsupportedError",
]


class Fa3TrtError(Exception):
    """Base class of every error this project raises on purpose."""


class InvalidInputError(Fa3TrtError, ValueError):
    """A caller passed a tensor or request the model cannot take (a 4xx, never a 5xx)."""


class ConfigError(Fa3TrtError, ValueError):
    """A configuration value is out of range or inconsistent with another one."""


class MissingDependencyError(Fa3TrtError, ImportError):
    """An optional dependency (TensorRT, CUDA, FA3, ...) is needed for what was asked."""


class EngineNotFoundError(Fa3TrtError, LookupError):
    """No engine for this key in the store; the message names the build command."""


class EngineMismatchError(Fa3TrtError):
    """An engine was built for another GPU / TensorRT / plugin than this process has."""


class EngineCorruptError(Fa3TrtError):
    """A stored artifact failed its checksum or could not be parsed."""


class PluginNotRegisteredError(Fa3TrtError, RuntimeError):
    """The TensorRT plugin was not registered in this process before a parse or deserialize."""


class ExportError(Fa3TrtError, RuntimeError):
    """Exporting the model to ONNX failed or produced a graph that fails verification."""


class CudnnGraphUnsupportedError(Fa3TrtError, RuntimeError):
    """cuDNN refused (or failed to build) its ragged attention graph for a shape; the caller falls back."""
