"""``torch.compile`` of a model whose attention is routed (``compile_routed``).

``compiled = compile_routed(model, method, key_padding_masks=..., attn_mode=...)``, then
``compiled(**inputs)``: the model is compiled once and each call runs under a router of its own
(``fa3trt.attention.routing``, whose docstring says how routing and dynamo's trace meet).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fa3trt.attention.report import RoutingReport
from fa3trt.attention.routing import hook_names, route_attention
from fa3trt.attention.rules import prepare_dynamo

__all__ = ["compile_routed", "CompiledRouted"]


class CompiledRouted:
    """``model`` compiled once by ``torch.compile``, each call run under ``route_attention``
    (made by ``compile_routed``). One call at a time, as for ``route_attention``'s
    transformers hook.

    ``report``: the totals over every call; ``last_report``: the last call's (None before one)."""

    def __init__(
        self,
        model: torch.nn.Module,
        method: str,
        key_padding_masks: bool,
        attn_mode: int,
        compile_kwargs: dict[str, Any],
    ) -> None:
        _, hooks = hook_names(model, method, key_padding_masks, "compile_routed", attn_mode)
        prepare_dynamo()
        self.module = model
        self.method, self.key_padding_masks, self.attn_mode = method, key_padding_masks, attn_mode
        self.compiled = torch.compile(model, **compile_kwargs)
        self.report = RoutingReport("+".join(hooks))
        self.last_report: RoutingReport | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The compiled model's output for these inputs, its attention routed."""
        # A new report per call: the compiled graphs guard on the counts they find at the start
        # (dynamo replays the counting after each graph), which are then always zero.
        with route_attention(
            self.module,
            self.method,
            key_padding_masks=self.key_padding_masks,
            attn_mode=self.attn_mode,
            log_level=logging.DEBUG,
        ) as report:
            out = self.compiled(*args, **kwargs)
        self.last_report = report
        self.report.add(report)
        return out


def compile_routed(
    model: torch.nn.Module,
    method: str = "auto",
    *,
    key_padding_masks: bool = False,
    attn_mode: int = 0,
    **compile_kwargs: Any,
) -> CompiledRouted:
    """``model`` under ``torch.compile(model, **compile_kwargs)`` with its attention routed as
    ``route_attention(model, method, key_padding_masks=...)`` routes it: call the result as the
    model (``compiled(**inputs)``). Each routed call is one ``attn::custom_attn`` node inside the
    compiled graph; the calls' reports are ``.last_report`` and, added up, ``.report``.

    ``key_padding_masks``: as for ``route_attention``. A compiled graph cannot read a mask's
    values, so without the promise every mask stays a mask (the call is left alone); with it a
    mask of a key-padding shape becomes key lengths counted in the graph."""
    return CompiledRouted(model, method, key_padding_masks, attn_mode, compile_kwargs)
