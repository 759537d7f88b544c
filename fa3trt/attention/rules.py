"""Which attention calls ``fa3trt.attention`` computes exactly, and how (``plan_call``): the rules
``fa3trt.attention.routing``'s hooks decide by.

- Exact only. A key-padding mask (bool, or additive 0 / -inf / the dtype's min) of shape
  (B|1,1,1,Sk), or (B|1,1,Sq,Sk) whose query rows are all the same (an expanded view, else one
  comparison over the mask), whose kept keys are a non-empty prefix becomes ``seq_lens_k``.
  Causal masks never become lengths; ``is_causal`` becomes ``causal`` only where Sq == Sk.
  Also left alone: dropout, inputs that need grad (the op has no backward; under torch.compile
  too, whose graphs keep autograd, but not while exporting), other dtypes, head dims no kernel on
  the device takes, heads not grouped (H % Hk), tensors that are not 4-D.
- Tracing rule: under torch.compile, torch.export, ONNX export or jit tracing (or for any tensor
  subclass: fake, functional) a mask's values cannot be read, so every mask is left alone there;
  the decision then rests on types and shapes only, and sizes count as equal only where provably
  so (no guard on a dynamic axis). Strict export may count a call once per pass.
- ``key_padding_masks=True`` is the caller's promise that every mask the model builds keeps, in
  every query row, the same non-empty prefix of keys (a server's padding mask; ``fill: mask``).
  Under tracing a mask of a key-padding shape and dtype then becomes ``seq_lens_k`` computed in
  the graph: the kept keys of query row 0, counted. Not for a causal call (``is_causal``) or a
  causal module's mask (transformers' ``module.is_causal``; for the SDPA hook, any module of
  ``model`` with ``is_causal = True``): a decoder's mask is causal and padding, left alone. Run
  eagerly, the values are read and checked as without the promise; a mask that breaks it there
  is left alone, and ``fa3trt.models.sources.verify_source`` feeds padded masks to catch a broken one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fa3trt.attention.kernels.base import FLOAT_DTYPES
from fa3trt.attention.kernels.registry import available_kernels, get

__all__ = [
    "Plan",
    "Promise",
    "plan_call",
    "key_lengths",
    "kernel_takes",
    "values_hidden",
    "prepare_dynamo",
    "strict_trace",
    "in_strict_trace",
]


@dataclass(frozen=True)
class Plan:
    """How the op computes one call: its key lengths, causal flag, scale, head groups, and what it
    needed of the op (for the report)."""

    seq_lens_k: torch.Tensor | None
    causal: bool
    scale: float | None
    groups: int
    needs: tuple[str, ...]
    mode: int = 0
    """The op's mode: 0 in the input dtype, 1 FP8 (a model routed with ``mode=1``)."""


def values_hidden(t: torch.Tensor) -> bool:
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    return tracing or torch.onnx.is_in_onnx_export() or type(t) is not torch.Tensor


_trace = threading.local()


@contextlib.contextmanager
def strict_trace() -> Iterator[None]:
    """Marks this thread's strict ``torch.export`` trace (``fa3trt.attention.routing.tracing()``).
    Inside dynamo's trace this mark, not ``torch.compiler.is_exporting()``, tells an export from
    a ``torch.compile``: PyTorch 2.11 reads ``is_exporting()`` as True in both."""
    _trace.depth = getattr(_trace, "depth", 0) + 1
    try:
        yield
    finally:
        _trace.depth -= 1


def in_strict_trace() -> bool:
    """Whether this thread is inside ``strict_trace()``."""
    return getattr(_trace, "depth", 0) > 0


def _exporting(t: torch.Tensor) -> bool:
    """A trace for a program that runs without autograd (torch.export, ONNX export, jit tracing),
    or a tensor subclass (fake, functional): what needs grad there does not matter. A
    torch.compile trace runs with autograd, so there it does."""
    exporting = in_strict_trace() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if not torch.compiler.is_dynamo_compiling():  # non-strict export: is_exporting() is right there
        exporting = exporting or torch.compiler.is_exporting()
    return exporting or type(t) is not torch.Tensor


