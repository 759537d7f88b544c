"""Build TensorRT engines: an ONNX file and the model's ``Signature`` in, engine bytes plus
metadata out.

Contract:
- ``BuildConfig`` holds everything that shapes an engine besides the ONNX file. One
  optimization profile per bucket over every named axis of the signature
  (``fa3trt.trt.profiles``). Networks are strongly typed (the ONNX dtypes decide precisions, no
  builder precision flags).
- ``check_onnx_signature(onnx_path, signature)`` compares the file's graph inputs and output
  with the signature before anything is built: names, ranks, dtypes (``int64`` declared is
  ``int32`` in the graph: ``fa3trt.onnx.calls``), fixed sizes, and named axes left dynamic. A
  difference is a ``ConfigError`` naming the input and the fix.
- ``build_engine(onnx_path, signature, config)`` returns ``(engine_bytes, metadata)``: TensorRT
  version, GPU name and compute capability, plugin name/version/namespace, the metadata format,
  the ONNX sha256, the build config and its hash, the signature, the profiles, the bucket ->
  profile map and the plugin nodes' calls (mode, head dim: a replica refuses an FP8 engine on a
  GPU without an FP8 kernel before loading it). It needs the plugin registered
  (``PluginNotRegisteredError``).
- ``build_hash(config, signature)`` is what of the build its engine's store key hashes
  (``fa3trt.trt.compat.engine_key`` adds the ONNX file, TensorRT, the GPU and the plugin).

The decisions (profiles, hashes, checks) are plain functions tested without TensorRT; only
``engine_bytes`` touches it. Where the ONNX comes from and where engines are kept is
``fa3trt.artifacts``'s business: this module imports no model, exporter or store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fa3trt._hashing import file_sha256, spec_hash
from fa3trt.attention.op import PLUGIN_NAME
from fa3trt.buckets import Buckets
from fa3trt.defaults import BUCKETS, MAX_BATCH_TOKENS
from fa3trt.errors import ConfigError, EngineBuildError
from fa3trt.onnx.graph import graph_io, plugin_calls
from fa3trt.signature import Signature
from fa3trt.trt.compat import METADATA_FORMAT, current_environment
from fa3trt.trt.plugin import require_registered
from fa3trt.trt.profiles import batch_limits, engine_signature, io_differences, profiles

if TYPE_CHECKING:
    import tensorrt as trt  # static only: checked against tensorrt-stubs
else:
    from fa3trt.trt._trt import tensorrt as trt

__all__ = [
    "BuildConfig",
    "HASH_IGNORES",
    "DEFAULT_MAX_BATCH_TOKENS",
    "ProfileShapes",
    "check_onnx_signature",
    "build_engine",
    "engine_bytes",
    "build_metadata",
    "build_hash",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = MAX_BATCH_TOKENS
"""Token budget per batch when none is given (``fa3trt.defaults``, as the serve config's)."""

_HW_LEVELS = ("none", "ampere_plus", "same_compute_capability")

HASH_IGNORES: tuple[str, ...] = ("timing_cache_path",)
"""BuildConfig fields that do not change the engine: a timing cache only makes the build faster."""


@dataclass(frozen=True)
class BuildConfig:
    """How to build one engine from one ONNX file, one docstring per field; the defaults shared with
    the serve config come from ``fa3trt.defaults``."""

    buckets: Buckets = field(default_factory=lambda: Buckets(BUCKETS))
    """Sequence-length bucket edges; one optimization profile per bucket."""
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    """Token budget per batch: a bucket's largest batch is this divided by its edge."""
    workspace_bytes: int | None = None
    """Builder workspace pool limit; None keeps TensorRT's default (the GPU's memory)."""
    timing_cache_path: str | None = None
    """File to load and save the builder's timing cache; ignored by the hash (speed only)."""
    hardware_compatibility_level: str = "none"
    """'none' (this GPU's compute capability), 'ampere_plus' or 'same_compute_capability'."""
    builder_optimization_level: int | None = None
    """0..5; None keeps TensorRT's default (3). Higher builds longer for faster kernels."""
    plugin_namespace: str = ""
    """Namespace the plugin is registered under; must match the ONNX nodes' plugin_namespace."""

    def __post_init__(self) -> None:
        if not isinstance(self.buckets, Buckets):
            object.__setattr__(self, "buckets", Buckets(tuple(self.buckets)))
        if not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 1:
            raise ConfigError(f"BuildConfig.max_batch_tokens must be an integer >= 1, got {self.max_batch_tokens!r}")
        if self.workspace_bytes is not None and (
            not isinstance(self.workspace_bytes, int) or self.workspace_bytes < 1 << 20
        ):
            raise ConfigError(
                f"BuildConfig.workspace_bytes must be None or an integer >= 1 MiB, got {self.workspace_bytes!r}"
            )
        if self.hardware_compatibility_level not in _HW_LEVELS:
            raise ConfigError(
                f"BuildConfig.hardware_compatibility_level={self.hardware_compatibility_level!r}; use one of {_HW_LEVELS}"
            )
        level = self.builder_optimization_level
        if level is not None and (not isinstance(level, int) or not 0 <= level <= 5):
            raise ConfigError(f"BuildConfig.builder_optimization_level must be None or 0..5, got {level!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["buckets"] = list(self.buckets.edges)
        return d

    def compute_hash(self) -> str:
        """Hash of every field that changes the engine; ``HASH_IGNORES`` lists the others."""
        d = self.to_dict()
        for name in HASH_IGNORES:
            d.pop(name)
        return spec_hash(d)


# --------------------------------------------------------------------------- building
def _hw_level(name: str) -> Any:
    return {
        "none": trt.HardwareCompatibilityLevel.NONE,
        "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
        "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
    }[name]


ProfileShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
"""One optimization profile as TensorRT takes it: per input name its (min, opt, max) shape."""


def engine_bytes(
    onnx_path: str | os.PathLike[str], config: BuildConfig, profile_shapes: list[ProfileShapes]
) -> tuple[bytes, float]:
    """Build ``onnx_path`` with one optimization profile per entry of ``profile_shapes`` through
    polygraphy's loaders; returns (engine bytes, build seconds).

    The plugin must be registered in this process first (``fa3trt.trt.plugin.register_plugin``).
    Every ONNX parser error is logged by polygraphy before this raises ``EngineBuildError``.
    """
    require_registered(config.plugin_namespace)
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    trt_profiles = []
    for shapes in profile_shapes:
        p = Profile()
        for name, (lo, opt, hi) in shapes.items():
            p.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(p)
    pools = {trt.MemoryPoolType.WORKSPACE: config.workspace_bytes} if config.workspace_bytes else None
    timing = config.timing_cache_path
    create_config = CreateConfig(
        profiles=trt_profiles,
        memory_pool_limits=pools,
        load_timing_cache=timing if timing and os.path.exists(timing) else None,
        hardware_compatibility_level=_hw_level(config.hardware_compatibility_level)
        if config.hardware_compatibility_level != "none"
        else None,
        builder_optimization_level=config.builder_optimization_level,
    )
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
    t0 = time.perf_counter()
    try:
        engine = EngineBytesFromNetwork(network, create_config, save_timing_cache=timing)()
    except PolygraphyException as e:
        raise EngineBuildError(
            f"TensorRT could not build {onnx_path}: {e}. The ONNX parser's errors are logged above; an "
            f"'unsupported operator {PLUGIN_NAME}' error means the plugin's namespace "
            f"({config.plugin_namespace!r}) differs from the nodes' plugin_namespace attribute"
        ) from e
    return bytes(engine), time.perf_counter() - t0


def build_metadata(onnx_path: str | os.PathLike[str], config: BuildConfig, env: dict[str, str]) -> dict[str, Any]:
    """The metadata every engine carries: environment, ONNX hash and build config."""
    return {
        "format": METADATA_FORMAT,
        **env,
        "plugin_namespace": config.plugin_namespace,
        "onnx_sha256": file_sha256(onnx_path),
        "build_config": config.to_dict(),
        "build_config_hash": config.compute_hash(),
        "hash_ignores": list(HASH_IGNORES),
        "hardware_compatibility_level": config.hardware_compatibility_level,
    }


def check_onnx_signature(onnx_path: str | os.PathLike[str], signature: Signature) -> None:
    """``ConfigError`` naming every input of ``onnx_path`` that disagrees with ``signature``."""
    io, dims = graph_io(onnx_path)
    problems = io_differences(signature, io)
    for t in signature.inputs:
        if t.name not in dims or len(dims[t.name]) != len(t.axes) + (1 if t.batched else 0):
            continue  # reported above
        got = dims[t.name][1:] if t.batched else dims[t.name]
        if t.batched and not isinstance(dims[t.name][0], str):
            problems.append(f"input {t.name!r}: the batch axis is static ({dims[t.name][0]}) in the graph")
        for i, (want, have) in enumerate(zip(t.axes, got)):
            if isinstance(want, int) and have not in (want, 0):
                problems.append(f"input {t.name!r}: axis {i} has size {have} in the graph; declared {want}")
            if isinstance(want, str) and not isinstance(have, str):
                problems.append(f"input {t.name!r}: axis {want} came out static ({have}) in the graph")
    if problems:
        raise ConfigError(
            f"ONNX file {onnx_path} does not match the model's signature: {'; '.join(problems)}. Fix: export "
            "it from the model's spec (fa3trt.artifacts.ensure_onnx), or correct the signature"
        )


def build_hash(config: BuildConfig, signature: Signature) -> str:
    """What of a build its engine's key hashes: the build config and the engine-shaping part of
    the signature (its axes, ranges and steps decide the profiles)."""
    return spec_hash({"build": config.compute_hash(), "signature": engine_signature(signature)})


def build_engine(
    onnx_path: str | os.PathLike[str], signature: Signature, config: BuildConfig
) -> tuple[bytes, dict[str, Any]]:
    """Build the engine of ``onnx_path`` (see the module docstring); returns (bytes, metadata).

    The plugin must be registered in this process first (``fa3trt.trt.plugin.register_plugin``)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist; export it first (fa3trt.artifacts.ensure_onnx)")
    check_onnx_signature(onnx_path, signature)  # before the GPU and TensorRT are asked anything
    env = current_environment()
    specs = profiles(signature, config.buckets, batch_limits(config.buckets, config.max_batch_tokens))
    data, seconds = engine_bytes(onnx_path, config, [s.shapes for s in specs])
    meta: dict[str, Any] = {
        **build_metadata(onnx_path, config, env),
        "signature": signature.to_dict(),
        "profiles": [s.to_dict() for s in specs],
        "bucket_to_profile": {str(s.bucket_edge): s.index for s in specs},
        "plugin_calls": plugin_calls(onnx_path),
        "build_hash": build_hash(config, signature),
        "build_seconds": round(seconds, 3),
        "built_at": time.time(),
    }
    log.info("built engine from %s in %.1fs (%d bytes, %d profiles)", onnx_path.name, seconds, len(data), len(specs))
    return data, meta
