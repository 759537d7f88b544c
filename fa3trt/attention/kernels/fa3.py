"""FA3 proper: the forward kernel of flash-attention's ``hopper/`` build (``flash_attn_interface``).

FA3 has no wheel; users build it from source. ``python -m fa3trt.fa3_build <checkout>`` builds
the forward-only subset this project calls (bf16, fp16 and FP8 e4m3 at head dims 64 and 128:
six kernel files, about two minutes on 16 cores, where the full build takes hours). A build may
leave head dims or dtypes out (its ``flash_attn_config`` module says which), so what it can run
is asked here, and the op sends anything else (fp32, a head dim it was built without) to the
next kernel in line.

A padded (B, S, H, D) batch with per-sequence lengths is one launch: ``seqused_q/k`` = the
lengths, on the device. FA3 then schedules only the query tiles inside each sequence, longest
first, on a persistent grid (its ``VarlenDynamicPersistentTileScheduler``); each tile stops at
its sequence's last key. Rows past a length are not written; they are zeroed here
(``fa3trt.attention.kernels.tail``) unless the caller zeroes them itself. No host sync anywhere.

``FA3`` is the kernel as the registry lists it; the functions below are its calls.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from fa3trt.attention.kernels.base import SequsedKernel, default_scale, device_lengths_of
from fa3trt.attention.kernels.tail import zero_tail_
from fa3trt.errors import MissingDependencyError

__all__ = [
    "FA3",
    "available",
    "attention",
    "supports",
    "supports_config",
    "build_flags",
    "module",
    "op",
    "INSTALL_HINT",
]

log = logging.getLogger(__name__)

INSTALL_HINT = 'build it from a flash-attention checkout: python -m fa3trt.fa3_build <checkout> (README, "Serving the seed model on a GPU cluster")'

_HEAD_DIMS = (64, 96, 128, 192, 256)  # the kernels FA3 instantiates; a head dim runs on the next one up


@functools.cache
def module() -> Any | None:
    """The FA3 Python interface, or None. Imported once; the only place FA3 is imported."""
    try:
        import flash_attn_interface  # type: ignore[import-not-found]
    except Exception as e:  # an ABI mismatch raises OSError/RuntimeError, not only ImportError
        log.debug("FA3 unavailable: %s", e)
        return None
    return flash_attn_interface


@functools.cache
def build_flags() -> dict[str, bool]:
    """The build's ``FLASHATTENTION_DISABLE_*`` flags (``flash_attn_config``, written by FA3's
    setup.py); empty for builds that predate it, which hold every kernel."""
    try:
        from flash_attn_config import CONFIG  # type: ignore[import-not-found]
    except Exception:
        return {}
    return {k: bool(v) for k, v in CONFIG.get("build_flags", {}).items()}


def available(device: torch.device | str) -> bool:
    """FA3 can run on ``device``: an sm90 GPU, and the interface and its op import."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) == (9, 0) and op() is not None


def _built(flag: str) -> bool:
    return not build_flags().get(f"FLASHATTENTION_DISABLE_{flag}", False)


def supports_config(dtype: torch.dtype, head_dim: int) -> bool:
    """The build holds a kernel for this dtype and head dim: bf16 always, fp16 and FP8 e4m3
    unless built without them; any head dim up to 256 that is a multiple of 8, on the smallest
    built kernel at least that wide."""
    if dtype == torch.bfloat16:
        ok = True
    elif dtype == torch.float16:
        ok = _built("FP16")
    elif dtype == torch.float8_e4m3fn:
        ok = _built("FP8")
    else:
        return False
    return ok and head_dim % 8 == 0 and any(head_dim <= d and _built(f"HDIM{d}") for d in _HEAD_DIMS)


def supports(q: torch.Tensor) -> bool:
    """``supports_config`` for q's dtype and head dim."""
    return supports_config(q.dtype, q.shape[-1])


# The arguments this module passes by name to FA3's registered op (``torch.ops.flash_attn_3.fwd``).
_OP_ARGS = frozenset(
    {"q", "k", "v", "out", "seqused_q", "seqused_k", "q_descale", "k_descale", "v_descale", "num_splits"}
)