def _same(a: Any, b: Any) -> bool:
    """Provably equal: plain ints compare; symbolic sizes (export) compare without adding a guard."""
    return statically_known_true(a == b)


def _mask_name(mask: torch.Tensor, b: int, h: int, sq: int, sk: int) -> str:
    """``attn_mask (B,1,S,S) bool``: the mask's shape in the call's symbols, right-aligned like broadcasting."""
    qs, ks = ("S", "S") if _same(sq, sk) else ("Sq", "Sk")
    syms = [("B", b), ("H", h), (qs, sq), (ks, sk)][max(0, 4 - mask.dim()) :]
    dims = [str(n) for n in mask.shape[: max(0, mask.dim() - 4)]]
    dims += [
        "1" if _same(n, 1) else s if _same(n, v) else str(n)
        for n, (s, v) in zip(mask.shape[mask.dim() - len(syms) :], syms)
    ]
    return f"attn_mask ({','.join(dims)}) {'bool' if mask.dtype == torch.bool else 'additive'}"


def _fits(n: Any, want: Any, assume: bool, one: bool = True) -> bool:
    """A mask's size ``n`` is ``want`` (or 1, where ``one``). Where ``assume`` (a promised mask
    while tracing) and neither is provable, ``n == want`` is checked into the graph: SDPA's own
    broadcast check adds the same guard, and the export's declared axes decide whether it holds."""
    if (one and _same(n, 1)) or _same(n, want):
        return True
    if not assume or statically_known_true(n != want):
        return False
    torch._check(
        n == want,
        lambda: (
            f"key_padding_masks: a mask's size {n} is not the attention's {want} (SDPA needs them equal); "
            "give the inputs behind both one axis name"
        ),
    )
    return True


@dataclass(frozen=True)
class Promise:
    """What the caller promised of this call's mask (``key_padding_masks``), and whether it holds here."""

    given: bool = False
    causal_module: bool = False
    """The call comes from a causal module (or, for the SDPA hook, a model with one): no promise applies."""


def key_lengths(
    mask: Any, dtype: torch.dtype, b: int, h: int, sq: int, sk: int, promise: Promise = Promise()
) -> torch.Tensor | None | str:
    """A key-padding mask's key lengths (int32 (B,); None if it keeps every key), else why it is not one."""
    if not isinstance(mask, torch.Tensor):
        return f"attn_mask {type(mask).__name__}"
    name, shape = _mask_name(mask, b, h, sq, sk), tuple(mask.shape)
    hidden = values_hidden(mask)
    if hidden and not promise.given:
        return f"{name} while tracing (values unknown)"
    if hidden and promise.causal_module:
        return f"{name} while tracing (values unknown; key_padding_masks does not hold for a causal module)"
    if (
        mask.dim() != 4
        or not _same(shape[1], 1)
        or not _fits(shape[0], b, hidden)
        or not _fits(shape[2], sq, hidden)
        or not _fits(shape[3], sk, hidden, one=False)
    ):
        return f"{name}: not a key-padding shape"
    if mask.dtype not in (torch.bool, dtype):  # SDPA takes these two only
        return f"{name}: dtype {mask.dtype}"
    if hidden:
        # The promise: every query row keeps the same prefix of keys, so query row 0's count of
        # kept keys is each sequence's key length. Computed in the graph, with no branch on values.
        row = mask[:, 0, 0, :]
        kept = row if row.dtype == torch.bool else row == 0
        return kept.sum(-1, dtype=torch.int32).expand(b)
    keep = mask if mask.dtype == torch.bool else mask == 0
    # Only -inf and the dtype's min drop a key exactly (its weight underflows to 0); anything else is a bias.
    if mask.dtype != torch.bool and not bool(
        (keep | (mask == -math.inf) | (mask == torch.finfo(mask.dtype).min)).all()
    ):
        return f"{name}: values other than 0, -inf and the dtype's min"
    if shape[2] != 1:
        if mask.stride(2) != 0 and not torch.equal(keep, keep[:, :, :1].expand_as(keep)):
            return f"{name}: query rows differ (causal or another per-query mask)"
        keep = keep[:, :, :1]
    keep = keep.reshape(shape[0], sk).expand(b, sk)
    lens = keep.sum(-1)
    if not torch.equal(keep, torch.arange(sk, device=keep.device)[None, :] < lens[:, None]):
        return f"{name}: kept keys are not a prefix"
    if bool((lens == 0).any()):
        return f"{name}: a sequence keeps no key"
    return None if bool((lens == sk).all()) else lens.to(torch.int32)


