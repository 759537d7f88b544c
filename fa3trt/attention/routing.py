"""Send a user's model's attention calls to ``fa3trt.attention``, and report what was routed.

Contract:
- ``with route_attention(model, method) as report:`` routes, inside the block and on this thread,
  the model's attention calls that the op computes exactly; every other call runs as it would
  have and is counted in ``report.left`` under its reason. On exit the model is as it was and
  the report's summary is logged at INFO.
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` is replaced while a router is
  open (diffusers' processors and transformers' SDPA attention call it by that name; a name
  imported before the block, ``from torch.nn.functional import scaled_dot_product_attention``,
  is not seen); other threads get PyTorch's SDPA. ``"transformers"``: each ``PreTrainedModel`` in
  ``model`` runs the attention function registered as ``"fa3trt"``, whose masks are built as for
  SDPA (a left-alone call runs transformers' SDPA attention). ``"auto"``: both where ``model``
  holds a ``PreTrainedModel``, else ``"sdpa"``.
- ``torch.compile``: ``compiled = compile_routed(model, method, key_padding_masks=...)``
  (``fa3trt.attention.compiled``), then
  ``compiled(**inputs)``. It compiles ``model`` once and runs each call under a router of its
  own. Both hooks route inside dynamo's trace: each routed call is one ``attn::custom_attn``
  node of the compiled graph, so the routed model compiles to the graphs of the unrouted one
  (a tiny FLUX: one graph, its 4 SDPA calls 4 op nodes). Dynamo replays the report's counting
  after each graph it runs, so the report counts each call as eager routing does. Those counts
  are guarded, so a compiled call that finds other counts in its report than when it was
  traced recompiles: ``compile_routed`` gives every call a new report. (``torch.compile``
  inside one ``route_attention`` block routes and counts the same way, but each further call
  recompiles, up to dynamo's recompile limit, past which the model runs eagerly, still routed.)
  ``tracing()`` is not for ``torch.compile``: while a ``TorchFunctionMode`` is active dynamo
  breaks the graph at Tensor methods written in Python (``Tensor.unflatten``; PyTorch issue
  179853), which split the tiny FLUX into 16 graphs.
- Strict ``torch.export``: ``tracing()`` around it adds a ``TorchFunctionMode`` per router, which
  sees the SDPA calls of any name and which dynamo traces with its counts.
- Which calls the op computes exactly, and how a mask becomes key lengths (also while tracing,
  and under ``key_padding_masks``): ``fa3trt.attention.rules``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fa3trt.attention.op import attention
from fa3trt.attention.report import RoutingReport
from fa3trt.attention.rules import Plan, Promise, in_strict_trace, plan_call, prepare_dynamo, strict_trace
from fa3trt.errors import ConfigError

__all__ = [
    "route_attention",
    "hook_names",
    "tracing",
    "RoutingReport",
    "METHODS",
    "INTERFACE_NAME",
]

log = logging.getLogger(__name__)

METHODS = ("auto", "sdpa", "transformers")
INTERFACE_NAME = "fa3trt"
"""The name of the attention function (and of its mask, SDPA's) registered in transformers."""

# Arguments of a transformers attention call that the op has no way to express.
_UNEXPRESSED = ("position_bias", "softcap", "s_aux", "sinks")


# --------------------------------------------------------------------------- the router and its hooks
_local = threading.local()


@contextlib.contextmanager
def _passthrough() -> Iterator[None]:
    """Our own calls (a left-alone call) are not intercepted again. The op's kernels call
    PyTorch's SDPA by a name of their own (``fa3trt.attention.kernels.sdpa.torch_sdpa``), which no hook sees."""
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _intercepting() -> bool:
    return getattr(_local, "depth", 0) == 0


def _run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The op over SDPA-layout inputs; returns (B, Sq, H, D). Under torch.compile it becomes the
    graph's one ``attn::custom_attn`` node (and its transposes). No context manager wraps it: a
    graph break inside one makes dynamo give up the whole frame, which then runs eagerly."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return attention(
        qt, kt, vt, None, plan.mode, seq_lens_k=plan.seq_lens_k, causal=plan.causal, softmax_scale=plan.scale
    )


class _Router:
    def __init__(
        self, report: RoutingReport, key_padding_masks: bool = False, causal_model: bool = False, mode: int = 0
    ) -> None:
        self.report = report
        self.key_padding_masks = key_padding_masks
        self.causal_model = causal_model
        self.mode = mode

    def leave(self, reason: str) -> None:
        self.report.left[reason] = self.report.left.get(reason, 0) + 1

    def decide(
        self, q: Any, k: Any, v: Any, mask: Any, dropout: Any, causal: Any, scale: Any, gqa: Any,
        causal_module: bool | None = None,
    ) -> Plan | None:  # fmt: skip
        """``causal_module``: whether the calling module is causal (None: unknown, then whether any
        module of the model is)."""
        causal_module = self.causal_model if causal_module is None else causal_module
        promise = Promise(self.key_padding_masks, causal_module)
        plan = plan_call(q, k, v, mask, dropout, bool(causal), scale, bool(gqa), promise)
        if isinstance(plan, str):
            self.leave(plan)
            return None
        self.report.routed += 1
        for need in plan.needs:
            self.report.routed_with[need] = self.report.routed_with.get(need, 0) + 1
        return dataclasses.replace(plan, mode=self.mode) if self.mode else plan


