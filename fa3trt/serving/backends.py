"""Backends: what runs a batch of any model. One protocol, one loader.

Contract:
- A ``Backend`` runs one batch: the model's keyword inputs (batch axis first, as
  ``fa3trt.serving.batch.assemble`` makes them) in, the selected output (B, ...) on its
  ``device`` out. It declares its ``signature``, the float ``dtype`` its model computes in and
  whether a batch's lengths should reach it on the device (``lengths_on_device``).
- ``TorchBackend`` (``fa3trt.serving.torch_backend``: the model under attention routing,
  eager, as CUDA graphs or under ``torch.compile``), ``TensorRTBackend``
  (``fa3trt.serving.tensorrt_backend``: this GPU's engine from the store) and ``IdentityBackend``
  (no model: each batch answered with its one input, what serving costs without the model, as
  Triton's identity backend is used) follow it, for every model source alike.
- ``load_backend("auto" | "torch" | "tensorrt" | "identity", spec, ...)`` picks one and logs
  why: ``auto`` takes TensorRT when it imports and a CUDA GPU is present, else the torch backend.
  Options that one backend cannot honour are refused or logged as a warning, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from fa3trt import trt
from fa3trt.buckets import Buckets
from fa3trt.defaults import BUCKETS, MAX_BATCH_TOKENS
from fa3trt.errors import ConfigError, MissingDependencyError
from fa3trt.models.spec import AnyModelSpec, ReferenceSpec
from fa3trt.signature import Signature, TensorSpec

__all__ = [
    "Backend",
    "IdentityBackend",
    "load_backend",
    "BackendKind",
    "BACKEND_KINDS",
    "default_device",
    "describe_device",
]

log = logging.getLogger(__name__)

BackendKind = Literal["auto", "torch", "tensorrt", "identity"]
BACKEND_KINDS: tuple[str, ...] = ("auto", "torch", "tensorrt", "identity")


@runtime_checkable
class Backend(Protocol):
    """Runs one batch of a model (see the module docstring)."""

    name: str
    device: torch.device
    signature: Signature
    dtype: torch.dtype
    lengths_on_device: bool

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def batch_rows(self, b: int) -> int:
        """The rows a batch of ``b`` runs as (CUDA graphs round it up), so it costs what they cost."""
        ...


def describe_device(backend: str, device: torch.device, dtype: str, kernel: str | None) -> dict[str, Any]:
    """The head of every backend's ``describe()``: which backend, on which device, in which
    dtype, with which attention kernel."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"backend": backend, "device": str(device), "device_name": name, "dtype": dtype, "attention_kernel": kernel}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def echo_input(signature: Signature) -> TensorSpec:
    """The one sent input an identity backend answers with: a float input shaped as the output."""
    fits = [
        t for t in signature.sent if t.batched and t.axes == signature.output.axes and t.torch_dtype.is_floating_point
    ]
    if len(fits) != 1:
        raise ConfigError(
            f"backend 'identity' answers each request with its input, so the model must take exactly one float input "
            f"shaped as its output {list(signature.output.axes)}; this one has "
            f"{[(t.name, list(t.axes)) for t in signature.sent]}: serve it with backend 'torch', 'tensorrt' or 'auto'"
        )
    return fits[0]


class IdentityBackend:
    """Answers each batch with its one input, in the output's dtype on the device: every step of
    serving (transport, decoding, batching, staging to the GPU and back, encoding) and no model.
    ``backend: identity`` serves it: the ceiling a transport reaches on this host, measured beside
    the model (``bench.transports``)."""

    name = "identity"
    lengths_on_device = False

    def __init__(self, spec: AnyModelSpec, device: torch.device | str | None = None) -> None:
        self.spec = spec
        self.signature = spec.signature()
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype: torch.dtype = getattr(torch, spec.model_dtype)
        self.echo = echo_input(self.signature).name

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch[self.echo].to(self.device, self.signature.output.torch_dtype, non_blocking=True)

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        for b in batches:
            self.run(b)

    def batch_rows(self, b: int) -> int:
        return b

    def describe(self) -> dict[str, Any]:
        return describe_device(self.name, self.device, self.spec.model_dtype, None) | {
            "model": {"spec": self.spec.describe()}
        }


def load_backend(
    kind: BackendKind = "auto",
    spec: AnyModelSpec | None = None,
    *,
    buckets: Buckets | None = None,
    store: str | None = None,
    max_batch_tokens: int | None = None,
    device: torch.device | str | None = None,
    build_if_missing: bool = False,
    cuda_graphs: bool = False,
    compile: bool = False,
) -> Backend:
    """The backend of ``spec`` (default: the reference model's tiny preset); see the module docstring.

    The TensorRT backend loads this GPU's engine for (model, buckets, token budget) from
    ``store``; with ``build_if_missing`` it exports and builds it first, else a missing engine is
    an error naming the build command."""
    spec = spec if spec is not None else ReferenceSpec()
    if kind not in BACKEND_KINDS:
        raise ConfigError(f"backend must be one of {', '.join(map(repr, BACKEND_KINDS))}, got {kind!r}")
    if kind == "identity":
        return IdentityBackend(spec, device)
    if kind == "auto":
        if not trt.available():
            log.info("backend auto -> torch: TensorRT is not importable")
            kind = "torch"
        elif not torch.cuda.is_available():
            log.info("backend auto -> torch: TensorRT imports but no CUDA GPU is visible")
            kind = "torch"
        else:
            log.info("backend auto -> tensorrt: TensorRT %s and a CUDA GPU are present", trt.version())
            kind = "tensorrt"
    if kind == "torch":
        from fa3trt.serving.torch_backend import TorchBackend

        return TorchBackend(spec, device, cuda_graphs=cuda_graphs, compile=compile)
    for option, on in (("cuda_graphs", cuda_graphs), ("compile", compile)):
        if on:
            log.warning("%s applies to the torch backend; the TensorRT engine runs as built", option)
    if not torch.cuda.is_available():
        raise MissingDependencyError("backend 'tensorrt' needs a CUDA GPU and none is visible; use backend 'torch'")
    trt.require()  # raises with the install hint
    from fa3trt.serving.tensorrt_backend import TensorRTBackend

    return TensorRTBackend.load(
        spec,
        buckets=buckets or Buckets(BUCKETS),
        store=store,
        max_batch_tokens=max_batch_tokens or MAX_BATCH_TOKENS,
        device=device,
        build_if_missing=build_if_missing,
    )
