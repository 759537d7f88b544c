"""What an ONNX file takes, gives and holds, read without its weights.

Contract:
- ``graph_io(path)``: each graph input and output as (dtype in ``fa3trt.signature``'s
  vocabulary, rank, is_input), and each one's dims (a static size, or its axis name).
- ``plugin_calls(path)``: each ``CustomAttnPlugin`` node's ``mode``, ``causal`` and head dim
  (the last dim of its query, from the exporter's shapes or ONNX shape inference; None where no
  shape says). Engines record them, so a replica checks an FP8 engine's head dims on its GPU
  before loading it.
The ``onnx`` package is imported here, lazily.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from fa3trt.attention.op import PLUGIN_NAME

__all__ = ["IOSpec", "graph_io", "plugin_calls", "ONNX_DTYPES"]

IOSpec = tuple[str, int, bool]
"""One engine or ONNX tensor as the checks see it: (dtype name as in ``TORCH_DTYPES``, rank, is_input)."""

ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool"}
"""ONNX element types in the signature's dtype vocabulary."""


def _load(path: str | os.PathLike[str]) -> Any:
    import onnx

    return onnx.load(os.fspath(path), load_external_data=False)


def graph_io(path: str | os.PathLike[str]) -> tuple[dict[str, IOSpec], dict[str, list[int | str]]]:
    """The file's graph inputs and outputs as (dtype, rank, is_input), and each one's dims."""
    import onnx

    graph = _load(path).graph
    io: dict[str, IOSpec] = {}
    dims: dict[str, list[int | str]] = {}
    for values, is_input in ((graph.input, True), (graph.output, False)):
        for v in values:
            t = v.type.tensor_type
            dtype = ONNX_DTYPES.get(t.elem_type, onnx.TensorProto.DataType.Name(t.elem_type).lower())
            io[v.name] = (dtype, len(t.shape.dim), is_input)
            dims[v.name] = [d.dim_param or d.dim_value for d in t.shape.dim]
    return io, dims


def plugin_calls(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``{"mode", "causal", "head_dim"}`` of each ``CustomAttnPlugin`` node, in graph order."""
    import onnx

    proto = _load(path)
    nodes = [n for n in proto.graph.node if n.op_type == PLUGIN_NAME]
    if not nodes:
        return []
    shapes = _shapes(proto.graph)
    if any(n.input[0] not in shapes for n in nodes):
        # Best effort: a head dim that shape inference cannot give stays None.
        with contextlib.suppress(Exception):
            shapes |= _shapes(onnx.shape_inference.infer_shapes(proto).graph)
    out = []
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        dims = shapes.get(n.input[0])
        head_dim = dims[-1] if dims and isinstance(dims[-1], int) and dims[-1] > 0 else None
        out.append({"mode": int(attrs.get("mode", 0)), "causal": bool(attrs.get("causal", 0)), "head_dim": head_dim})
    return out


def _shapes(graph: Any) -> dict[str, list[int | str]]:
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output, *graph.value_info]
        if v.type.HasField("tensor_type")
    }
