"""The TensorRT backend: this GPU's engine of any model, from the store.

Contract: ``TensorRTBackend.load(spec, buckets=..., store=..., max_batch_tokens=...)`` finds the
engine of (model, buckets, token budget) for this GPU and TensorRT version in the store
(``fa3trt.artifacts.engine_key_for``); with ``build_if_missing`` it exports the model and builds
the engine first (``fa3trt.artifacts.build_to_store``), else a missing engine is an
``EngineNotFoundError`` naming the build command. The engine is checked against the model's
signature at load (``fa3trt.trt.runtime.TRTEngine``). ``run(batch)`` binds the batch's inputs by
name and returns a copy of the output on the device; batches on different streams take turns on
a profile (``ProfileTurns``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from fa3trt.artifacts import build_config, build_to_store, engine_key_for
from fa3trt.buckets import Buckets
from fa3trt.defaults import BUILD_HINT
from fa3trt.errors import EngineNotFoundError
from fa3trt.models.sources import model_id
from fa3trt.models.spec import AnyModelSpec
from fa3trt.serving.backends import describe_device
from fa3trt.store import ArtifactStore
from fa3trt.trt.compat import current_environment
from fa3trt.trt.plugin import register_plugin
from fa3trt.trt.runtime import ProfileTurns, TRTEngine

__all__ = ["TensorRTBackend"]

log = logging.getLogger(__name__)


class TensorRTBackend:
    """The backend protocol on a ``TRTEngine`` (see the module docstring)."""

    name = "tensorrt"
    lengths_on_device = True  # the engine binds device addresses

    def __init__(self, engine: TRTEngine, spec: AnyModelSpec, *, key: str, store_uri: str, buckets: Buckets) -> None:
        self.engine = engine
        self.spec = spec
        self.signature = spec.signature()
        self.device = engine.device
        self.dtype: torch.dtype = getattr(torch, spec.model_dtype)
        self.key = key
        self.store_uri = store_uri
        self.buckets = buckets
        self._turns = ProfileTurns()

    @classmethod
    def load(
        cls,
        spec: AnyModelSpec,
        *,
        buckets: Buckets,
        store: str | ArtifactStore | None,
        max_batch_tokens: int,
        device: torch.device | str | None = None,
        build_if_missing: bool = False,
    ) -> TensorRTBackend:
        """This GPU's engine of ``spec`` from ``store`` (see the module docstring)."""
        st = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        config = build_config(buckets, max_batch_tokens)
        env = current_environment()  # a GPU and TensorRT, or an error saying which is missing
        register_plugin()
        key: str | None
        try:
            key = engine_key_for(st, spec, config, env)
        except EngineNotFoundError:
            key = None  # no ONNX in the store yet, so no engine either
        if key is None or not st.has("engines", key):
            if not build_if_missing:
                raise EngineNotFoundError(
                    f"no TensorRT engine in store {st.uri} for {spec.describe()} with buckets {list(buckets.edges)} "
                    f"and max_batch_tokens {max_batch_tokens} on this GPU ({env['gpu_name']}, "
                    f"sm{env['compute_capability']}, TensorRT {env['trt_version']}): build it with "
                    f"`{BUILD_HINT} --store {st.uri}`, or start with build_if_missing"
                )
            log.info("no engine in %s for %s on this GPU: exporting and building it now", st.uri, spec.describe())
            with tempfile.TemporaryDirectory(prefix="fa3trt-build-") as tmp:
                key = str(build_to_store(st, spec, buckets, max_batch_tokens, tmp, config=config)["key"])
        data, meta = st.get("engines", key)
        engine = TRTEngine.from_bytes(data, meta, expected=spec.signature(), device=device, environment=env)
        log.info("loaded engine %s of %s from %s on %s", key, spec.describe(), st.uri, env["gpu_name"])
        return cls(engine, spec, key=key, store_uri=st.uri, buckets=buckets)

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The output (B, ...) of one batch, on the device: a copy of the profile's buffer."""
        stream = torch.cuda.current_stream(self.device)
        p = self.engine.profile_for(batch)
        return self._turns.run(p, stream, lambda: self.engine(batch))

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        for batch in batches:
            self.run(batch)
        torch.cuda.synchronize(self.device)
        log.info("tensorrt backend warmed %d batches in %.2fs", len(batches), time.perf_counter() - t0)

    def batch_rows(self, b: int) -> int:
        return b  # a profile takes any batch up to its largest

    def describe(self) -> dict[str, Any]:
        return describe_device(self.name, self.device, self.spec.model_dtype, "plugin") | {
            "model": {"spec": self.spec.describe(), "model_id": model_id(self.spec)},
            "buckets": list(self.buckets.edges),
            "store": self.store_uri,
            "engine": self.engine.describe(),
        }
