"""Backends: what runs a padded batch. ``TorchBackend`` (the embedded default, CPU or CUDA) and
``TensorRTBackend`` (``fa3trt.trt.runtime``) share one protocol and the same model, weights and op.
``IdentityBackend`` answers each batch with itself: the serving path with no model, for
measuring what the transports and batching cost (as Triton's identity backend is used).

``load_backend("auto" | "torch" | "tensorrt" | "identity", ...)`` picks one and logs why:
``auto`` takes TensorRT when it imports and a CUDA GPU is present, else the torch backend.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from fa3trt.attention.kernels import flash_cute
from fa3trt.attention.kernels.fp8 import require_fp8_kernel
from fa3trt.attention.kernels.selector import lengths_on_device, select_kernel
from fa3trt.attention.op import MODE_FP8
from fa3trt.buckets import Buckets, to_device
from fa3trt.defaults import BUCKETS, MODEL_PRESET
from fa3trt.errors import ConfigError, InvalidInputError, MissingDependencyError
from fa3trt.models.reference import ModelConfig, build_model
from fa3trt.serving.graphs import GraphRunner
from fa3trt.trt import _trt

__all__ = [
    "Backend",
    "TorchBackend",
    "IdentityBackend",
    "load_backend",
    "BackendKind",
    "BACKEND_KINDS",
    "default_device",
]

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "torch", "tensorrt", "identity"]
BACKEND_KINDS: tuple[str, ...] = ("auto", "torch", "tensorrt", "identity")


@runtime_checkable
class Backend(Protocol):
    """Runs the model on a padded batch.

    ``run(x, seq_lens)``: x (B, L, hidden) on the CPU or the backend's ``device`` (in its
    ``dtype`` saves a conversion), seq_lens int32 (B,) on the CPU; returns (B, L, hidden) on the backend's device in the model dtype, rows past
    each length zero. ``warmup`` runs each (batch, seq) shape once so first requests pay no
    compile or allocation cost.
    """

    name: str
    device: torch.device
    dtype: torch.dtype
    hidden: int

    def run(self, x: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor: ...

    def warmup(self, shapes: Sequence[tuple[int, int]]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


def describe_device(backend: str, device: torch.device, dtype: str, kernel: str | None) -> dict[str, Any]:
    """The head of every backend's ``describe()``: which backend, on which device, in which
    dtype, with which attention kernel."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"backend": backend, "device": str(device), "device_name": name, "dtype": dtype, "attention_kernel": kernel}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class TorchBackend:
    """The PyTorch model in inference mode, on CPU or CUDA: eager, or on CUDA with
    ``cuda_graphs`` as CUDA graphs per batch shape (``fa3trt.serving.graphs``: batches rounded up to
    a graph's shape, the sequence length to a multiple of ``graph_seq_step``)."""

    name = "torch"

    def __init__(
        self,
        config: ModelConfig,
        weights: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        *,
        cuda_graphs: bool = False,
        graph_seq_step: int = 128,
    ) -> None:
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.hidden = config.hidden
        self.dtype = config.torch_dtype
        self.weights = None if weights is None else os.fspath(weights)
        if config.attn_mode == MODE_FP8:
            require_fp8_kernel(self.device, config.head_dim)
        self.model = build_model(config, weights, self.device)
        self.kernel = select_kernel(self.device)
        self._lengths_on_device = lengths_on_device(self.kernel, self.dtype, config.head_dim)
        self.graphs: GraphRunner | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ConfigError(
                    f"cuda_graphs needs a CUDA device and this backend runs on {self.device}; set cuda_graphs to false"
                )
            if not self._lengths_on_device:
                raise ConfigError(
                    f"cuda_graphs needs an attention kernel that reads the lengths on the GPU (FA3, or FlashAttention's "
                    f"CuTe kernel: fp16/bf16 on sm90, {flash_cute.INSTALL_HINT}); this device runs {self.kernel!r} "
                    f"in {config.dtype}: install it, or set cuda_graphs to false"
                )
            if graph_seq_step < 1:
                raise ConfigError(f"graph_seq_step must be >= 1, got {graph_seq_step}")
            self.graphs = GraphRunner(self.model, self.hidden, self.dtype, self.device, seq_step=graph_seq_step)

    def run(self, x: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        lens = _check_batch(x, seq_lens, self.hidden)
        s = int(x.shape[1])
        x = x.to(self.device, self.dtype, non_blocking=True)
        with torch.inference_mode():
            if self.device.type != "cuda":
                return self.model(x, lens)
            # A batch with no padding runs the dense kernels, with no lengths at all. Otherwise,
            # for a kernel that reads them there, the lengths checked above go to the GPU once,
            # queued, so no layer waits on the host for them; the SDPA kernels dispatch on host
            # lengths.
            if self.graphs is not None:
                y = self.graphs.run(x, to_device(lens, self.device))
                if y is not None:
                    return y
            if bool((lens == s).all()):
                return self.model(x, None)
            return self.model(x, to_device(lens, self.device) if self._lengths_on_device else lens)

    def warmup(self, shapes: Sequence[tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(0)
        # Loads the kernels and fills the allocator's pools at the largest shapes. (cuDNN plans
        # are not built here: the attention builds one for a shape once its work repays it.)
        for b, s in shapes:
            x = torch.randn(b, s, self.hidden, generator=g)
            self.run(x, torch.full((b,), s, dtype=torch.int32))
        if shapes:
            # One ragged batch too: a kernel that compiles per variant (FlashAttention's CuTe
            # kernel: dense and ragged are separate compiles of seconds each) is then ready for
            # the first padded batch as well.
            b, s = min(shapes, key=lambda bs: bs[0] * bs[1])
            if s > 1:
                lens = torch.full((b,), s, dtype=torch.int32)
                lens[-1] = s // 2
                self.run(torch.randn(b, s, self.hidden, generator=g), lens)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("torch backend warmed %d shapes in %.2fs", len(shapes), time.perf_counter() - t0)

    def describe(self) -> dict[str, Any]:
        return describe_device(self.name, self.device, self.config.dtype, self.kernel) | {
            "cuda_graphs": None
            if self.graphs is None
            else {"captured": len(self.graphs), "seq_step": self.graphs.seq_step},
            "model": self.config.to_dict(),
            "weights": self.weights,
        }


def _check_batch(x: torch.Tensor, seq_lens: torch.Tensor, hidden: int) -> torch.Tensor:
    """seq_lens as int32 on the CPU, after checking both against the batch's shape."""
    if x.dim() != 3 or x.shape[-1] != hidden:
        raise InvalidInputError(f"x must have shape (batch, seq, {hidden}), got {tuple(x.shape)}")
    b, s = int(x.shape[0]), int(x.shape[1])
    lens = seq_lens.to("cpu", torch.int32)
    if lens.shape != (b,):
        raise InvalidInputError(f"seq_lens must have shape ({b},) (one length per sequence), got {tuple(lens.shape)}")
    if b and (int(lens.min()) < 0 or int(lens.max()) > s):
        raise InvalidInputError(f"seq_lens must lie in [0, {s}] (the padded length), got {lens.tolist()}")
    return lens


class IdentityBackend:
    """Answers each batch with itself, in the model's dtype on the model's device: every step of
    serving (transport, decoding, batching, staging to the GPU and back, encoding) and no model.
    ``backend: identity`` in the app's args serves it: the ceiling a transport reaches on this
    host, measured beside the model (``bench.transports``)."""

    name = "identity"

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.hidden = config.hidden
        self.dtype = config.torch_dtype

    def run(self, x: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        _check_batch(x, seq_lens, self.hidden)
        return x.to(self.device, self.dtype, non_blocking=True)

    def warmup(self, shapes: Sequence[tuple[int, int]]) -> None:
        for b, s in shapes:
            self.run(torch.zeros(b, s, self.hidden), torch.full((b,), s, dtype=torch.int32))

    def describe(self) -> dict[str, Any]:
        return describe_device(self.name, self.device, self.config.dtype, None) | {
            "model": self.config.to_dict(),
            "weights": None,
        }


def load_backend(
    kind: BackendKind = "auto",
    config: ModelConfig | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    device: torch.device | str | None = None,
    buckets: Buckets | None = None,
    store: str | None = None,
    build_if_missing: bool = False,
    max_batch_tokens: int | None = None,
    cuda_graphs: bool = False,
) -> Backend:
    """Pick and construct a backend. ``config`` defaults to the ``tiny`` preset.

    The TensorRT backend loads this GPU's engine for (model, buckets) from ``store``; with
    ``build_if_missing`` it builds it first, else a missing engine is an error naming the
    build command.
    """
    config = config or ModelConfig.preset(MODEL_PRESET)
    if kind not in BACKEND_KINDS:
        raise ConfigError(f"backend must be one of {', '.join(map(repr, BACKEND_KINDS))}, got {kind!r}")
    if kind == "identity":
        return IdentityBackend(config, device)
    if kind == "auto":
        if not _trt.available():
            log.info("backend auto -> torch: TensorRT is not importable")
            kind = "torch"
        elif not torch.cuda.is_available():
            log.info("backend auto -> torch: TensorRT imports but no CUDA GPU is visible")
            kind = "torch"
        else:
            log.info("backend auto -> tensorrt: TensorRT %s and a CUDA GPU are present", _trt.version())
            kind = "tensorrt"
    if kind == "torch":
        return TorchBackend(config, weights, device, cuda_graphs=cuda_graphs)
    if cuda_graphs:
        log.info("cuda_graphs applies to the torch backend; the TensorRT engine runs as built")
    if not torch.cuda.is_available():
        raise MissingDependencyError("backend 'tensorrt' needs a CUDA GPU and none is visible; use backend 'torch'")
    _trt.require()  # raises with the install hint
    from fa3trt.trt.runtime import TensorRTBackend

    return TensorRTBackend.load(
        config,
        weights=weights,
        buckets=buckets or Buckets(BUCKETS),
        store=store,
        build_if_missing=build_if_missing,
        max_batch_tokens=max_batch_tokens,
    )