def _sdpa_args(
    query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: Any = 0.0, is_causal: Any = False,
    scale: Any = None, enable_gqa: Any = False,
) -> tuple[Any, ...]:  # fmt: skip
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


_SDPA = F.scaled_dot_product_attention
"""PyTorch's own SDPA, which ``_routed_sdpa`` stands in for while a router is open."""
_patch_lock = threading.Lock()
_patch_users = 0


def _sdpa_routers() -> list[_Router]:
    return _local.__dict__.setdefault("sdpa_routers", [])


def _routed_sdpa(*args: Any, **kwargs: Any) -> Any:
    """``F.scaled_dot_product_attention`` while a router is open: the innermost ``sdpa`` router
    of this thread decides; other threads and our own calls get PyTorch's SDPA. Traced by
    dynamo under torch.compile, it routes there too (the op becomes a node of the graph, the
    counts are replayed after it). Inside ``tracing()`` (strict torch.export) it calls PyTorch's
    SDPA, for the modes to route: they see SDPA under any name, this function only under its own.
    (Not ``torch.compiler.is_exporting()``: dynamo's trace for torch.compile reads it as True in
    PyTorch 2.11, so the compiled model would route nothing.)"""
    routers = getattr(_local, "sdpa_routers", None)
    if not routers or not _intercepting() or in_strict_trace():
        return _SDPA(*args, **kwargs)
    return _route_sdpa(routers[-1], args, kwargs)


def _route_sdpa(router: _Router, args: Any, kwargs: Any) -> Any:
    q, k, v, *rest = _sdpa_args(*args, **kwargs)
    plan = router.decide(q, k, v, *rest)
    if plan is not None:
        return _run(q, k, v, plan).transpose(1, 2)
    with _passthrough():
        return _SDPA(*args, **kwargs)