@functools.cache
def op() -> Any | None:
    """FA3's registered forward op, when the interface imports and the op's schema names every
    argument used here; else None (FA3 is then not offered, and a release whose op differs is
    logged).

    Called directly it costs the host a fraction of what the interface's functions cost (they
    wrap the same op in an autograd Function and a Python custom op; docs/benchmarks.md,
    section 1), and it takes ``out=``, so the plugin's output buffer is written in place."""
    if module() is None:
        return None
    try:
        fwd = torch.ops.flash_attn_3.fwd
        names = {a.name for a in fwd.default._schema.arguments}
    except Exception as e:
        log.warning(
            "FA3's interface imports but its op torch.ops.flash_attn_3.fwd does not (%s); FA3 is not used. %s",
            e,
            INSTALL_HINT,
        )
        return None
    missing = sorted(_OP_ARGS - names)
    if missing:
        log.warning("FA3's op torch.ops.flash_attn_3.fwd takes no %s; FA3 is not used. %s", missing, INSTALL_HINT)
        return None
    return fwd


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
    seq_lens_k: torch.Tensor | None = None,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    out: torch.Tensor | None = None,
    descale: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    zero_tail: bool = True,
) -> torch.Tensor:
    """Attention of q (B, Sq, H, D) over k, v (B, Sk, Hk, D) on torch's current stream; no host sync.

    ``seq_lens`` / ``seq_lens_k`` (int32 (B,), any device; within [0, Sq] and [0, Sk], which
    callers guarantee or clamp; ``seq_lens_k`` None: ``seq_lens`` when Sq == Sk, else every
    key): keys past a length are never read and rows past a query length are zero (left
    unwritten with ``zero_tail=False``). ``causal`` is aligned bottom-right; H a multiple of Hk.
    ``out``: a (B, Sq, H, D) tensor to write into. ``descale``: FP8 e4m3
    inputs' per-(batch, head) float32 factors (q, k, v each ≈ fp8 · descale); the output is
    then bfloat16. q, k, v may be strided views (a fused QKV projection's) whose last dimension
    is contiguous.
    """
    fwd = op()
    if fwd is None:
        raise MissingDependencyError(
            f"FA3 (flash_attn_interface with its op torch.ops.flash_attn_3.fwd) is not installed; {INSTALL_HINT}"
        )
    lens, lens_k = device_lengths_of(q, k, seq_lens, seq_lens_k)
    extra: dict[str, Any] = {}
    if descale is not None:
        extra.update(q_descale=descale[0], k_descale=descale[1], v_descale=descale[2])
    # Passed only when they differ from the op's defaults, so builds whose op names them
    # otherwise still run the plain calls.
    if causal:
        extra["is_causal"] = True
    if softmax_scale is not None and softmax_scale != default_scale(q.shape[3]):
        extra["softmax_scale"] = softmax_scale
    # The padded batch as it is: seqused_q/k make FA3 schedule only the tiles inside each
    # sequence (its varlen scheduler), with no cu_seqlens to build.
    result = fwd(q, k, v, out=out, seqused_q=lens, seqused_k=lens_k, num_splits=1, **extra)[0]
    if lens is not None and zero_tail:
        zero_tail_(result, lens)
    return result  # type: ignore[no-any-return]


class FA3(SequsedKernel):
    """FA3 for every shape its build holds: on sm90 it led cuDNN at every dense shape measured,
    at a fraction of cuDNN's host time per call (docs/benchmarks.md, section 1)."""

    name = "fa3"
    fp8 = True
    capability = ((9, 0), (9, 0))
    install_hint = INSTALL_HINT

    call = staticmethod(attention)

    @classmethod
    def importable(cls) -> bool:
        return op() is not None

    @classmethod
    def supports(cls, dtype: torch.dtype, head_dim: int) -> bool:
        return supports_config(dtype, head_dim)  # fp16/bf16, and e4m3 for forward_fp8

    @classmethod
    def forward_fp8(
        cls,
        q8: torch.Tensor,
        k8: torch.Tensor,
        v8: torch.Tensor,
        seq_lens: torch.Tensor | None,
        descale: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # FA3's e4m3 kernel writes bfloat16 whatever out_dtype asks: run_fp8 converts.
        into = out if out is not None and out.dtype == torch.bfloat16 else None
        return attention(q8, k8, v8, seq_lens, seq_lens_k, causal=causal, softmax_scale=scale, descale=descale,
                         out=into, zero_tail=into is None)  # fmt: skip
