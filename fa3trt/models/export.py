"""A model source to ONNX by its signature, and the file's check against the eager model.

Contract:
- ``export_source(spec, path, buckets)`` exports the model of any spec with its attention routed
  by the spec's method (one ``CustomAttnPlugin`` node per routed call; the reference model calls
  the op itself), its inputs and axes named by its signature, its axes' ranges from the
  signature and the buckets, their steps as multiples, and its output selected. Where an input
  is ``fill: mask`` (the server makes it: a key-padding prefix mask) the routing is told so
  (``key_padding_masks``), and the traced masks become key lengths.
- ``verify_source(spec, path, buckets)`` checks the file in ONNX Runtime against the eager,
  unrouted model in float32, at the export's sample sizes and at each axis's smallest and largest
  accepted size, with the filled inputs made from ragged lengths (padded masks and lengths), as
  the server makes them. A file exported in another dtype is checked through a float32 export.
- ``export_sizes`` are sizes every axis accepts: 16 within its range, rounded to its step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError
from fa3trt.models.sources import Loaded, load_source
from fa3trt.models.spec import AnyModelSpec
from fa3trt.onnx.check import verify_onnx
from fa3trt.onnx.export import ExportResult, export_onnx
from fa3trt.signature import BATCH_AXIS, Signature, round_down, round_up

__all__ = ["export_source", "verify_source", "export_sizes", "ragged_lengths", "EXPORT_BATCH"]

EXPORT_BATCH = 2
"""The batch axis's sample size (torch.export specializes 0 and 1)."""


def export_sizes(signature: Signature, buckets: Buckets) -> dict[str, int]:
    """Sample sizes for export: each named axis at 16 within its range and a multiple of its step,
    at least two steps (torch.export specializes sizes 0 and 1), the batch axis at 2."""
    sizes = {BATCH_AXIS: EXPORT_BATCH}
    for a in sorted(signature.axis_names()):
        lo, hi = signature.axis_range(a, buckets)
        step = signature.step(a)
        want = round_up(max(lo, 2 * step, 16), step)
        size = min(want, round_down(hi, step))
        if size < max(2, lo) or size < 2 * step and step > 1:
            raise ConfigError(
                f"axis {a!r} has range [{lo}, {hi}] and step {step}; a dynamic axis needs room for two sizes "
                f"(max >= {max(2, 2 * step)}), or make it a fixed size"
            )
        sizes[a] = size
    return sizes


def export_source(
    spec: AnyModelSpec, path: str | os.PathLike[str], buckets: Buckets, loaded: Loaded | None = None
) -> ExportResult:
    """Export the model of ``spec`` (see the module docstring)."""
    loaded = loaded or load_source(spec)
    sig = loaded.signature
    sizes = export_sizes(sig, buckets)
    inputs = loaded.samples if loaded.samples is not None else sig.samples(sizes, sizes[BATCH_AXIS])
    dtype = getattr(torch, spec.model_dtype)  # float inputs in the model's dtype (the engine's inputs)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return export_onnx(
        loaded.module,
        path,
        {t.name: inputs[t.name] for t in sig.inputs},
        sig.dynamic_axes(),
        output=spec.select,
        output_name=sig.output.name,
        axis_ranges={a: sig.axis_range(a, buckets) for a in sig.axis_names()},
        axis_steps={a: sig.step(a) for a in sig.axis_names() if sig.step(a) > 1},
        routing=spec.routing,
        attn_mode=0 if spec.routing == "off" else spec.attn_mode,
        # The server makes a fill: mask input from each request's length: a key-padding prefix mask.
        key_padding_masks=any(t.fill == "mask" for t in sig.inputs),
    )


def ragged_lengths(batch: int, length: int, step: int = 1) -> list[int]:
    """Lengths along the bucketed axis for checks: the full length, about half, and the smallest
    (each a multiple of ``step``), repeated, so a batch of two or more holds padded sequences."""
    return [(length, max(step, round_down(length // 2, step)), step)[i % 3] for i in range(batch)]


def verify_source(spec: AnyModelSpec, path: str | os.PathLike[str], buckets: Buckets) -> float:
    """The exported file in ONNX Runtime against the eager, unrouted model in float32 (see the
    module docstring); returns the largest absolute difference."""
    spec32 = spec.model_copy(update={"dtype": "float32"})
    loaded = load_source(spec32)
    sig = loaded.signature
    if spec.model_dtype != "float32":
        path = Path(path).with_name(Path(path).stem + "-verify-float32.onnx")
        export_source(spec32, path, buckets, load_source(spec32))
    sizes = export_sizes(sig, buckets)

    def make_inputs(s: dict[str, int]) -> dict[str, torch.Tensor]:
        lengths = ragged_lengths(s[BATCH_AXIS], s[sig.bucketed], sig.step(sig.bucketed))
        made = sig.samples(s, s[BATCH_AXIS], lengths=lengths)
        return {t.name: made[t.name] for t in sig.inputs}

    check: dict[str, list[int]] = {BATCH_AXIS: [1, 3]}
    for a in sig.axis_names():
        accepted = sig.accepted(a, *sig.axis_range(a, buckets))
        assert accepted is not None  # export_sizes found one
        check[a] = list(accepted)
    return verify_onnx(
        path, loaded.module, make_inputs(sizes), output=spec.select, check_sizes=check, make_inputs=make_inputs
    )
