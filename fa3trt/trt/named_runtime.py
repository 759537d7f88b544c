"""Run the engine of any model described by a ``Signature``: inputs and output bound by name.

Contract:
- ``NamedTRTEngine.from_bytes(data, metadata, expected=...)`` refuses an engine built for
  another TensorRT, GPU or plugin before deserializing it (``fa3trt.trt.compat``), then checks the
  metadata's signature against the engine's IO tensors (names, dtypes, ranks:
  ``EngineCorruptError``) and against the signature the server expects
  (``EngineMismatchError`` naming each difference), and makes one execution context per
  optimization profile with an output buffer sized from the engine's output shape at the
  profile's max input shapes.
- A call takes the batch's keyword tensors (``Signature.assemble``'s form), picks the profile
  (``fa3trt.trt.profiles.select_named_profile``), binds every input by name (moved to the device
  and converted to the engine's dtype only when needed; ``int64`` to ``int32`` after a range
  check naming the input), sets its shapes, binds the output at the shape the engine gives
  for them and runs ``execute_async_v3`` on the current stream. The output is a view of the
  profile's buffer, valid until the next call on that profile (the backend hands out copies).
- ``NamedTensorRTBackend`` is the named-backend protocol (``name``, ``device``,
  ``signature``, ``run(batch)``, ``warmup(batches)``, ``describe()``) over such an engine,
  loaded from the store by ``load(signature, model_id, ...)``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import (
    ConfigError,
    EngineCorruptError,
    EngineExecutionError,
    EngineMismatchError,
    EngineNotFoundError,
    InvalidInputError,
)
from fa3trt.signature import TORCH_DTYPES, Signature
from fa3trt.store import BUILD_HINT, ArtifactStore
from fa3trt.trt.build import DEFAULT_MAX_BATCH_TOKENS, BuildConfig
from fa3trt.trt.compat import current_environment
from fa3trt.trt.named_build import named_engine_key_for
from fa3trt.trt.profiles import NamedProfile, io_differences, select_named_profile, signature_differences
from fa3trt.trt.runtime import ProfileTurns, deserialize_engine

if TYPE_CHECKING:
    import tensorrt as trt  # static only: checked against tensorrt-stubs
else:
    from fa3trt.trt._trt import tensorrt as trt

__all__ = ["NamedTRTEngine", "NamedTensorRTBackend", "TRT_DTYPE_NAMES", "narrow_to_engine"]

log = logging.getLogger(__name__)

TRT_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}
"""TensorRT's ``DataType`` names in the signature's dtype vocabulary."""
_INT32 = torch.iinfo(torch.int32)


def narrow_to_engine(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` as the engine binds input ``name``: on ``device``, of ``dtype``, contiguous. An int64
    tensor for an int32 input is range-checked first (an ``InvalidInputError`` naming the input)."""
    if t.dtype == torch.int64 and dtype == torch.int32 and t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < _INT32.min or hi > _INT32.max:
            raise InvalidInputError(
                f"input {name!r} holds values {lo}..{hi}, outside int32, which the engine takes it in; "
                "send values within int32"
            )
    if t.device != device or t.dtype != dtype:
        t = t.to(device, dtype, non_blocking=True)
    return t.contiguous()


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(int(d[i]) for i in range(len(d)))


