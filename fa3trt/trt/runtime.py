"""Run TensorRT engines: ``TRTEngine`` (bytes -> zero-copy calls), ``TRTModule`` (drop-in
``nn.Module``) and ``TensorRTBackend`` (the ``Backend`` protocol).

Contract:
- ``TRTEngine.from_bytes(data, metadata)`` refuses an engine built for another TensorRT, GPU
  or plugin before deserializing it, registers the plugin first, and makes one execution
  context per optimization profile.
- A call binds the caller's ``x`` and ``seq_lens`` by address (no staging copies), sets the
  input shapes, runs ``execute_async_v3`` on the current CUDA stream and checks its result. The
  output is a view of a buffer preallocated per profile at the profile's max shape: valid until
  the next call on the same profile (``TRTModule`` and ``TensorRTBackend`` hand out copies).
- (batch, seq) outside every profile is an ``InvalidInputError`` naming the limits.

``select_profile`` is the profile choice as a plain function, tested without TensorRT.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fa3trt.attention.kernels.fp8 import require_fp8_kernel
from fa3trt.attention.op import MODE_FP8
from fa3trt.buckets import Buckets
from fa3trt.errors import EngineCorruptError, EngineExecutionError, EngineNotFoundError, InvalidInputError
from fa3trt.models.reference import ModelConfig
from fa3trt.store import BUILD_HINT, ArtifactStore
from fa3trt.trt.build import (
    DEFAULT_MAX_BATCH_TOKENS,
    INPUT_SEQ_LENS,
    INPUT_X,
    OUTPUT_Y,
    ProfileSpec,
    build_to_store,
    engine_key_for,
)
from fa3trt.trt.compat import check_compatible, current_environment
from fa3trt.trt.plugin import register_plugin, require_registered

if TYPE_CHECKING:
    import tensorrt as trt  # static only: checked against tensorrt-stubs
else:
    from fa3trt.trt._trt import tensorrt as trt

__all__ = ["TRTEngine", "TRTModule", "TensorRTBackend", "ProfileTurns", "select_profile", "deserialize_engine"]

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


def deserialize_engine(
    data: bytes,
    metadata: dict[str, Any],
    device: torch.device | str | None = None,
    environment: dict[str, str] | None = None,
) -> tuple[trt.Runtime, trt.ICudaEngine, torch.device]:
    """(runtime, engine, device) from an engine's bytes, after checking they were built for this
    TensorRT, GPU and plugin (``metadata``) and registering the plugin in its namespace. The
    runtime must outlive the engine."""
    check_compatible(metadata, environment)  # before touching the bytes
    namespace = str(metadata.get("plugin_namespace", ""))
    register_plugin(namespace)
    require_registered(namespace)
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.device(dev):
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineCorruptError(
            f"TensorRT could not deserialize engine {metadata.get('key', '?')} ({len(data)} bytes; its log "
            f"above says why); rebuild it with `{BUILD_HINT} --force`"
        )
    return runtime, engine, dev


def select_profile(specs: Sequence[ProfileSpec], batch: int, seq: int) -> int:
    """Index of the first profile whose (batch, seq) box holds (``batch``, ``seq``).

    Profiles follow the buckets, so the first match is the smallest bucket that fits. Raises
    ``InvalidInputError`` naming the limits when none does.
    """
    if batch < 1 or seq < 1:
        raise InvalidInputError(f"batch and sequence length must be >= 1, got batch {batch}, seq {seq}")
    for spec in specs:
        if spec.admits(batch, seq):
            return spec.index
    max_seq = max(s.seq[2] for s in specs)
    if seq > max_seq:
        raise InvalidInputError(
            f"sequence length {seq} exceeds the engine's largest bucket ({max_seq}); split the sequence "
            "or build an engine with a larger bucket edge"
        )
    limits = ", ".join(f"seq {s.seq[0]}..{s.seq[2]}: batch <= {s.batch[2]}" for s in specs)
    raise InvalidInputError(
        f"batch {batch} of sequences padded to {seq} fits no optimization profile ({limits}); "
        "split the batch, or raise max_batch_tokens and rebuild the engine"
    )


class ProfileTurns:
    """Batches on an engine's optimization profiles, one at a time per profile.

    A profile's context and output buffer serve one batch at a time. On one stream its order
    keeps them apart (the copy of the output is queued before the lock is released); a batch on
    another stream (a replica runs each bucket on its own) first waits for the profile's last
    use there to be copied out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_use: dict[int, tuple[int, torch.cuda.Event]] = {}  # profile -> (stream, event after its last use)

    def run(self, profile: int, stream: torch.cuda.Stream, call: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A copy of ``call()``'s output (a view of the profile's buffer), queued on ``stream``."""
        with self._lock:
            last = self._last_use.get(profile)
            if last is not None and last[0] != stream.cuda_stream:
                stream.wait_event(last[1])
            y = call().clone()
            done = torch.cuda.Event()
            done.record(stream)
            self._last_use[profile] = (stream.cuda_stream, done)
            return y


class TRTEngine:
    """One deserialized engine with one execution context per optimization profile."""

    def __init__(self, engine: trt.ICudaEngine, metadata: dict[str, Any], device: torch.device) -> None:
        self.engine = engine
        self.metadata = metadata
        self.device = device
        self.specs = [ProfileSpec.from_dict(p) for p in metadata["profiles"]]
        if engine.num_optimization_profiles != len(self.specs):
            raise EngineCorruptError(
                f"engine has {engine.num_optimization_profiles} optimization profiles, its metadata lists "
                f"{len(self.specs)}; rebuild it with `{BUILD_HINT} --force`"
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted((INPUT_X, INPUT_SEQ_LENS, OUTPUT_Y)):
            raise EngineCorruptError(
                f"engine tensors are {names}, expected x, seq_lens, y; rebuild it from fa3trt.onnx.export"
            )
        self.input_dtype = _TORCH_DTYPES[engine.get_tensor_dtype(INPUT_X).name]
        self.output_dtype = _TORCH_DTYPES[engine.get_tensor_dtype(OUTPUT_Y).name]
        self.hidden = int(metadata["hidden"])
        self._contexts: list[trt.IExecutionContext] = []
        self._outputs: list[torch.Tensor] = []
        self._locks = [threading.Lock() for _ in self.specs]
        self._runtime: Any = None  # set by from_bytes: the engine must not outlive its runtime
        stream = torch.cuda.current_stream(device)
        for spec in self.specs:
            ctx = engine.create_execution_context()
            if ctx is None:
                raise EngineExecutionError(
                    f"TensorRT could not create an execution context for profile {spec.index} (out of GPU memory?)"
                )
            if not ctx.set_optimization_profile_async(spec.index, stream.cuda_stream):
                raise EngineExecutionError(f"TensorRT refused optimization profile {spec.index}")
            self._contexts.append(ctx)
            # Flat buffer: a (b, s, D) result is its first b*s*D elements, dense as TensorRT writes it.
            numel = spec.batch[2] * spec.seq[2] * self.hidden
            self._outputs.append(torch.empty(numel, dtype=self.output_dtype, device=device))
        stream.synchronize()  # once, at load: the profile switches are done before any call

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        metadata: dict[str, Any],
        *,
        device: torch.device | str | None = None,
        environment: dict[str, str] | None = None,
    ) -> TRTEngine:
        """Deserialize an engine after checking it was built for this TensorRT, GPU and plugin."""
        runtime, engine, dev = deserialize_engine(data, metadata, device, environment)
        with torch.cuda.device(dev):
            obj = cls(engine, metadata, dev)
        obj._runtime = runtime
        return obj

    def profile_for(self, batch: int, seq: int) -> int:
        return select_profile(self.specs, batch, seq)

    def __call__(self, x: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Run one padded batch; returns a view valid until the next call on the same profile."""
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise InvalidInputError(f"x must have shape (batch, seq, {self.hidden}), got {tuple(x.shape)}")
        b, s = int(x.shape[0]), int(x.shape[1])
        if seq_lens.shape != (b,):
            raise InvalidInputError(f"seq_lens must have shape ({b},), got {tuple(seq_lens.shape)}")
        p = select_profile(self.specs, b, s)
        if x.device != self.device or x.dtype != self.input_dtype or not x.is_contiguous():
            # Only a wrongly placed input is converted; a correct one is bound as is.
            x = x.to(self.device, self.input_dtype).contiguous()
        lens = seq_lens.to(self.device, torch.int32, non_blocking=True)
        out_buf = self._outputs[p]
        if out_buf.data_ptr() <= x.data_ptr() < out_buf.data_ptr() + out_buf.numel() * out_buf.element_size():
            x = x.clone()  # a previous output fed back in (a sampler loop): engines must not alias I/O
        out = out_buf[: b * s * self.hidden].view(b, s, self.hidden)
        stream = torch.cuda.current_stream(self.device)
        ctx = self._contexts[p]
        with self._locks[p]:  # shapes and addresses are context state
            ok = (
                ctx.set_input_shape(INPUT_X, (b, s, self.hidden))
                and ctx.set_input_shape(INPUT_SEQ_LENS, (b,))
                and ctx.set_tensor_address(INPUT_X, x.data_ptr())
                and ctx.set_tensor_address(INPUT_SEQ_LENS, lens.data_ptr())
                and ctx.set_tensor_address(OUTPUT_Y, out.data_ptr())
            )
            if not ok:
                raise EngineExecutionError(
                    f"TensorRT refused shape ({b}, {s}, {self.hidden}) or an address on profile {p}; its log above says why"
                )
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise EngineExecutionError(
                    f"execute_async_v3 failed for batch {b}, seq {s} on profile {p}; the TensorRT or "
                    "CustomAttnPlugin log above says why"
                )
        return out

    def describe(self) -> dict[str, Any]:
        keep = (
            "key",
            "trt_version",
            "gpu_name",
            "compute_capability",
            "plugin_version",
            "onnx_sha256",
            "build_config_hash",
        )
        return {k: self.metadata.get(k) for k in keep} | {"profiles": [s.to_dict() for s in self.specs]}


