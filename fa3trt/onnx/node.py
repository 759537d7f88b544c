"""The ``attn::CustomAttnPlugin`` ONNX node: its schema, and its translation from the traced op.

Contract:
- Under ``fa3trt.attention.op.onnx_export_mode`` every ``fa3trt.attention`` call traces to one
  ``attn::plugin_node`` op (``fa3trt.attention.op``), a plain torch custom op that strict
  ``torch.export`` (dynamo) traces like any other: the export branch is decided outside the
  traced code, and no ONNX-only call sits in the model's path.
- ``translation_table()`` is the ``custom_translation_table`` that ``torch.onnx.export`` needs
  for such a program: ``attn::plugin_node`` becomes one ``CustomAttnPlugin`` node (domain
  ``attn``, version 1) with inputs q, k, v, seq_lens, seq_lens_k and attributes ``mode``,
  ``causal`` (int), ``softmax_scale`` (float), ``plugin_version``, ``plugin_namespace``.
- The node's ``onnx.defs`` schema is registered once per process (so the checker validates the
  node and onnxscript can build it); ``onnx`` and ``onnxscript`` are imported only here, lazily.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from fa3trt.attention.op import PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_VERSION

__all__ = ["translation_table", "register_schema", "NODE_VERSION"]

NODE_VERSION = 1
"""The ONNX opset version of the ``attn`` domain the node is written in."""

_lock = threading.Lock()


def register_schema() -> None:
    """Register ``attn::CustomAttnPlugin``'s ONNX schema in this process (once)."""
    import onnx
    from onnx.defs import OpSchema

    with _lock:
        if onnx.defs.has(PLUGIN_NAME, NODE_VERSION, PLUGIN_DOMAIN):
            return
        p, a = OpSchema.FormalParameter, OpSchema.Attribute
        kinds = OpSchema.AttrType
        schema = OpSchema(
            PLUGIN_NAME,
            PLUGIN_DOMAIN,
            NODE_VERSION,
            doc="FlashAttention inside TensorRT (fa3trt's plugin); see fa3trt.attention.op",
            inputs=[p("q", "T"), p("k", "T"), p("v", "T"), p("seq_lens", "L"), p("seq_lens_k", "L")],
            outputs=[p("out", "T")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "q, k, v and the output"),
                ("L", ["tensor(int32)"], "query and key lengths"),
            ],
            attributes=[
                a("mode", kinds.INT, "0: the input dtype, 1: FP8"),
                a("causal", kinds.INT, "1: causal, aligned bottom-right"),
                a("softmax_scale", kinds.FLOAT, "the scale's value"),
                a("plugin_version", kinds.STRING, "the TensorRT plugin's version"),
                a("plugin_namespace", kinds.STRING, "the namespace the plugin is registered under"),
            ],
        )
        onnx.defs.register_schema(schema)


def _translate(
    q: Any,
    k: Any,
    v: Any,
    seq_lens: Any,
    seq_lens_k: Any,
    mode: int,
    causal: bool,
    softmax_scale: float,
    plugin_namespace: str,
) -> Any:
    import onnxscript

    opset = onnxscript.values.Opset(PLUGIN_DOMAIN, NODE_VERSION)
    node = getattr(opset, PLUGIN_NAME)
    return node(
        q,
        k,
        v,
        seq_lens,
        seq_lens_k,
        mode=int(mode),
        causal=int(bool(causal)),
        softmax_scale=float(softmax_scale),
        plugin_version=PLUGIN_VERSION,
        plugin_namespace=str(plugin_namespace),
    )


def translation_table() -> dict[Callable[..., Any], Callable[..., Any]]:
    """``torch.onnx.export(..., custom_translation_table=translation_table())`` for programs
    traced under ``onnx_export_mode``; registers the node's schema first."""
    register_schema()
    return {torch.ops.attn.plugin_node.default: _translate}
