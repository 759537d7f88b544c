"""An engine's identity: the key that names it in the store, and the check that refuses one
built for another TensorRT, GPU or plugin.

Contract:
- ``engine_key`` hashes exactly what makes two engines differ: the ONNX file, the build
  config's hash, the TensorRT version, the GPU's compute capability, the plugin's name and
  version, and the metadata layout (``METADATA_FORMAT``).
- ``check_compatible(metadata)`` raises ``EngineMismatchError`` saying "engine was built for X,
  this is Y" and how to rebuild (an engine of an earlier metadata format, too); ``current_environment()`` is the Y of this process.
Plain functions over plain values; only ``current_environment`` asks TensorRT and the GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from fa3trt._hashing import spec_hash
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.defaults import BUILD_HINT
from fa3trt.errors import EngineMismatchError, MissingDependencyError
from fa3trt.trt import _trt

__all__ = ["METADATA_FORMAT", "engine_key", "current_environment", "check_compatible"]

METADATA_FORMAT = 2
"""Version of the engine metadata layout; bump when a key changes meaning. 2: every engine is
built from a model's signature (inputs bound by name), with its plugin nodes' calls."""


def engine_key(
    onnx_sha256: str, build_config_hash: str, trt_version: str, compute_capability: str, plugin_version: str
) -> str:
    """Store key of an engine: a hash of everything that makes two engines differ."""
    parts = {
        "onnx": onnx_sha256,
        "build": build_config_hash,
        "trt": trt_version,
        "sm": compute_capability,
        "plugin": f"{PLUGIN_NAME}/{plugin_version}",
        "format": METADATA_FORMAT,
    }
    return f"engine-{spec_hash(parts)}"


def current_environment(device: torch.device | int | None = None) -> dict[str, str]:
    """This process's TensorRT version, GPU name and compute capability (needs both)."""
    if not torch.cuda.is_available():
        raise MissingDependencyError("TensorRT engines need a CUDA GPU and none is visible; use backend 'torch'")
    version = _trt.module().__version__
    dev = (
        torch.device("cuda", torch.cuda.current_device())
        if device is None
        else torch.device("cuda", device)
        if isinstance(device, int)
        else device
    )
    major, minor = torch.cuda.get_device_capability(dev)
    return {
        "trt_version": version,
        "gpu_name": torch.cuda.get_device_name(dev),
        "compute_capability": f"{major}.{minor}",
        "plugin_name": PLUGIN_NAME,
        "plugin_version": PLUGIN_VERSION,
    }


def _cc(value: str) -> tuple[int, int]:
    major, _, minor = str(value).partition(".")
    return int(major), int(minor or 0)


_REQUIRED_META = ("trt_version", "compute_capability", "plugin_name", "plugin_version")


def check_compatible(metadata: dict[str, Any], current: dict[str, str] | None = None) -> None:
    """Refuse an engine built for another TensorRT, GPU or plugin: ``EngineMismatchError``.

    ``current`` defaults to ``current_environment()``. TensorRT engines only load in the exact
    TensorRT version that built them; the GPU must have the same compute capability unless the
    engine was built hardware-compatible (``ampere_plus``: any sm80+ GPU).
    """
    cur = current if current is not None else current_environment()
    missing = [k for k in _REQUIRED_META if k not in metadata]
    if missing:
        raise EngineMismatchError(
            f"engine metadata lacks {missing}: it was not built by fa3trt.trt.build (or by an older version); "
            f"rebuild it with `{BUILD_HINT} --force`"
        )
    rebuild = f"rebuild it on this machine with `{BUILD_HINT} --store <uri>`"
    if metadata.get("format") != METADATA_FORMAT:
        raise EngineMismatchError(
            f"engine was built in metadata format {metadata.get('format', 1)!r}, this is format {METADATA_FORMAT} "
            f"(engines of earlier releases are rebuilt once); rebuild it with `{BUILD_HINT} --store <uri> --force`"
        )
    if (metadata["plugin_name"], str(metadata["plugin_version"])) != (cur["plugin_name"], cur["plugin_version"]):
        raise EngineMismatchError(
            f"engine was built for plugin {metadata['plugin_name']} v{metadata['plugin_version']}, "
            f"this is {cur['plugin_name']} v{cur['plugin_version']}; {rebuild}"
        )
    if str(metadata["trt_version"]) != cur["trt_version"]:
        raise EngineMismatchError(
            f"engine was built for TensorRT {metadata['trt_version']}, this is TensorRT {cur['trt_version']}; "
            f"{rebuild} (or install TensorRT {metadata['trt_version']})"
        )
    built, here = _cc(metadata["compute_capability"]), _cc(cur["compute_capability"])
    level = metadata.get("hardware_compatibility_level", "none")
    ok = here >= (8, 0) if level == "ampere_plus" else built == here
    if not ok:
        need = "an sm80+ GPU" if level == "ampere_plus" else f"compute capability {metadata['compute_capability']}"
        raise EngineMismatchError(
            f"engine was built for compute capability {metadata['compute_capability']} "
            f"({metadata.get('gpu_name', 'unknown GPU')}), this is {cur['compute_capability']} "
            f"({cur.get('gpu_name', 'unknown GPU')}); it needs {need}: {rebuild}"
        )