class TRTModule(nn.Module):
    """A TensorRT engine as a drop-in for the PyTorch model: ``forward(x, seq_lens=None)``.

    Same signature and output as ``fa3trt.models.reference.Transformer`` (rows past each length zero). By
    default each call returns its own tensor (``clone_outputs``), so callers that keep earlier
    outputs, like a diffusion sampler, are safe; pass False to get the engine's reused buffer.
    """

    def __init__(self, engine: TRTEngine, *, clone_outputs: bool = True) -> None:
        super().__init__()
        self.engine = engine
        self.clone_outputs = clone_outputs

    @classmethod
    def from_bytes(cls, data: bytes, metadata: dict[str, Any], **kwargs: Any) -> TRTModule:
        return cls(TRTEngine.from_bytes(data, metadata), **kwargs)

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise InvalidInputError(f"x must have shape (batch, seq, {self.engine.hidden}), got {tuple(x.shape)}")
        if seq_lens is None:
            seq_lens = torch.full((x.shape[0],), x.shape[1], dtype=torch.int32, device=x.device)
        out = self.engine(x, seq_lens)
        return out.clone() if self.clone_outputs else out


class TensorRTBackend:
    """The ``Backend`` protocol on a ``TRTEngine``: this GPU's engine from the store."""

    name = "tensorrt"

    def __init__(self, engine: TRTEngine, config: ModelConfig, *, key: str, store_uri: str, buckets: Buckets) -> None:
        self.engine = engine
        self.config = config
        self.device = engine.device
        self.dtype = engine.input_dtype
        self.hidden = config.hidden
        self.key = key
        self.store_uri = store_uri
        self.buckets = buckets
        self._turns = ProfileTurns()

    @classmethod
    def load(
        cls,
        config: ModelConfig,
        *,
        weights: str | os.PathLike[str] | None,
        buckets: Buckets,
        store: str | ArtifactStore | None,
        build_if_missing: bool,
        max_batch_tokens: int | None,
    ) -> TensorRTBackend:
        """Load this GPU's engine for (config, weights, buckets) from ``store``.

        A missing engine is built first with ``build_if_missing``, else ``EngineNotFoundError``
        names the build command.
        """
        st = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        mbt = max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS
        env = current_environment()  # a GPU and TensorRT, or an error saying which is missing
        if config.attn_mode == MODE_FP8:
            require_fp8_kernel(torch.device("cuda", torch.cuda.current_device()), config.head_dim)
        register_plugin()
        key: str | None
        try:
            key = engine_key_for(st, config, weights, buckets, mbt, env=env)
        except EngineNotFoundError:
            key = None  # no ONNX in the store yet, so no engine either
        if key is None or not st.has("engines", key):
            if not build_if_missing:
                raise EngineNotFoundError(
                    f"no TensorRT engine in store {st.uri} for model {config.name!r} with buckets "
                    f"{list(buckets.edges)} and max_batch_tokens {mbt} on this GPU ({env['gpu_name']}, "
                    f"sm{env['compute_capability']}, TensorRT {env['trt_version']}): build it with "
                    f"`{BUILD_HINT} --store {st.uri}`, or start with build_if_missing"
                )
            log.info("no engine in %s for this GPU: building it now", st.uri)
            key = str(build_to_store(st, config, weights, buckets, max_batch_tokens=mbt)["key"])
        data, meta = st.get("engines", key)
        engine = TRTEngine.from_bytes(data, meta)
        log.info("loaded engine %s from %s on %s", key, st.uri, env["gpu_name"])
        return cls(engine, config, key=key, store_uri=st.uri, buckets=buckets)

    def run(self, x: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise InvalidInputError(f"x must have shape (batch, seq, {self.hidden}), got {tuple(x.shape)}")
        x = x.to(self.device, self.engine.input_dtype, non_blocking=True)
        stream = torch.cuda.current_stream(self.device)
        p = self.engine.profile_for(int(x.shape[0]), int(x.shape[1]))
        return self._turns.run(p, stream, lambda: self.engine(x, seq_lens))

    def warmup(self, shapes: Sequence[tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        for b, s in shapes:
            x = torch.zeros(b, s, self.hidden, dtype=self.engine.input_dtype, device=self.device)
            self.run(x, torch.full((b,), s, dtype=torch.int32))
        torch.cuda.synchronize(self.device)
        log.info("tensorrt backend warmed %d shapes in %.2fs", len(shapes), time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device),
            "dtype": self.config.dtype,
            "model": self.config.to_dict(),
            "buckets": list(self.buckets.edges),
            "store": self.store_uri,
            "engine": self.engine.describe(),
        }
