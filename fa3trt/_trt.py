"""The only module that imports TensorRT. Lazy, cached, with an install hint when missing."""

from __future__ import annotations

import functools
from types import ModuleType

from fa3trt.errors import MissingDependencyError

__all__ = ["trt", "available", "version", "INSTALL_HINT"]

INSTALL_HINT = (
    "install TensorRT 10 for your CUDA version from NVIDIA's Python package index "
    "(pip install 'fa3trt[tensorrt]' with that index configured), on a machine with an NVIDIA GPU"
)


@functools.cache
def _load() -> ModuleType | Exception:
    try:
        import tensorrt
    except Exception as e:  # a broken install raises OSError for a missing libnvinfer, too
        return e
    if not hasattr(tensorrt, "Runtime"):
        # tensorrt-stubs alone installs `tensorrt` as a namespace package of .pyi files.
        return ImportError("only tensorrt-stubs is installed, not TensorRT")
    return tensorrt


def available() -> bool:
    return isinstance(_load(), ModuleType)


def trt() -> ModuleType:
    """The ``tensorrt`` module, or ``MissingDependencyError`` saying how to install it."""
    mod = _load()
    if isinstance(mod, Exception):
        raise MissingDependencyError(f"TensorRT is not importable ({mod}); {INSTALL_HINT}") from mod
    return mod


def version() -> str | None:
    return trt().__version__ if available() else None
