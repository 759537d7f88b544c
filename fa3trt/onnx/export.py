"""Export any model to ONNX by named inputs, its attention calls as ``CustomAttnPlugin`` nodes.

Contract:
- ``export_onnx(model, path, inputs, dynamic_axes)`` routes the model's attention calls to
  ``fa3trt.attention`` (``routing="auto"``: ``fa3trt.route_attention``; ``"off"`` keeps PyTorch's
  attention, for a model that calls the op itself or should not be routed), traces
  ``model(**inputs)`` with one ``torch.export.Dim`` per axis name of ``dynamic_axes`` (an axis
  name shared by inputs is one dimension; an axis of ``axis_steps`` is a multiple of its step),
  strictly first, then writes it with ``torch.onnx.export``. Every
  ``fa3trt.attention`` call becomes one ``attn::CustomAttnPlugin`` node; the selected output
  (``output``: a position or a name, see ``fa3trt.onnx.calls.select_output``) is the graph's one
  output ``output_name``; graph inputs carry the input names and their dynamic axes the axis
  names. Weights go to an external-data file past 2 GB (protobuf's limit). An int64 input is
  an int32 graph input, widened inside the graph (``fa3trt.onnx.calls`` says why).
- A declared axis that the model fixes to its sample size (a ``.view`` with a literal, a branch
  on the size) is an ``ExportError`` naming the input and the axis, whether torch.export refuses
  it or the ONNX graph input comes out static. Non-strict ``torch.export`` (the fallback when
  strict tracing fails, with a logged warning) refuses such an axis as well.
  ``ExportResult.strict`` says which one traced: ``fa3trt.attention`` traces to a plain custom
  op under strict tracing too (``fa3trt.onnx.node``), so only the model's own code can force
  the fallback.
- Sample sizes of dynamic axes must be >= 2: torch.export specializes sizes 0 and 1.
- ``ExportResult`` says how many calls became plugin nodes and each node's mode and head dim
  (``plugins``), and, where routing was on, how many calls were routed and why the rest were not
  (``routing``). A file with no plugin node is logged as a warning with those reasons.

``verify_onnx`` (``fa3trt.onnx.check``) runs the file in ONNX Runtime against the eager model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fa3trt._hashing import file_sha256
from fa3trt.attention.op import PLUGIN_NAME, onnx_export_mode
from fa3trt.attention.routing import RoutingReport, route_attention
from fa3trt.attention.routing import tracing as routing_tracing
from fa3trt.errors import ExportError
from fa3trt.onnx.calls import NamedCall, narrow_int64
from fa3trt.onnx.check import verify_onnx
from fa3trt.onnx.graph import plugin_calls
from fa3trt.onnx.node import translation_table

__all__ = ["export_onnx", "verify_onnx", "ExportResult", "plugin_nodes", "OPSET", "DEFAULT_AXIS_RANGES", "ROUTING"]

log = logging.getLogger(__name__)

OPSET = 20
"""Opset 20 has Gelu and LayerNormalization as single nodes, which TensorRT 10 parses natively."""
_PROTOBUF_LIMIT = 2 << 30
DEFAULT_AXIS_RANGES: dict[str, tuple[int, int]] = {"B": (1, 4096)}
"""Bounds of a dynamic axis by name; any other axis name gets ``(1, 1 << 20)``."""
_OTHER_AXIS_RANGE = (1, 1 << 20)


@dataclass(frozen=True)
class ExportResult:
    path: str
    sha256: str
    external_data: bool
    plugin_nodes: int
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per graph input, in order: ``{"dtype": "float32", "shape": ["B", "S", 256]}`` (axis name or static size)."""
    output: dict[str, Any] = field(default_factory=dict)
    """The graph's output: ``{"name": "y", "dtype": ..., "shape": [...]}``."""
    strict: bool = False
    """True when strict ``torch.export`` (dynamo) traced the model; False after the non-strict fallback."""
    plugins: list[dict[str, Any]] = field(default_factory=list)
    """Per plugin node, in graph order: ``{"mode", "causal", "head_dim"}`` (``fa3trt.onnx.graph.plugin_calls``)."""
    routing: dict[str, Any] | None = None
    """The routing report (``RoutingReport.as_dict()``: routed, and left alone by reason); None with routing off."""