@functools.lru_cache(maxsize=256)
def _kernel_for(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    return any(get(n).supports(dtype, d) for n in available_kernels(device))


def _kernel_takes(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    """``_kernel_for`` behind a plain function: what ``prepare_dynamo`` marks (dynamo takes the
    mark from a function, not from an ``lru_cache`` wrapper)."""
    return _kernel_for(device, dtype, d)


def kernel_takes(device: torch.device, dtype: torch.dtype, d: Any) -> bool:
    """Whether a kernel available on ``device`` takes ``dtype`` at head dim ``d``: asked once per
    (device, dtype, d), as every routed call asks it (a symbolic ``d`` is asked each time)."""
    if isinstance(d, int):
        return _kernel_takes(device, dtype, d)
    return any(get(n).supports(dtype, d) for n in available_kernels(device))


def prepare_dynamo() -> None:
    """Before a dynamo trace (torch.compile, strict torch.export): ``kernel_takes`` is computed
    when the trace reaches it and taken as a constant, instead of being traced. Traced, it would
    take the registry's probes (the CUDA capability, each kernel's package import, ``lru_cache``,
    which dynamo warns of) into the trace, where one it cannot trace breaks the graph. The answer
    rests on the device, dtype and head dim, all fixed by the trace's guards. Imports
    torch._dynamo (seconds), so ``import fa3trt`` does not call it; routing calls it where a
    trace may follow."""
    torch.compiler.assume_constant_result(_kernel_takes)


def plan_call(
    q: Any, k: Any, v: Any, mask: Any, dropout: float, causal: bool, scale: Any, gqa: bool,
    promise: Promise = Promise(),
) -> Plan | str:  # fmt: skip
    """How the op computes this SDPA-layout (B, H, S, D) call exactly, or why it cannot."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
        return "not 4-D"
    if dropout > 0:
        return "dropout_p > 0"
    if not q.dtype == k.dtype == v.dtype:
        return "q, k, v dtypes differ"
    if q.dtype not in FLOAT_DTYPES:
        return f"dtype {q.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and not _exporting(q):
        return "inputs require grad (the op has no backward)"
    (b, h, sq, d), (bk, hk, sk, dk) = q.shape, k.shape
    same = _same(sq, sk)
    # SDPA itself needs these equal (its shape checks guard them too); Sq vs Sk is the op's own choice.
    if bk != b or tuple(v.shape[:3]) != (bk, hk, sk):
        return "q, k, v batch or key shapes differ"
    if dk != d or v.shape[3] != d:
        return f"head dims differ (q {d}, k {dk}, v {v.shape[3]})"
    if hk != h and not (gqa and h % hk == 0):
        return f"heads {h} and {hk} not grouped (H % Hk != 0 or enable_gqa off)"
    if not kernel_takes(q.device, q.dtype, d):
        return f"head dim {d} in {q.dtype}: no kernel on {q.device.type}"
    if mask is not None and causal:
        return "attn_mask with is_causal"
    if causal and not same:
        return "is_causal with Sq != Sk (top-left alignment)"
    lens = key_lengths(mask, q.dtype, b, h, sq, sk, promise) if mask is not None else None
    if isinstance(lens, str):
        return lens
    needs = {"key lengths": lens is not None, "causal": causal, "grouped heads": hk != h, "Sq != Sk": not same}
    return Plan(lens, causal, scale, h // hk, tuple(n for n, c in needs.items() if c))
