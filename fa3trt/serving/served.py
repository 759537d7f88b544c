"""A user's model as a serving backend: named inputs in, one output out.

Contract:
- ``ModuleBackend(spec)`` loads the model of a ``SourceSpec`` (``fa3trt.models.sources``) onto the
  device and runs batches (keyword tensors as ``Signature.assemble`` makes them, batch axis
  first) under ``fa3trt.route_attention`` with the spec's method (``routing: off``: as is). It
  returns the selected output (B, ...) on the device. Every batch's routing report is added to
  ``routing`` (the totals ``/v1/info`` shows); the warmup's report is logged at INFO when the
  replica starts.
- One batch at a time per backend: the transformers hook of ``route_attention`` sets the
  model's attention implementation for the length of a call.
- ``check_padding(backend, buckets)`` proves at start that ``batching: pad`` is exact for this
  model: a request alone and the same request padded in a batch with a longer one must agree,
  else a ``ConfigError`` says to batch by shape.
- ``load_named_backend(kind, spec, ...)`` picks the backend as ``fa3trt.load_backend`` does:
  ``ModuleBackend``, or this GPU's engine of the model (``fa3trt.trt.named_runtime``) from the
  store, exported and built first where it is missing and ``build_if_missing`` is set. Both
  follow ``NamedBackend``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fa3trt.attention.kernels.selector import select_kernel
from fa3trt.attention.routing import RoutingReport, route_attention
from fa3trt.buckets import Buckets
from fa3trt.config import SourceSpec
from fa3trt.errors import ConfigError, EngineNotFoundError, MissingDependencyError
from fa3trt.models.sources import load_source, model_id
from fa3trt.onnx.calls import select_output
from fa3trt.serving.backends import BackendKind, default_device, describe_device
from fa3trt.signature import Checked, Signature
from fa3trt.trt import _trt

__all__ = ["NamedBackend", "ModuleBackend", "load_named_backend", "check_padding", "PAD_TOLERANCE"]

log = logging.getLogger(__name__)

PAD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
"""Largest difference, relative to the answer's largest value, between a request alone and the
same request padded in a batch (summation order only; a leak through the padding is of order 1)."""


@runtime_checkable
class NamedBackend(Protocol):
    """Runs a batch of a user's model: keyword tensors (batch axis first, as
    ``Signature.assemble`` makes them) in, the selected output (B, ...) on ``device`` out."""

    name: str
    device: torch.device
    signature: Signature

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class ModuleBackend:
    """A user's PyTorch model under attention routing, on the CPU or a CUDA device."""

    name = "torch"

    def __init__(self, spec: SourceSpec, device: torch.device | str | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype: torch.dtype = getattr(torch, spec.dtype)
        loaded = load_source(spec)
        self.signature: Signature = loaded.signature
        self.module = loaded.module.to(self.device)
        self.model_id = model_id(spec)
        self.kernel = select_kernel(self.device)
        self.routing = RoutingReport(spec.routing)
        self._lock = threading.Lock()

    def run(self, batch: dict[str, torch.Tensor], report: RoutingReport | None = None) -> torch.Tensor:
        """The model's selected output for one batch, on the device; routing counted in
        ``report`` (default: the backend's totals)."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._lock, torch.inference_mode():
            if self.spec.routing == "off":
                out = self.module(**batch)
            else:
                with route_attention(self.module, self.spec.routing, log_level=logging.DEBUG) as this:
                    out = self.module(**batch)
                (report or self.routing).add(this)
            return select_output(out, self.spec.output.select)

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        warm = RoutingReport(self.routing.method)
        for b in batches:
            self.run(b, warm)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.routing.add(warm)
        routed = warm.summary() if self.spec.routing != "off" else "routing off"
        log.info("torch backend warmed %d batches in %.2fs; %s", len(batches), time.perf_counter() - t0, routed)

    def describe(self) -> dict[str, Any]:
        return describe_device(self.name, self.device, self.spec.dtype, self.kernel) | {
            "model": {
                "source": self.spec.source,
                "class": self.spec.class_name or self.spec.factory,
                "model_id": self.model_id,
            },
            "routing": self.routing.as_dict(),
        }


def load_named_backend(
    kind: BackendKind,
    spec: SourceSpec,
    *,
    buckets: Buckets,
    store: str | None = None,
    max_batch_tokens: int | None = None,
    device: torch.device | str | None = None,
    build_if_missing: bool = False,
) -> NamedBackend:
    """The backend of a user's model: ``torch`` (``ModuleBackend``), ``tensorrt`` (this GPU's
    engine of the model from ``store``, built by ``python -m build_jobs``; with
    ``build_if_missing``, exported and built here first when the store lacks it), or ``auto``
    (TensorRT when it imports and a GPU is present, else torch)."""
    if kind == "identity":
        raise ConfigError(
            "backend 'identity' answers with the request's own input, which only the reference model's shape allows "
            "(model: preset); serve a user's model with backend 'torch', 'tensorrt' or 'auto'"
        )
    if kind not in ("auto", "torch", "tensorrt"):
        raise ConfigError(f"backend must be 'auto', 'torch' or 'tensorrt', got {kind!r}")
    if kind == "auto":
        kind = "tensorrt" if _trt.available() and torch.cuda.is_available() else "torch"
        log.info("backend auto -> %s for a %s model", kind, spec.source)
    if kind == "torch":
        return ModuleBackend(spec, device)
    if not torch.cuda.is_available():
        raise MissingDependencyError("backend 'tensorrt' needs a CUDA GPU and none is visible; use backend 'torch'")
    _trt.require()
    from fa3trt.trt.named_runtime import NamedTensorRTBackend

    def load() -> NamedBackend:
        return NamedTensorRTBackend.load(
            spec.signature(),
            model_id(spec),
            buckets=buckets,
            store=store,
            max_batch_tokens=max_batch_tokens,
            device=device,
        )

    try:
        return load()
    except EngineNotFoundError:
        if not build_if_missing:
            raise
    import tempfile

    from fa3trt.artifacts import build_source_to_store
    from fa3trt.store import ArtifactStore
    from fa3trt.trt.build import DEFAULT_MAX_BATCH_TOKENS

    st = ArtifactStore(store)
    log.info(
        "no engine in %s for %s on this GPU: exporting and building it now (build_if_missing)", st.uri, spec.source
    )
    with tempfile.TemporaryDirectory(prefix="fa3trt-build-") as tmp:
        build_source_to_store(st, spec, buckets, max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS, tmp)
    return load()


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max()) or 1.0
    return float(np.abs(a.astype(np.float64) - b).max()) / scale


def check_padding(backend: NamedBackend, buckets: Buckets, dtype: torch.dtype) -> float:
    """For ``batching: pad``: a request alone vs the same request padded next to a longer one
    (see the module docstring). Returns the relative difference; raises ``ConfigError`` past
    ``PAD_TOLERANCE`` (``dtype``: the model's, which sets the tolerance)."""
    sig = backend.signature
    if sig.batching != "pad":
        return 0.0
    long = min(buckets.edges[0], buckets.max_len)
    short = max(1, long // 2)
    if short == long:
        return 0.0
    reqs = []
    for n, seed in ((short, 1), (long, 2)):
        sample = sig.samples(sig.sample_sizes(buckets, n) | {a: lo for a, (lo, _) in sig.ranges.items()}, 1, seed)
        tensors = {t.name: sample[t.name][0].float().numpy() for t in sig.sent if t.torch_dtype.is_floating_point}
        tensors |= {t.name: sample[t.name][0].numpy() for t in sig.sent if not t.torch_dtype.is_floating_point}
        reqs.append(Checked(tensors, 0, n))
    alone = sig.split(backend.run(sig.assemble(reqs[:1], backend.device)).cpu(), reqs[:1])[0]
    padded = sig.split(backend.run(sig.assemble(reqs, backend.device)).cpu(), reqs)[0]
    diff = _rel_diff(padded, alone)
    if not diff <= PAD_TOLERANCE.get(dtype, 1e-3):
        raise ConfigError(
            f"batching: pad is not exact for this model: a request of {short} alone and padded to {long} in a batch "
            f"differ by {diff:.3g} of its largest value (its padding reaches other tokens through an op that "
            "reads no lengths: a mask input, fill: mask, lets attention skip it); use batching: shape"
        )
    log.info("batching: pad checked exact for this model (relative difference %.2e)", diff)
    return diff
