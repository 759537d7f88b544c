"""Build TensorRT engines: ONNX bytes in, engine bytes plus metadata out.

Contract:
- ``BuildConfig`` holds everything that shapes an engine besides the ONNX file. One
  optimization profile per sequence-length bucket (``profiles``: batch 1..limit, sequence
  ``buckets.lower(i)``..edge, optimized for a full batch at the edge). Networks are strongly
  typed (the ONNX dtypes decide precisions, no builder precision flags).
- ``build_engine(onnx_path, config)`` returns ``(engine_bytes, metadata)``: TensorRT version,
  GPU name and compute capability, plugin name/version/namespace, ONNX sha256, config hash and
  the bucket -> profile map. It needs the plugin registered (``PluginNotRegisteredError``).
- ``build_to_store`` / ``engine_key_for`` are what build workers and replicas call; the key
  and the compatibility check are ``fa3trt.trt.compat``'s.

The decisions (profiles, hashes) are plain functions tested without TensorRT; only
``build_engine`` touches it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fa3trt._hashing import spec_hash
from fa3trt.artifacts import ensure_onnx, onnx_key, weights_digest
from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.buckets import Buckets
from fa3trt.defaults import BUCKETS, MAX_BATCH_TOKENS
from fa3trt.errors import ArtifactNotFoundError, ConfigError, EngineBuildError, EngineNotFoundError
from fa3trt.models.reference import ModelConfig
from fa3trt.onnx.export import file_sha256
from fa3trt.store import BUILD_HINT, ArtifactStore
from fa3trt.trt.compat import METADATA_FORMAT, current_environment, engine_key
from fa3trt.trt.plugin import register_plugin, require_registered

if TYPE_CHECKING:
    import tensorrt as trt  # static only: checked against tensorrt-stubs
else:
    from fa3trt.trt._trt import tensorrt as trt

__all__ = [
    "BuildConfig",
    "ProfileSpec",
    "HASH_IGNORES",
    "DEFAULT_MAX_BATCH_TOKENS",
    "profiles",
    "onnx_hidden",
    "build_engine",
    "engine_bytes",
    "build_metadata",
    "ProfileShapes",
    "engine_key_for",
    "build_to_store",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = MAX_BATCH_TOKENS
"""Token budget per batch when none is given (``fa3trt.defaults``, as the serve config's)."""
INPUT_X = "x"
INPUT_SEQ_LENS = "seq_lens"
OUTPUT_Y = "y"

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


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile: the (batch, seq) box of one bucket."""

    index: int
    bucket_edge: int
    batch: tuple[int, int, int]
    """(min, opt, max)."""
    seq: tuple[int, int, int]
    """(min, opt, max)."""

    def shapes(self, hidden: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """(min, opt, max) shapes of each engine input for this profile."""
        x = tuple((b, s, hidden) for b, s in zip(self.batch, self.seq))
        lens = tuple((b,) for b in self.batch)
        return {INPUT_X: (x[0], x[1], x[2]), INPUT_SEQ_LENS: (lens[0], lens[1], lens[2])}

    def admits(self, batch: int, seq: int) -> bool:
        return self.batch[0] <= batch <= self.batch[2] and self.seq[0] <= seq <= self.seq[2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.index,
            "bucket_edge": self.bucket_edge,
            "batch": list(self.batch),
            "seq": list(self.seq),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileSpec:
        b, s = d["batch"], d["seq"]
        return cls(
            int(d["profile"]),
            int(d["bucket_edge"]),
            (int(b[0]), int(b[1]), int(b[2])),
            (int(s[0]), int(s[1]), int(s[2])),
        )


def profiles(buckets: Buckets, max_batch_tokens: int) -> list[ProfileSpec]:
    """One profile per bucket: batch 1..limit, seq ``lower(i)``..edge, opt = (limit, edge).

    Opt is the full batch at the edge: under load batches fill to their limit, which is where
    throughput is decided; the padded batch of a bucket never exceeds its edge.
    """
    if max_batch_tokens < 1:
        raise ConfigError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    out = []
    for i, edge in enumerate(buckets.edges):
        limit = buckets.batch_limit(i, max_batch_tokens)
        out.append(ProfileSpec(i, edge, (1, limit, limit), (buckets.lower(i), edge, edge)))
    return out


def onnx_hidden(onnx_path: str | os.PathLike[str]) -> int:
    """The model width D: the static last dim of the ONNX input ``x`` (B, S, D)."""
    import onnx

    proto = onnx.load(os.fspath(onnx_path), load_external_data=False)
    for inp in proto.graph.input:
        if inp.name == INPUT_X:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) == 3 and dims[2].dim_value > 0:
                return int(dims[2].dim_value)
            raise ConfigError(f"ONNX input {INPUT_X!r} of {onnx_path} must be (B, S, D) with a static D; re-export it")
    raise ConfigError(f"{onnx_path} has no input named {INPUT_X!r}; export it with fa3trt.onnx.export.export_onnx")


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


def build_engine(onnx_path: str | os.PathLike[str], config: BuildConfig) -> tuple[bytes, dict[str, Any]]:
    """Build the reference model's engine from ``onnx_path``; returns (bytes, metadata).

    ``fa3trt.trt.named_build.build_named_engine`` is the same for a model described by a ``Signature``.
    """
    require_registered(config.plugin_namespace)
    env = current_environment()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file {onnx_path} does not exist; export it first (fa3trt.artifacts.ensure_onnx)")
    hidden = onnx_hidden(onnx_path)
    specs = profiles(config.buckets, config.max_batch_tokens)
    data, seconds = engine_bytes(onnx_path, config, [s.shapes(hidden) for s in specs])
    meta: dict[str, Any] = {
        **build_metadata(onnx_path, config, env),
        "hidden": hidden,
        "profiles": [s.to_dict() for s in specs],
        "bucket_to_profile": {str(s.bucket_edge): s.index for s in specs},
        "build_seconds": round(seconds, 3),
        "built_at": time.time(),
    }
    log.info("built engine from %s in %.1fs (%d bytes, %d profiles)", onnx_path.name, seconds, len(data), len(specs))
    return data, meta


def _build_config(buckets: Buckets, max_batch_tokens: int, build_config: BuildConfig | None) -> BuildConfig:
    if build_config is None:
        return BuildConfig(buckets=buckets, max_batch_tokens=max_batch_tokens)
    if build_config.buckets != buckets or build_config.max_batch_tokens != max_batch_tokens:
        raise ConfigError(
            f"build_config has buckets {list(build_config.buckets.edges)} and max_batch_tokens "
            f"{build_config.max_batch_tokens}, the call passed {list(buckets.edges)} and {max_batch_tokens}; pass the same"
        )
    return build_config


def _onnx_sha256(store: ArtifactStore, model_config: ModelConfig, weights: str | os.PathLike[str] | None) -> str:
    key = onnx_key(model_config, weights)
    meta = store.metadata("onnx", key)  # ArtifactNotFoundError naming the build command if absent
    return str(meta.get("onnx_sha256") or meta["sha256"])


def engine_key_for(
    store: ArtifactStore,
    model_config: ModelConfig,
    weights: str | os.PathLike[str] | None,
    buckets: Buckets,
    max_batch_tokens: int,
    *,
    build_config: BuildConfig | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """The store key of this GPU's engine for (model, weights, buckets, token budget).

    Needs the model's ONNX in the store (every build puts it there); without it there can be
    no engine either, and ``EngineNotFoundError`` names the build command.
    """
    cfg = _build_config(buckets, max_batch_tokens, build_config)
    env = env or current_environment()
    try:
        sha = _onnx_sha256(store, model_config, weights)
    except ArtifactNotFoundError:
        raise EngineNotFoundError(
            f"no engine for model {model_config.name} ({weights_digest(model_config, weights)}) in store {store.uri}: "
            f"its ONNX was never exported there, so nothing was built; run `{BUILD_HINT} --store {store.uri}`"
        ) from None
    return engine_key(sha, cfg.compute_hash(), env["trt_version"], env["compute_capability"], PLUGIN_VERSION)


def build_to_store(
    store: ArtifactStore,
    model_config: ModelConfig,
    weights: str | os.PathLike[str] | None,
    buckets: Buckets,
    *,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    force: bool = False,
    workdir: str | os.PathLike[str] | None = None,
    build_config: BuildConfig | None = None,
) -> dict[str, Any]:
    """Build this GPU's engine for a model spec and put it in the store; returns its metadata.

    Registers the plugin, exports (or fetches) the ONNX through the store, builds with the
    store's timing cache for this (GPU, TensorRT version) and writes the cache back. An engine
    already in the store is returned as is unless ``force``. Concurrent builders of one key
    both succeed (the store's writes are atomic); the timing cache is last-writer-wins, which
    only costs build time.
    """
    cfg = _build_config(buckets, max_batch_tokens, build_config)
    register_plugin(cfg.plugin_namespace)
    env = current_environment()
    with tempfile.TemporaryDirectory(prefix="fa3trt-build-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        onnx_path, onnx_meta = ensure_onnx(store, model_config, weights, work)
        sha = str(onnx_meta.get("onnx_sha256") or file_sha256(onnx_path))
        key = engine_key(sha, cfg.compute_hash(), env["trt_version"], env["compute_capability"], PLUGIN_VERSION)
        if store.has("engines", key) and not force:
            log.info("engine %s already in %s; pass force=True to rebuild", key, store.uri)
            return store.metadata("engines", key)
        gpu_type = f"{env['gpu_name']}-sm{env['compute_capability']}"
        tpath = work / "timing.cache"
        if (cache := store.get_timing_cache(gpu_type, env["trt_version"])) is not None:
            tpath.write_bytes(cache)  # a corrupt cache comes back as None and is not fed to TensorRT
        cfg = dataclasses.replace(cfg, timing_cache_path=str(tpath))
        data, meta = build_engine(onnx_path, cfg)
        meta.update(
            key=key,
            onnx_key=onnx_key(model_config, weights),
            model=model_config.to_dict(),
            weights=weights_digest(model_config, weights),
        )
        meta["build_config"]["timing_cache_path"] = None  # a worker's temp path means nothing elsewhere
        if tpath.exists():
            store.put_timing_cache(gpu_type, env["trt_version"], tpath.read_bytes())
        return store.put("engines", key, data, meta)