class NamedTRTEngine:
    """One deserialized engine of a named model, one execution context per profile."""

    def __init__(
        self,
        engine: trt.ICudaEngine,
        metadata: dict[str, Any],
        device: torch.device,
        expected: Signature | None = None,
    ) -> None:
        rebuild = f"rebuild it with `{BUILD_HINT} --force`"
        try:
            self.signature = Signature.from_dict(metadata["signature"])
            self.profiles = [NamedProfile.from_dict(p) for p in metadata["named_profiles"]]
        except (KeyError, TypeError, ValueError) as e:
            raise EngineCorruptError(
                f"engine metadata has no valid signature or named_profiles ({e}): it was not built by "
                f"fa3trt.trt.named_build; {rebuild}"
            ) from e
        self.engine = engine
        self.metadata = metadata
        self.device = device
        if engine.num_optimization_profiles != len(self.profiles):
            raise EngineCorruptError(
                f"engine has {engine.num_optimization_profiles} optimization profiles, its metadata lists "
                f"{len(self.profiles)}; {rebuild}"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        io = {
            n: (
                TRT_DTYPE_NAMES.get(engine.get_tensor_dtype(n).name, engine.get_tensor_dtype(n).name.lower()),
                len(engine.get_tensor_shape(n)),
                engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT,
            )
            for n in names
        }
        if problems := io_differences(self.signature, io):
            raise EngineCorruptError(
                f"engine tensors do not match its metadata's signature: {'; '.join(problems)}; {rebuild}"
            )
        if expected is not None and (problems := signature_differences(self.signature, expected)):
            raise EngineMismatchError(
                f"engine {metadata.get('key', '?')} was built for another signature than this server's: "
                f"{'; '.join(problems)}; rebuild it for this model config with `{BUILD_HINT} --store <uri>`"
            )
        self.input_dtypes = {t.name: TORCH_DTYPES[io[t.name][0]] for t in self.signature.inputs}
        self.output_name = self.signature.output.name
        self.output_dtype = TORCH_DTYPES[io[self.output_name][0]]
        self._contexts: list[trt.IExecutionContext] = []
        self._outputs: list[torch.Tensor] = []
        self._locks = [threading.Lock() for _ in self.profiles]
        self._runtime: Any = None  # set by from_bytes: the engine must not outlive its runtime
        stream = torch.cuda.current_stream(device)
        for p in self.profiles:
            ctx = engine.create_execution_context()
            if ctx is None:
                raise EngineExecutionError(
                    f"TensorRT could not create an execution context for profile {p.index} (out of GPU memory?)"
                )
            if not ctx.set_optimization_profile_async(p.index, stream.cuda_stream):
                raise EngineExecutionError(f"TensorRT refused optimization profile {p.index}")
            for name, (_, _, hi) in p.shapes.items():
                if not ctx.set_input_shape(name, hi):
                    raise EngineCorruptError(
                        f"TensorRT refused input {name!r} at {hi}, profile {p.index}'s max; {rebuild}"
                    )
            shape = _dims(ctx.get_tensor_shape(self.output_name))
            if any(n < 0 for n in shape):
                raise EngineCorruptError(f"output {self.output_name!r} has no size at profile {p.index}'s max: {shape}")
            self._contexts.append(ctx)
            numel = 1
            for n in shape:
                numel *= n
            # Flat: a smaller batch's output is the buffer's first elements, dense as TensorRT writes it.
            self._outputs.append(torch.empty(numel, dtype=self.output_dtype, device=device))
        stream.synchronize()  # once, at load: the profile switches are done before any call

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        metadata: dict[str, Any],
        *,
        expected: Signature | None = None,
        device: torch.device | str | None = None,
        environment: dict[str, str] | None = None,
    ) -> NamedTRTEngine:
        """Deserialize after checking the engine was built for this TensorRT, GPU and plugin."""
        runtime, engine, dev = deserialize_engine(data, metadata, device, environment)
        with torch.cuda.device(dev):
            obj = cls(engine, metadata, dev, expected)
        obj._runtime = runtime
        return obj

    def profile_for(self, batch: Mapping[str, torch.Tensor]) -> int:
        return select_named_profile(self.profiles, {n: tuple(t.shape) for n, t in batch.items()}, self.signature)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Run one batch; returns a view valid until the next call on the same profile."""
        extra = sorted(set(batch) - set(self.input_dtypes))
        if extra:
            raise InvalidInputError(
                f"the batch has inputs {extra} the engine does not take ({sorted(self.input_dtypes)})"
            )
        p = self.profile_for(batch)
        out_buf = self._outputs[p]
        lo, hi = out_buf.data_ptr(), out_buf.data_ptr() + out_buf.numel() * out_buf.element_size()
        bound: dict[str, torch.Tensor] = {}
        for name, dtype in self.input_dtypes.items():
            t = narrow_to_engine(name, batch[name], dtype, self.device)
            bound[name] = t.clone() if lo <= t.data_ptr() < hi else t  # engines must not alias I/O
        stream = torch.cuda.current_stream(self.device)
        ctx = self._contexts[p]
        with self._locks[p]:  # shapes and addresses are context state
            for name, t in bound.items():
                if not (ctx.set_input_shape(name, tuple(t.shape)) and ctx.set_tensor_address(name, t.data_ptr())):
                    raise EngineExecutionError(
                        f"TensorRT refused input {name!r} at shape {tuple(t.shape)} on profile {p}; its log above says why"
                    )
            shape = _dims(ctx.get_tensor_shape(self.output_name))
            numel = 1
            for n in shape:
                numel *= n
            if any(n < 0 for n in shape) or numel > out_buf.numel():
                raise EngineExecutionError(f"the engine gives output {self.output_name!r} shape {shape} on profile {p}")
            out = out_buf[:numel].view(shape)
            if not ctx.set_tensor_address(self.output_name, out.data_ptr()):
                raise EngineExecutionError(f"TensorRT refused the address of output {self.output_name!r}")
            if not ctx.execute_async_v3(stream.cuda_stream):
                shapes = {n: tuple(t.shape) for n, t in bound.items()}
                raise EngineExecutionError(
                    f"execute_async_v3 failed for inputs {shapes} on profile {p}; the TensorRT or CustomAttnPlugin "
                    "log above says why"
                )
        return out

    def describe(self) -> dict[str, Any]:
        keep = ("key", "trt_version", "gpu_name", "compute_capability", "plugin_version", "onnx_sha256")
        return {k: self.metadata.get(k) for k in (*keep, "build_config_hash", "model_id")} | {
            "profiles": [p.to_dict() for p in self.profiles]
        }


class NamedTensorRTBackend:
    """The named-backend protocol on a ``NamedTRTEngine``: this GPU's engine from the store."""

    name = "tensorrt"

    def __init__(
        self,
        engine: NamedTRTEngine,
        *,
        key: str,
        store_uri: str,
        buckets: Buckets,
        model_id: str,
        signature: Signature | None = None,
    ) -> None:
        self.engine = engine
        self.device = engine.device
        self.signature = signature or engine.signature
        """The server's signature (checked against the engine's at load)."""
        self.key = key
        self.store_uri = store_uri
        self.buckets = buckets
        self.model_id = model_id
        self._turns = ProfileTurns()

    @classmethod
    def load(
        cls,
        signature: Signature,
        model_id: str,
        *,
        buckets: Buckets,
        store: str | ArtifactStore | None,
        max_batch_tokens: int | None = None,
        build_config: BuildConfig | None = None,
        device: torch.device | str | None = None,
    ) -> NamedTensorRTBackend:
        """This GPU's engine for (model_id, signature, buckets, token budget) from ``store``;
        ``EngineNotFoundError`` naming the build command when it is not there."""
        st = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        mbt = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
        cfg = build_config or BuildConfig(buckets=buckets, max_batch_tokens=mbt)
        if cfg.buckets != buckets or cfg.max_batch_tokens != mbt:
            raise ConfigError(
                f"build_config has buckets {list(cfg.buckets.edges)} and max_batch_tokens {cfg.max_batch_tokens}, "
                f"the call passed {list(buckets.edges)} and {mbt}; pass the same"
            )
        env = current_environment()  # a GPU and TensorRT, or an error saying which is missing
        key = named_engine_key_for(st, signature, model_id, cfg, env)
        if not st.has("engines", key):
            raise EngineNotFoundError(
                f"no TensorRT engine in store {st.uri} for model {model_id} with buckets {list(buckets.edges)} and "
                f"max_batch_tokens {mbt} on this GPU ({env['gpu_name']}, sm{env['compute_capability']}, TensorRT "
                f"{env['trt_version']}): build it with `{BUILD_HINT} --store {st.uri}`, or start with "
                "build_if_missing"
            )
        data, meta = st.get("engines", key)
        engine = NamedTRTEngine.from_bytes(data, meta, expected=signature, device=device, environment=env)
        log.info("loaded engine %s for model %s from %s on %s", key, model_id, st.uri, env["gpu_name"])
        return cls(engine, key=key, store_uri=st.uri, buckets=buckets, model_id=model_id, signature=signature)

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The output (B, ...) of one batch (keyword inputs as ``Signature.assemble`` makes them), on the device."""
        stream = torch.cuda.current_stream(self.device)
        p = self.engine.profile_for(batch)
        return self._turns.run(p, stream, lambda: self.engine(batch))

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        for batch in batches:
            self.run(batch)
        torch.cuda.synchronize(self.device)
        log.info("tensorrt backend warmed %d batches in %.2fs", len(batches), time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device),
            "model_id": self.model_id,
            "signature": self.signature.to_dict(),
            "buckets": list(self.buckets.edges),
            "store": self.store_uri,
            "engine": self.engine.describe(),
        }
