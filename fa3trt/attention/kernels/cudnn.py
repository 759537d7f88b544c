"""cuDNN attention: PyTorch SDPA's cuDNN kernel (``cudnn``) and the cuDNN frontend's
padding-mask graph (``cudnn_padded``, ``fa3trt.attention.kernels.cudnn_graph``), and when a shape has
earned its cuDNN plan (``plans``).

cuDNN builds an execution plan per new shape, then runs faster than PyTorch's flash kernel,
which needs no plan. Which one pays depends on how much work the shape will still see, which
is unknown: so a shape runs on flash until the attention work done in it would have repaid a
plan build (ski rental: never more than twice the better choice). A fixed serving shape
reaches cuDNN within a few calls; a stream of random lengths stays on flash and never pays a
plan build. The measured plan costs and rates behind ``PLAN_AFTER_FLOPS`` are in
docs/benchmarks.md, section 1. (Counting sightings instead made a 2-layer model build a plan
on every request: its second layer is a second sighting.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fa3trt.attention.kernels import cudnn_graph, sdpa
from fa3trt.attention.kernels.base import (
    HALF_DTYPES,
    AttentionKernel,
    Ragged,
    host_lengths,
    is_plain,
    key_lengths,
    log_once,
)
from fa3trt.attention.kernels.flash import FlashSeqused
from fa3trt.attention.kernels.math import Math
from fa3trt.errors import CudnnGraphUnsupportedError

__all__ = ["Cudnn", "CudnnPadded", "PlanLedger", "plans", "PLAN_AFTER_FLOPS"]

PLAN_AFTER_FLOPS = 40e12
"""Attention work (FLOP) a shape must have seen before it runs on cuDNN: what a plan build repays."""


class PlanLedger:
    """Attention work seen per (graph, shape), bounded; ``ready`` once a shape has earned its plan."""

    def __init__(self, after_flops: float = PLAN_AFTER_FLOPS, max_shapes: int = 4096) -> None:
        self.after_flops = after_flops
        self.max_shapes = max_shapes
        self.flops: dict[tuple[object, ...], float] = {}

    def ready(self, q: torch.Tensor, n: int, graph: str = "sdpa") -> bool:
        """Count one call of the (1 or B, n, H, D) shape for a cuDNN ``graph``; True once it
        should run on cuDNN."""
        key = (graph, q.shape[0], n, q.shape[2], q.shape[3], q.dtype, q.device)
        done = self.flops.get(key, 0.0)
        if done >= self.after_flops:
            return True
        if len(self.flops) >= self.max_shapes and key not in self.flops:
            self.flops.clear()  # a bounded memory of shapes; forgetting only costs flash runs
        self.flops[key] = done + 4.0 * q.shape[0] * n * n * q.shape[2] * q.shape[3]
        return self.flops[key] >= self.after_flops


plans = PlanLedger()
"""The process's ledger, shared by every kernel that sends recurring shapes to cuDNN."""


def _padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor | None:
    """A ragged batch in one cuDNN launch with a padding mask, or None when the frontend is
    missing or refuses the shape: the caller then takes another path."""
    if q.dtype == torch.float32 or not cudnn_graph.available():
        return None
    try:
        return cudnn_graph.ragged_attention(q, k, v, seq_lens)
    except CudnnGraphUnsupportedError as e:
        log_once(
            f"cuDNN padded-batch SDPA unavailable for {tuple(q.shape)} {q.dtype} ({e}); using per-sequence kernels"
        )
        return None


