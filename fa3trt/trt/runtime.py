"""Run TensorRT engines: engine bytes in, calls bound by name.

Contract:
- ``TRTEngine.from_bytes(data, metadata, expected=...)`` refuses an engine built for another
  TensorRT, GPU, plugin or metadata format before deserializing it (``fa3trt.trt.compat``), and
  one whose plugin nodes run FP8 attention (mode 1) at a head dim no FP8 kernel of this GPU
  takes (``check_plugin_calls``); registers the plugin; checks the metadata's signature against
  the engine's IO tensors (names, dtypes, ranks: ``EngineCorruptError``) and against the
  signature the server expects (``EngineMismatchError`` naming each difference); and makes one
  execution context per optimization profile with an output buffer sized from the engine's
  output shape at the profile's max input shapes.
- A call takes the batch's keyword tensors, picks the profile
  (``fa3trt.trt.profiles.select_profile``), binds every input by name (moved to the device and
  converted to the engine's dtype only when needed; ``int64`` to ``int32`` after a range check
  naming the input), sets its shapes, binds the output at the shape the engine gives for them
  and runs ``execute_async_v3`` on the current stream. The output is a view of the profile's
  buffer, valid until the next call on that profile: ``ProfileTurns`` hands out copies and keeps
  batches on other streams off a profile still in use; ``TRTModule`` is the engine as an
  ``nn.Module`` taking the model's keyword inputs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fa3trt.attention.kernels.fp8 import require_fp8_kernel
from fa3trt.attention.op import MODE_FP8
from fa3trt.defaults import BUILD_HINT
from fa3trt.errors import (
    EngineCorruptError,
    EngineExecutionError,
    EngineMismatchError,
    InvalidInputError,
)
from fa3trt.signature import TORCH_DTYPES, Signature
from fa3trt.trt.compat import check_compatible
from fa3trt.trt.plugin import register_plugin, require_registered
from fa3trt.trt.profiles import Profile, io_differences, select_profile, signature_differences

if TYPE_CHECKING:
    import tensorrt as trt  # static only: checked against tensorrt-stubs
else:
    from fa3trt.trt._trt import tensorrt as trt

__all__ = [
    "TRTEngine",
    "TRTModule",
    "ProfileTurns",
    "deserialize_engine",
    "check_plugin_calls",
    "narrow_to_engine",
    "TRT_DTYPE_NAMES",
]

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


def check_plugin_calls(metadata: dict[str, Any], device: torch.device) -> None:
    """``MissingDependencyError`` where a plugin node of the engine runs FP8 attention (mode 1)
    at a head dim no FP8 kernel of ``device`` takes (``fa3trt.attention.kernels.fp8``)."""
    for call in metadata.get("plugin_calls") or []:
        if int(call.get("mode", 0)) == MODE_FP8 and call.get("head_dim"):
            require_fp8_kernel(device, int(call["head_dim"]), causal=bool(call.get("causal", 0)))


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
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    check_plugin_calls(metadata, dev)
    namespace = str(metadata.get("plugin_namespace", ""))
    register_plugin(namespace)
    require_registered(namespace)
    with torch.cuda.device(dev):
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineCorruptError(
            f"TensorRT could not deserialize engine {metadata.get('key', '?')} ({len(data)} bytes; its log "
            f"above says why); rebuild it with `{BUILD_HINT} --force`"
        )
    return runtime, engine, dev


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


class TRTEngine:
    """One deserialized engine, one execution context per optimization profile."""

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
            self.profiles = [Profile.from_dict(p) for p in metadata["profiles"]]
        except (KeyError, TypeError, ValueError) as e:
            raise EngineCorruptError(
                f"engine metadata has no valid signature or profiles ({e}): it was not built by "
                f"fa3trt.trt.build; {rebuild}"
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
    ) -> TRTEngine:
        """Deserialize after checking the engine was built for this TensorRT, GPU and plugin."""
        runtime, engine, dev = deserialize_engine(data, metadata, device, environment)
        with torch.cuda.device(dev):
            obj = cls(engine, metadata, dev, expected)
        obj._runtime = runtime
        return obj

    def profile_for(self, batch: Mapping[str, torch.Tensor]) -> int:
        return select_profile(self.profiles, {n: tuple(t.shape) for n, t in batch.items()}, self.signature)

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
        return {k: self.metadata.get(k) for k in (*keep, "build_hash", "model_id", "plugin_calls")} | {
            "profiles": [p.to_dict() for p in self.profiles]
        }


class TRTModule(nn.Module):
    """An engine as a drop-in ``nn.Module``: ``forward(**inputs)`` with the model's keyword inputs
    (batch axis first), returning the output. By default each call returns its own tensor
    (``clone_outputs``), so callers that keep earlier outputs, like a diffusion sampler, are
    safe; pass False to get the engine's reused buffer."""

    def __init__(self, engine: TRTEngine, *, clone_outputs: bool = True) -> None:
        super().__init__()
        self.engine = engine
        self.clone_outputs = clone_outputs

    @classmethod
    def from_bytes(cls, data: bytes, metadata: dict[str, Any], **kwargs: Any) -> TRTModule:
        return cls(TRTEngine.from_bytes(data, metadata), **kwargs)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.engine(inputs)
        return out.clone() if self.clone_outputs else out