@contextlib.contextmanager
def _sdpa_routed(router: _Router) -> Iterator[None]:
    """``router`` decides this thread's SDPA calls inside the block.

    The module attribute ``torch.nn.functional.scaled_dot_product_attention`` is replaced while
    any block is open (diffusers' processors and transformers' SDPA attention look it up at each
    call). A ``TorchFunctionMode`` sees the same calls but puts a Python frame in front of every
    torch call of the model, which made a routed FLUX forward slower than the unrouted one at
    4.6k tokens (docs/benchmarks.md, section 8); the mode serves traces only (``tracing()``)."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            F.scaled_dot_product_attention = _routed_sdpa
        _patch_users += 1
    _sdpa_routers().append(router)
    try:
        yield
    finally:
        _sdpa_routers().remove(router)
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                F.scaled_dot_product_attention = _SDPA


class _SdpaMode(TorchFunctionMode):
    """Routes PyTorch's SDPA calls inside a trace (``tracing()``). A torch function that calls
    SDPA inside its own ``__torch_function__`` dispatch (``nn.MultiheadAttention``'s) is counted,
    not seen into."""

    def __init__(self, router: _Router) -> None:
        super().__init__()
        self.router = router

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and _intercepting():
            return _route_sdpa(self.router, args, kwargs)
        if func is F.multi_head_attention_forward and _intercepting():
            self.router.leave("nn.MultiheadAttention (its SDPA call is not seen)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def tracing() -> Iterator[None]:
    """Around a strict ``torch.export`` of a model under ``route_attention`` (``fa3trt.export_onnx``
    uses it): this thread's open ``sdpa`` routers also as ``TorchFunctionMode``s, which see SDPA
    called under any name and which dynamo traces with their counts. Not for ``torch.compile``
    (``compile_routed``): a mode there breaks the graph at every Tensor method written in Python
    (see the module docstring), and the replaced SDPA function routes there by itself."""
    prepare_dynamo()
    with strict_trace(), contextlib.ExitStack() as stack:
        for router in list(_sdpa_routers()):
            stack.enter_context(_SdpaMode(router))
        yield


def _transformers_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature, registered as ``INTERFACE_NAME``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    routers: list[_Router] = getattr(_local, "routers", [])
    plan = None
    if routers and _intercepting():
        unexpressed = [n for n in _UNEXPRESSED if kwargs.get(n) is not None]
        if unexpressed:
            routers[-1].leave(f"{unexpressed[0]} argument")
        else:  # transformers' SDPA rule: causal only without a mask and with more than one query
            module_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
            causal = attention_mask is None and module_causal and query.shape[2] > 1
            plan = routers[-1].decide(
                query, key, value, attention_mask, dropout, causal, scaling, True, causal_module=module_causal
            )
    if plan is not None:
        return _run(query, key, value, plan), None
    with _passthrough():
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )


def _pretrained_models(model: torch.nn.Module) -> list[Any]:
    if "transformers" not in sys.modules:  # then nothing is a PreTrainedModel; don't import it
        return []
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _has_causal_module(model: torch.nn.Module) -> bool:
    """A module declares itself causal (transformers' attention modules do): the SDPA hook cannot
    tell which module calls it, so the promise of key-padding masks holds for none of its calls."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


@contextlib.contextmanager
def _interface(models: list[Any]) -> Iterator[None]:
    """The models' configs name ``INTERFACE_NAME`` inside the block; every config is restored on exit."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(INTERFACE_NAME, _transformers_attention)
    AttentionMaskInterface.register(INTERFACE_NAME, sdpa_mask)
    # Parents before their sub-configs: restoring a parent also sets its sub-configs, restored after it.
    configs: dict[int, Any] = {}
    queue = [m.config for m in models]
    while queue:
        config = queue.pop(0)
        if id(config) not in configs:
            configs[id(config)] = config
            queue += [c for n in getattr(config, "sub_configs", {}) if (c := getattr(config, n, None)) is not None]
    saved = [(c, c._attn_implementation) for c in configs.values()]
    try:
        for m in models:
            m.config._attn_implementation = INTERFACE_NAME
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation = implementation


def hook_names(
    model: torch.nn.Module, method: str, key_padding_masks: Any, caller: str, attn_mode: Any = 0
) -> tuple[list[Any], list[str]]:
    """The ``PreTrainedModel``s to hook and the hooks ``method`` uses on ``model``; ``ConfigError``
    for an argument that is not one of those documented."""
    if attn_mode not in (0, 1):
        raise ConfigError(f"{caller}: attn_mode must be 0 (attention in the input dtype) or 1 (FP8), got {attn_mode!r}")
    if method not in METHODS:
        raise ConfigError(f"{caller}: method must be one of {list(METHODS)}, got {method!r}")
    if not isinstance(key_padding_masks, bool):
        raise ConfigError(
            f"{caller}: key_padding_masks must be True or False, got {key_padding_masks!r}; pass True "
            "only where every attention mask the model builds is a key-padding prefix mask"
        )
    models = _pretrained_models(model) if method != "sdpa" else []
    if method == "transformers" and not models:
        raise ConfigError(
            f"{caller}: method='transformers' needs a transformers PreTrainedModel and "
            f"{type(model).__name__} holds none; use method='sdpa' or 'auto'"
        )
    return models, (["transformers"] if models else []) + (["sdpa"] if method != "transformers" else [])


@contextlib.contextmanager
def route_attention(
    model: torch.nn.Module,
    method: str = "auto",
    *,
    key_padding_masks: bool = False,
    attn_mode: int = 0,
    log_level: int = logging.INFO,
) -> Iterator[RoutingReport]:
    """Route ``model``'s attention calls to ``fa3trt.attention`` inside the block; yields the
    ``RoutingReport``, filled as the model runs and logged on exit at ``log_level`` (a server
    routing every batch logs at DEBUG and reports its totals instead).

    ``method``: ``"auto"``, ``"sdpa"`` or ``"transformers"`` (see the module docstring).
    ``key_padding_masks``: the caller promises that every mask the model builds is a key-padding
    prefix mask, so masks become key lengths under tracing too (see the module docstring).
    ``attn_mode``: the op's mode for the routed calls (1: FP8 attention)."""
    models, hooks = hook_names(model, method, key_padding_masks, "route_attention", attn_mode)
    report = RoutingReport("+".join(hooks))
    router = _Router(report, key_padding_masks, key_padding_masks and _has_causal_module(model), attn_mode)
    routers: list[_Router] = _local.__dict__.setdefault("routers", [])
    # Set before any trace reads it: a compiled call guards on the attribute, and one traced
    # while it was missing would recompile once it exists.
    _local.__dict__.setdefault("depth", 0)
    if "torch._dynamo" in sys.modules:  # a trace may follow; without dynamo none can
        prepare_dynamo()
    with contextlib.ExitStack() as stack:
        if models:
            stack.enter_context(_interface(models))
        if "sdpa" in hooks:
            stack.enter_context(_sdpa_routed(router))
        routers.append(router)
        try:
            yield report
        finally:
            routers.remove(router)
            log.log(log_level, "%s", report.summary())