class Cudnn(AttentionKernel):
    """cuDNN for shapes that recur, PyTorch's flash kernel for the rest (module docstring).

    Ragged batches with lengths on the host run each sequence at its own length on cuDNN when
    every length recurs, else in one cuDNN launch with a padding mask (the frontend, once the
    padded shape recurs), else in one launch of the flash kernel with device-side lengths.
    Lengths on the device take the padding-mask launch first: no host sync. (Their rates:
    docs/benchmarks.md, section 1.)
    """

    name = "cudnn"

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        if q.device.type != "cuda":
            return Math.forward(q, k, v, seq_lens, seq_lens_k, causal=causal, scale=scale)
        if not is_plain(q, k, seq_lens, seq_lens_k, causal, scale):
            return sdpa.general(q, k, v, seq_lens, seq_lens_k, "cudnn", causal=causal, scale=scale)
        b, s = q.shape[:2]
        on_device = seq_lens is not None and seq_lens.device.type == "cuda"
        if seq_lens is not None and on_device and plans.ready(q, s, "padded"):
            out = _padded(q, k, v, seq_lens)  # device lengths: no host sync on this path
            if out is not None:
                return out
        lens = None if seq_lens is None else host_lengths(seq_lens)
        if lens is None or all(n == s for n in lens):
            return sdpa.dense(q, k, v, "cudnn" if plans.ready(q, s) else "flash")
        one = q[:1]
        ready = all(plans.ready(one, n) for n in set(lens) if n > 0)
        if ready or q.dtype == torch.float32:  # the flash kernel takes fp16/bf16 only
            return sdpa.per_sequence(q, k, v, lens, "cudnn" if ready else "efficient")
        # Host lengths only: device lengths had their one look at the padded shape above.
        if seq_lens is not None and not on_device and plans.ready(q, s, "padded"):
            out = _padded(q, k, v, seq_lens)
            if out is not None:
                return out
        return FlashSeqused.forward(q, k, v, seq_lens)


class CudnnPadded(AttentionKernel):
    """The cuDNN frontend's padding-mask graph for every ragged call (dense calls on SDPA cuDNN).

    Chosen by itself inside TensorRT only from sm90 (``auto_from``): before it, PyTorch's
    flash kernel with ``seqused_k`` needs no plan."""

    name = "cudnn_padded"
    dtypes = HALF_DTYPES
    device_lengths = True
    direct_write = True
    causal = False
    auto_from = (9, 0)
    install_hint = cudnn_graph.INSTALL_HINT

    @classmethod
    def importable(cls) -> bool:
        return cudnn_graph.available()

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        lens_k = key_lengths(seq_lens, seq_lens_k, q.shape[1], k.shape[1])
        if seq_lens is None and lens_k is None:
            return sdpa.attend(q, k, v, "cudnn", causal=causal, scale=scale).contiguous()
        lens_q = torch.full((q.shape[0],), q.shape[1], dtype=torch.int32) if seq_lens is None else seq_lens
        return cudnn_graph.ragged_attention(q, k, v, lens_q, lens_k, scale=scale)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: Ragged, causal: bool, scale: float
    ) -> torch.Tensor:
        try:
            return cudnn_graph.ragged_attention(q, k, v, r.lens_q, r.lens_k, scale=scale, zero_tail=False)
        except CudnnGraphUnsupportedError as e:  # cached per shape: one refusal, then this path
            log_once(f"CustomAttnPlugin: {e}; this shape runs on {FlashSeqused.name}")
            b, h, d = q.shape[0], q.shape[2], q.shape[3]
            hk = k.shape[2]
            flat_q, flat_k = FlashSeqused.packed_shape(b, r.sq, h, d), FlashSeqused.packed_shape(b, r.sk, hk, d)
            return FlashSeqused.forward_packed(q.view(flat_q), k.view(flat_k), v.view(flat_k), r, causal, scale)

    @classmethod
    def launcher(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens_q: torch.Tensor,
        lens_k: torch.Tensor,
        out: torch.Tensor,
        causal: bool,
        scale: float,
    ) -> Callable[[], None] | None:
        try:
            return cudnn_graph.prepare(q, k, v, lens_q, out, lens_k, scale)
        except CudnnGraphUnsupportedError as e:
            log_once(f"CustomAttnPlugin: {e}; this shape is copied in from {FlashSeqused.name}")
            return None