ROUTING = ("auto", "sdpa", "transformers", "off")
"""``export_onnx``'s ``routing``: a ``route_attention`` method, or ``off``."""


def plugin_nodes(model_proto: object) -> list[object]:
    """The ``CustomAttnPlugin`` nodes of an ``onnx.ModelProto``."""
    return [n for n in model_proto.graph.node if n.op_type == PLUGIN_NAME]  # type: ignore[attr-defined]


def _axis_dims(
    inputs: dict[str, torch.Tensor],
    dynamic_axes: dict[str, dict[int, str]],
    axis_ranges: dict[str, tuple[int, int]] | None,
    axis_steps: dict[str, int] | None = None,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """One ``torch.export.Dim`` per axis name, validated against the samples; and where each name is used.

    An axis with a step k > 1 is ``k * Dim``: torch.export then knows its size is a multiple of
    k, so a model that divides it by its patch size traces without specializing it."""
    ranges = {**DEFAULT_AXIS_RANGES, **(axis_ranges or {})}
    steps = axis_steps or {}
    dims: dict[str, Any] = {}
    where: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, axes in dynamic_axes.items():
        if name not in inputs:
            raise ExportError(f"dynamic_axes names input {name!r}, but inputs has {list(inputs)}; name an input")
        for axis, axis_name in axes.items():
            t = inputs[name]
            if not (isinstance(axis, int) and 0 <= axis < t.dim()):
                raise ExportError(
                    f"dynamic_axes[{name!r}] has axis {axis!r}; {name} has {t.dim()} axes (0..{t.dim() - 1})"
                )
            if not (isinstance(axis_name, str) and axis_name.isidentifier()):
                raise ExportError(
                    f"dynamic_axes[{name!r}][{axis}] = {axis_name!r}; an axis name is an identifier like 'B'"
                )
            size = int(t.shape[axis])
            where.setdefault(axis_name, []).append(f"{name}[{axis}]")
            if sizes.setdefault(axis_name, size) != size:
                raise ExportError(
                    f"axis {axis_name} has sample size {sizes[axis_name]} in {where[axis_name][0]} and {size} in "
                    f"{name}[{axis}]; one axis name is one size, give the samples equal sizes there or rename one axis"
                )
            lo, hi = ranges.get(axis_name, _OTHER_AXIS_RANGE)
            if size < 2 or not lo <= size <= hi:
                raise ExportError(
                    f"{name}[{axis}] (axis {axis_name}) has sample size {size}; a dynamic axis needs a sample size >= 2 "
                    f"(torch.export specializes 0 and 1) within its range [{lo}, {hi}]; choose another sample size"
                )
            step = steps.get(axis_name, 1)
            if size % step:
                raise ExportError(
                    f"{name}[{axis}] (axis {axis_name}) has sample size {size}, not a multiple of its step {step}; "
                    "choose a sample size that is"
                )
            if axis_name not in dims:
                if step > 1:
                    # The Dim counts steps; the sample has at least two (torch.export specializes 0 and 1).
                    base = torch.export.Dim(f"{axis_name}_steps", min=max(1, -(-lo // step)), max=hi // step)
                    dims[axis_name] = step * base
                else:
                    dims[axis_name] = torch.export.Dim(axis_name, min=lo, max=hi)
    return dims, where


def _specialized(e: BaseException, where: dict[str, list[str]], names: list[str]) -> ExportError | None:
    """An ExportError naming the inputs and axes if ``e`` is torch.export's constraint violation."""
    text = str(e)
    kind = getattr(getattr(e, "error_type", None), "name", "")
    if kind != "CONSTRAINT_VIOLATION" and "Constraints violated" not in text:
        return None
    # torch names inputs by their place in the adapter's *args: L['args'][i].size()[j].
    text = re.sub(r"L\['args'\]\[(\d+)\]\.size\(\)\[(\d+)\]", lambda m: f"{names[int(m[1])]}.shape[{m[2]}]", text)
    m = re.search(r"Constraints violated \(([^)]*)\)", text)
    named = [n.strip() for n in m.group(1).split(",")] if m else []
    axes = [n for n in where if n in named] or [n for n in where if re.search(rf"\b{re.escape(n)}\b", text)]
    lines = [line.strip() for line in text.splitlines()]
    reasons = [line[2:] for line in lines if line.startswith("- ")]
    if "Suggested fixes:" in lines:  # a block of "T = S" lines, up to an empty one
        fixes = [*lines[lines.index("Suggested fixes:") + 1 :], ""]
        reasons.append("torch suggests " + ", ".join(fixes[: fixes.index("")]))
    shown = (" | ".join(r if len(r) <= 300 else r[:300] + "..." for r in reasons[:3]) or lines[0]).rstrip(".")
    more = f" ({len(reasons) - 3} more)" if len(reasons) > 3 else ""
    named_axes = "; ".join(f"axis {n} ({', '.join(where[n])})" for n in axes) or "a declared axis"
    return ExportError(
        f"{named_axes} is declared dynamic but the model fixes or constrains its size: {shown}{more}. Fix: remove "
        "what fixes the size (a .view/.reshape with a literal size, a branch on the size); for axes that must be "
        "equal, use one axis name for both; or drop the axis from dynamic_axes to export it static."
    )


def _trace(
    call: NamedCall, args: tuple[torch.Tensor, ...], shapes: Any, where: dict[str, list[str]]
) -> tuple[Any, bool]:
    """``torch.export`` strictly, else non-strictly (a logged warning); the program and whether
    strict tracing made it. Specialization is an ExportError."""
    for strict in (True, False):
        try:
            with onnx_export_mode(), routing_tracing():
                return torch.export.export(call, args, dynamic_shapes={"args": shapes}, strict=strict), strict
        except Exception as e:
            if (err := _specialized(e, where, list(call.names))) is not None:
                raise err from e
            if not strict:
                raise ExportError(f"torch.export failed for {type(call.model).__name__}: {e}") from e
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            log.warning(
                "strict torch.export failed for %s (%s); falling back to non-strict torch.export, which still "
                "refuses a declared axis that specializes",
                type(call.model).__name__,
                first,
            )
    raise AssertionError("unreachable")


def _name_axes(proto: Any, dynamic_axes: dict[str, dict[int, str]], where: dict[str, list[str]]) -> None:
    """Give the graph's symbolic dims the declared axis names; a declared axis left static is an ExportError."""
    graph = proto.graph
    rename: dict[str, str] = {}
    for inp in graph.input:
        dims = inp.type.tensor_type.shape.dim
        for axis, axis_name in dynamic_axes.get(inp.name, {}).items():
            if not dims[axis].dim_param:
                raise ExportError(
                    f"axis {axis_name} of input {inp.name} (axis {axis}) came out static ({dims[axis].dim_value}) in "
                    f"the ONNX graph: the exporter specialized it ({', '.join(where[axis_name])}). Fix: remove what "
                    "fixes its size in the model, or drop the axis from dynamic_axes to export it static."
                )
            rename[dims[axis].dim_param] = axis_name
    if not rename:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(rename, key=len, reverse=True))) + r")\b")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param:
                d.dim_param = pattern.sub(lambda m: rename[m.group(1)], d.dim_param)


def _schema(value: Any) -> dict[str, Any]:
    import onnx

    t = value.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
    return {"dtype": dtype, "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: dict[str, torch.Tensor],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    *,
    output: str | int = 0,
    output_name: str = "y",
    axis_ranges: dict[str, tuple[int, int]] | None = None,
    axis_steps: dict[str, int] | None = None,
    routing: str = "auto",
    key_padding_masks: bool = False,
    attn_mode: int = 0,
    plugin_namespace: str = "",
    external_data: bool | None = None,
    narrow_int64_inputs: bool = True,
) -> ExportResult:
    """Export ``model(**inputs)`` to ``path`` (see the module docstring); returns the file's record.

    ``dynamic_axes``: per input, axis -> axis name (None: all static). ``axis_ranges``: per axis
    name (min, max), defaults ``DEFAULT_AXIS_RANGES``; ``axis_steps``: per axis name the step its
    sizes are a multiple of. ``routing``: a ``route_attention`` method (``"auto"``) or ``"off"``;
    ``key_padding_masks``: the caller's promise that every mask the model builds is a key-padding
    prefix mask (``route_attention``'s); ``attn_mode``: the routed calls' mode (1: FP8 attention,
    recorded on each plugin node). ``external_data``: None decides by size.
    ``narrow_int64_inputs``: int64 inputs become int32 graph inputs, widened inside the graph
    (``fa3trt.onnx.calls``' docstring says why); False keeps them int64.
    """
    import onnx

    if routing not in ROUTING:
        raise ExportError(f"routing must be one of {list(ROUTING)}, got {routing!r}; 'off' keeps PyTorch's attention")
    if not isinstance(inputs, dict) or not inputs or not all(isinstance(t, torch.Tensor) for t in inputs.values()):
        raise ExportError(
            f"inputs must be a non-empty dict of name -> sample tensor (the model's keyword inputs), got "
            f"{type(inputs).__name__}"
        )
    if output_name in inputs:
        raise ExportError(f"output_name {output_name!r} is also an input's name; pass another output_name=")
    dynamic_axes = dict(dynamic_axes or {})
    if next(model.parameters(), torch.empty(0)).device.type != "cpu":
        # Trace on the CPU: the graph does not depend on the device, and some torch releases
        # (2.11) give the plugin node's placeholder output a CPU device inside a CUDA graph.
        model = copy.deepcopy(model).to("cpu")
    inputs = {name: t.to("cpu") for name, t in inputs.items()}
    dims, where = _axis_dims(inputs, dynamic_axes, axis_ranges, axis_steps)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = n_bytes > _PROTOBUF_LIMIT - (64 << 20)

    widen: list[str] = []
    if narrow_int64_inputs:
        inputs, widen = narrow_int64(inputs)
    call = NamedCall(model, list(inputs), output, widen)
    args = tuple(inputs.values())
    shapes = tuple({a: dims[n] for a, n in dynamic_axes.get(name, {}).items()} or None for name in inputs)
    report: RoutingReport | None = None
    with contextlib.ExitStack() as stack:
        if routing != "off":
            report = stack.enter_context(
                route_attention(model, routing, key_padding_masks=key_padding_masks, attn_mode=attn_mode)
            )
        program, strict = _trace(call, args, shapes, where)
    try:
        with onnx_export_mode():
            onnx_program = torch.onnx.export(
                program,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=[output_name],
                custom_translation_table=translation_table(),
                verbose=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {e}") from e
    if onnx_program is None:  # the dynamo exporter always returns a program; guard the type
        raise ExportError("torch.onnx.export returned no program")
    onnx_program.save(str(path), external_data=external_data)

    # Edits after export: the axis names (torch.export's symbols are s0, s1, ...), and the plugin
    # namespace, a deployment choice rather than a property of the model.
    proto = onnx.load(str(path), load_external_data=False)
    _name_axes(proto, dynamic_axes, where)
    nodes = plugin_nodes(proto)
    if not nodes:
        why = (
            f"routing found no call it could route ({report.summary()})"
            if report is not None
            else "routing is off and the model never calls fa3trt.attention"
        )
        log.warning("%s has no %s node: %s", path, PLUGIN_NAME, why)
    for node in nodes:
        for attr in node.attribute:  # type: ignore[attr-defined]
            if attr.name == "plugin_namespace" and plugin_namespace:
                attr.s = plugin_namespace.encode()
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    schema = {i.name: _schema(i) for i in proto.graph.input}
    out = {"name": proto.graph.output[0].name, **_schema(proto.graph.output[0])}
    result = ExportResult(
        str(path),
        file_sha256(path),
        bool(external_data),
        len(nodes),
        schema,
        out,
        strict,
        plugin_calls(path),
        report.as_dict() if report is not None else None,
    )
    log.info(
        "exported %s (%s torch.export): %d plugin nodes, inputs %s, sha256 %s",
        path,
        "strict" if strict else "non-strict",
        len(nodes),
        schema,
        result.sha256[:12],
    )
    return result
