"""Check an exported ONNX file in ONNX Runtime (CPU) against the eager PyTorch model.

Contract:
- ``CustomAttnPlugin`` runs as an onnxruntime-extensions Python op that calls the same
  ``attn::custom_attn`` op (inputs q, k, v, seq_lens, seq_lens_k; attributes mode, causal,
  softmax_scale), registered once per process.
- ``verify_onnx(path, model, inputs)`` runs the file and ``model(**inputs)`` at the sample
  shapes and, for every dynamic axis of the file's inputs (an axis with a name), at the
  smallest and the largest of ``check_sizes[axis]`` with the other axes at their sample sizes.
  It returns the max abs difference over all runs and raises ``ExportError`` above ``atol``.
- Inputs at other sizes come from ``make_inputs(sizes)`` when given, else from the samples:
  floating inputs drawn anew, integer inputs tiled or cut along the resized axes (so inputs
  whose values depend on a size, such as lengths, need ``make_inputs``).
- An int64 input of an int32 graph input (``export_onnx`` narrows them) is fed narrowed; the
  eager model gets the int64 original.
- float32 only: ONNX Runtime's Python ops take float32.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from fa3trt.attention.op import PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.errors import ExportError
from fa3trt.onnx.calls import NamedCall

__all__ = ["verify_onnx", "onnx_input_axes", "check_shapes"]

log = logging.getLogger(__name__)

_ort_op_lock = threading.Lock()
_ort_op_registered = False


def _register_ort_plugin_op() -> None:
    """Register ``attn::CustomAttnPlugin`` as an onnxruntime-extensions Python op (once)."""
    global _ort_op_registered
    with _ort_op_lock:
        if _ort_op_registered:
            return
        from onnxruntime_extensions import PyCustomOpDef, onnx_op

        from fa3trt.attention.op import custom_attn

        f32, i32, i64, s = (
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_int32,
            PyCustomOpDef.dt_int64,
            PyCustomOpDef.dt_string,
        )

        @onnx_op(
            op_type=f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}",
            inputs=[f32, f32, f32, i32, i32],
            outputs=[f32],
            attrs={"mode": i64, "causal": i64, "softmax_scale": f32, "plugin_version": s, "plugin_namespace": s},
        )
        def _custom_attn_plugin(q, k, v, seq_lens, seq_lens_k, **attrs):  # type: ignore[no-untyped-def]
            if str(attrs.get("plugin_version", PLUGIN_VERSION)) != PLUGIN_VERSION:
                raise ExportError(f"node has plugin_version {attrs['plugin_version']!r}, this is {PLUGIN_VERSION}")
            # The node always carries both lengths (the same values for padded self-attention).
            out = custom_attn(
                torch.from_numpy(q),
                torch.from_numpy(k),
                torch.from_numpy(v),
                torch.from_numpy(seq_lens),
                torch.from_numpy(seq_lens_k),
                int(attrs.get("mode", 0)),
                bool(attrs.get("causal", 0)),
                float(attrs["softmax_scale"]),
            )
            return out.numpy()

        _ort_op_registered = True


def onnx_input_axes(path: str | os.PathLike[str]) -> tuple[dict[str, list[int | str]], list[str]]:
    """The file's graph inputs (name -> per axis its name or static size) and its output names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    return inputs, [o.name for o in graph.output]


def check_shapes(sample: dict[str, int], check_sizes: Mapping[str, list[int]] | None = None) -> list[dict[str, int]]:
    """The sample sizes, then per axis its smallest and largest check size (others at sample)."""
    shapes = [dict(sample)]
    for name, size in sample.items():
        sizes = list((check_sizes or {}).get(name, [size, max(1, size // 2) if size > 1 else 2]))
        for s in (min(sizes), max(sizes)):
            shape = {**sample, name: s}
            if shape not in shapes:
                shapes.append(shape)
    return shapes


def _resized(
    inputs: Mapping[str, torch.Tensor], axes: dict[str, list[int | str]], sizes: dict[str, int], g: torch.Generator
) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in inputs.items():
        shape = [sizes[a] if isinstance(a, str) and a else t.shape[i] for i, a in enumerate(axes.get(name, t.shape))]
        if t.is_floating_point():
            out[name] = torch.randn(shape, generator=g).to(t.dtype)
            continue
        for dim, n in enumerate(shape):
            if n != t.shape[dim]:
                t = t.index_select(dim, torch.arange(n) % t.shape[dim])
        out[name] = t
    return out


def _as_graph_dtype(t: torch.Tensor, onnx_type: str) -> np.ndarray:
    """A feed as the graph takes it: an int64 tensor for an int32 input (``narrow_int64``) is
    narrowed, as the runtime does; the model itself is called with the int64 original."""
    if t.dtype == torch.int64 and onnx_type == "tensor(int32)":
        return t.to(torch.int32).numpy()
    return t.numpy()


def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    *,
    output: str | int = 0,
    check_sizes: Mapping[str, list[int]] | None = None,
    make_inputs: Callable[[dict[str, int]], Mapping[str, torch.Tensor]] | None = None,
    atol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Run ``path`` in ONNX Runtime (CPU) and ``model`` eagerly; see the module docstring."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtypes = {str(t.dtype) for t in [*params[:1], *inputs.values()] if t.is_floating_point()}
    if dtypes - {"torch.float32"}:
        raise ExportError(
            f"verify_onnx needs a float32 model and inputs, got {sorted(dtypes)}; export a float32 copy to check"
        )

    axes, outputs = onnx_input_axes(path)
    missing = sorted(set(axes) - set(inputs))
    if missing:
        raise ExportError(f"{path} takes inputs {missing} that inputs= lacks; pass the inputs it was exported with")
    sample: dict[str, int] = {}
    for name, dims in axes.items():
        for i, a in enumerate(dims):
            if isinstance(a, str) and a:
                sample.setdefault(a, int(inputs[name].shape[i]))

    _register_ort_plugin_op()
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph_dtypes = {i.name: i.type for i in session.get_inputs()}
    call = NamedCall(model, list(inputs), output)
    worst = 0.0
    for sizes in check_shapes(sample, check_sizes):
        feed = (
            dict(inputs)
            if sizes == sample
            else dict(make_inputs(sizes) if make_inputs else _resized(inputs, axes, sizes, g))
        )
        (got,) = session.run(outputs[:1], {n: _as_graph_dtype(feed[n], graph_dtypes[n]) for n in axes})
        with torch.inference_mode():
            want = call(*feed.values()).numpy()
        if got.shape != want.shape:
            raise ExportError(f"ONNX Runtime output has shape {got.shape}, PyTorch {want.shape} at {sizes} for {path}")
        err = float(np.abs(got - want).max()) if want.size else 0.0
        if not err <= atol:  # also catches NaN
            raise ExportError(
                f"ONNX Runtime output differs from PyTorch by {err:.3g} (tolerance {atol:g}) at {sizes} for {path}"
            )
        log.info("ONNX Runtime vs PyTorch at %s: max abs error %.2e", sizes, err)
        worst = max(worst, err)
    return worst
