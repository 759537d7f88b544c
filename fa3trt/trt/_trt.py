"""The only module that imports TensorRT: lazily, once, with an install hint when it is missing.

``tensorrt`` is a module-like proxy (after Polygraphy's ``mod.lazy_import``): ``trt.X`` imports
TensorRT on first use. The TensorRT-facing modules write ``trt.Runtime(...)`` against it, and
mypy checks those calls against ``tensorrt-stubs``::

    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        from fa3trt.trt._trt import tensorrt as trt
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from fa3trt.errors import MissingDependencyError

__all__ = ["tensorrt", "module", "available", "require", "version", "INSTALL_HINT"]

INSTALL_HINT = (
    "install TensorRT 10 for your CUDA version from NVIDIA's Python package index "
    "(pip install 'fa3trt[tensorrt]' with that index configured), on a machine with an NVIDIA GPU"
)


@functools.cache
def _load() -> ModuleType | Exception:
    try:
        import tensorrt as trt_module
    except Exception as e:  # a broken install raises OSError for a missing libnvinfer, too
        return e
    if not hasattr(trt_module, "Runtime"):
        # tensorrt-stubs alone installs `tensorrt` as a namespace package of .pyi files.
        return ImportError("only tensorrt-stubs is installed, not TensorRT")
    return trt_module


def available() -> bool:
    """TensorRT imports and is the real library (not only its type stubs)."""
    return isinstance(_load(), ModuleType)


def module() -> ModuleType:
    """The ``tensorrt`` module, or ``MissingDependencyError`` saying how to install it."""
    mod = _load()
    if isinstance(mod, Exception):
        raise MissingDependencyError(f"TensorRT is not importable ({mod}); {INSTALL_HINT}") from mod
    return mod


def require() -> None:
    """Raise ``MissingDependencyError`` with the install hint unless TensorRT imports."""
    module()


def version() -> str | None:
    return str(module().__version__) if available() else None


class _LazyTensorRT:
    """Module-like proxy: attribute access imports TensorRT (``module()``) on first use."""

    def __getattr__(self, name: str) -> Any:
        return getattr(module(), name)


tensorrt: Any = _LazyTensorRT()
