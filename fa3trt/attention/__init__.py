"""Attention: the ``attn::custom_attn`` op, the kernels it runs, and the routing that sends a
user's model's attention calls to it.

- ``op``: the op, its fake, the ``CustomAttnPlugin`` node it traces to, ``attention()``;
- ``kernels/``: one module per kernel, the registry (capabilities as data) and the selector;
- ``routing`` and ``rules``: ``route_attention(model)`` and which calls the op computes exactly.

Nothing here imports a model, the exporter, TensorRT or the serving code.
"""

from fa3trt.attention.compiled import compile_routed
from fa3trt.attention.op import MODE_FP8, MODE_NATIVE, PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_VERSION, attention
from fa3trt.attention.routing import RoutingReport, route_attention

__all__ = [
    "attention",
    "route_attention",
    "compile_routed",
    "RoutingReport",
    "MODE_NATIVE",
    "MODE_FP8",
    "PLUGIN_NAME",
    "PLUGIN_VERSION",
    "PLUGIN_DOMAIN",
]
