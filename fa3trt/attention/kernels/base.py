"""What an attention kernel is: its capabilities as data, and the calls the op and the plugin make.

Contract:
- A kernel is a subclass of ``AttentionKernel`` listed in ``fa3trt.attention.kernels.registry``. Its class
  attributes say what it takes (dtypes, head dims, lengths on the device, writing a caller's
  buffer, a real FP8 kernel, the GPUs it runs on); the selector reads them and nobody keeps a
  second list.
- ``forward(q, k, v, seq_lens, seq_lens_k, causal=, scale=)`` is the op's call: q (B, Sq, H, D),
  k and v (B, Sk, Hk, D) with H a multiple of Hk, one dtype; optional int32 query and key
  lengths (B,) on either device (``seq_lens_k`` None: ``seq_lens`` when Sq == Sk, else every
  key); ``causal`` aligned bottom-right as in FlashAttention (query i of a sequence sees keys
  up to i + its key length - its query length); ``scale`` None: 1/sqrt(D). It returns a new
  (B, Sq, H, D) tensor whose rows past each query length are zero, so a padded batch equals
  each sequence run alone. ``cross``, ``causal`` and ``gqa`` declare which of Sq != Sk (or
  key lengths of their own), causal masking and fewer key heads a kernel takes; a call it
  cannot take goes to the next kernel (``fa3trt.attention.kernels.selector.kernel_for``).
- A kernel with ``device_lengths`` reads the lengths on the GPU with no host sync, so it can run
  inside TensorRT's ``enqueue``: ``forward_packed`` over views shaped by ``packed_shape``, with
  the lengths and sequence starts in a ``Ragged``. With ``direct_write`` it also gives
  ``launcher``: one launch into a caller's output buffer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch

from fa3trt.errors import ConfigError

__all__ = [
    "AttentionKernel",
    "SequsedKernel",
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "FP8_DTYPE",
    "FP8_MAX",
    "Shape",
    "log_once",
    "host_lengths",
    "dense_batch",
    "cuda_capability",
    "default_scale",
    "key_lengths",
    "is_plain",
    "device_lengths_of",
    "Ragged",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn
"""The FP8 format of the op's mode 1 (e4m3: 3 mantissa bits, no infinities)."""
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


@functools.cache
def log_once(message: str) -> None:
    """Log a fallback or a refusal once per process, however often the call repeats."""
    log.warning("%s", message)


def host_lengths(seq_lens: torch.Tensor) -> list[int]:
    """Lengths as Python ints. Free for CPU tensors; a device tensor costs one sync, which the
    serving path avoids by keeping its lengths on the host for these kernels."""
    return [int(x) for x in seq_lens.tolist()]


def dense_batch(seq_lens: torch.Tensor | None, s: int) -> bool:
    """No lengths, or host lengths that are all ``s``: the batch is dense (no host sync)."""
    return seq_lens is None or (seq_lens.device.type == "cpu" and bool((seq_lens == s).all()))


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: 1/sqrt(D)."""
    return 1.0 / math.sqrt(head_dim)


def key_lengths(
    seq_lens: torch.Tensor | None, seq_lens_k: torch.Tensor | None, sq: int, sk: int
) -> torch.Tensor | None:
    """The key lengths a call means: ``seq_lens_k``, else ``seq_lens`` when Sq == Sk (padded
    self-attention), else None (every key)."""
    if seq_lens_k is not None:
        return seq_lens_k
    return seq_lens if sq == sk else None


def is_plain(
    q: torch.Tensor,
    k: torch.Tensor,
    seq_lens: torch.Tensor | None,
    seq_lens_k: torch.Tensor | None,
    causal: bool,
    scale: float | None,
) -> bool:
    """Padded self-attention as the serving path runs it: Sq == Sk, as many key heads as query
    heads, one set of lengths, no causal mask and the default scale (the kernels' fast paths)."""
    return (
        q.shape[1] == k.shape[1]
        and q.shape[2] == k.shape[2]
        and not causal
        and (seq_lens_k is None or seq_lens_k is seq_lens)
        and (scale is None or scale == default_scale(q.shape[3]))
    )


def device_lengths_of(
    q: torch.Tensor, k: torch.Tensor, seq_lens: torch.Tensor | None, seq_lens_k: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(query lengths, key lengths) as contiguous int32 on q's device, queued; the key lengths
    are the query lengths' tensor itself for padded self-attention (one copy, not two)."""
    from fa3trt.transfer import lengths_to_device

    lens_q = None if seq_lens is None else lengths_to_device(seq_lens, q.device)
    lens_k = key_lengths(seq_lens, seq_lens_k, q.shape[1], k.shape[1])
    if lens_k is None or lens_k is seq_lens:
        return lens_q, lens_q if lens_k is not None else None
    return lens_q, lengths_to_device(lens_k, q.device)


class Ragged(NamedTuple):
    """A padded batch's lengths and sequence starts on the GPU, as the enqueue kernels read them."""

    lens_q: torch.Tensor
    """(B,) int32 query lengths (any values: a kernel clamps what it would read past Sq)."""
    lens_k: torch.Tensor
    """(B,) int32 key lengths (the same tensor as ``lens_q`` for padded self-attention)."""
    cu_q: torch.Tensor
    """(B+1,) int32 starts of each sequence's queries in the flattened batch (i * Sq)."""
    cu_k: torch.Tensor
    """(B+1,) int32 starts of each sequence's keys (i * Sk)."""
    sq: int
    sk: int


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    """The compute capability of a CUDA ``device``; None for the CPU or without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


class AttentionKernel:
    """One attention kernel. Subclasses set the class attributes and override the calls they have."""

    name: ClassVar[str]
    """The name ``FA3TRT_ATTN_KERNEL`` takes and logs show."""
    dtypes: ClassVar[tuple[torch.dtype, ...]] = FLOAT_DTYPES
    """Input dtypes it computes in (FP8 is ``fp8``, not listed here)."""
    head_dims: ClassVar[tuple[int, ...] | None] = None
    """Head dims it is built for; None takes any."""
    device_lengths: ClassVar[bool] = False
    """Reads ``seq_lens`` on the GPU with no host sync (can run inside TensorRT, and in CUDA graphs)."""
    direct_write: ClassVar[bool] = False
    """Writes a caller's output buffer itself (``launcher``)."""
    fp8: ClassVar[bool] = False
    """Has a real FP8 e4m3 kernel (``forward_fp8``); others get FP8 numerics by emulation."""
    fp8_scales: ClassVar[str] = "head"
    """The descale factors ``forward_fp8`` takes: "head" (per batch row and key head, (B, Hk),
    q's per group of query heads) or "tensor" (one per tensor, (1,))."""
    cuda_only: ClassVar[bool] = True
    """Runs on CUDA devices only."""
    capability: ClassVar[tuple[tuple[int, int], tuple[int, int]] | None] = None
    """(lowest, highest) compute capability it runs on; None: any CUDA GPU."""
    auto_from: ClassVar[tuple[int, int] | None] = None
    """Inside TensorRT the selector picks it by itself only from this compute capability."""
    cross: ClassVar[bool] = True
    """Takes Sq != Sk and key lengths of their own."""
    causal: ClassVar[bool] = True
    """Takes a causal mask (aligned bottom-right)."""
    gqa: ClassVar[bool] = True
    """Takes fewer key/value heads than query heads."""
    unwritten_tail: ClassVar[bool] = False
    """Leaves the output rows past a length unwritten (so they can be zeroed before the launch)."""
    install_hint: ClassVar[str] = "choose another kernel"
    """What makes it available where it is not."""

    @classmethod
    def importable(cls) -> bool:
        """Its package imports (kernels from PyTorch itself always do)."""
        return True

    @classmethod
    def available(cls, device: torch.device | str) -> bool:
        """It can run on ``device``: the right kind of device and GPU, and its package imports."""
        device = torch.device(device)
        if device.type != "cuda":
            return not cls.cuda_only
        cap = cuda_capability(device)
        if cap is None:
            return False
        if cls.capability is not None and not cls.capability[0] <= cap <= cls.capability[1]:
            return False
        return cls.importable()

    @classmethod
    def supports(cls, dtype: torch.dtype, head_dim: int) -> bool:
        """It holds a kernel for this input dtype and head dim."""
        return dtype in cls.dtypes and (cls.head_dims is None or head_dim in cls.head_dims)

    @classmethod
    def takes(cls, *, cross: bool = False, causal: bool = False, gqa: bool = False) -> bool:
        """It takes a call with these features."""
        return (cls.cross or not cross) and (cls.causal or not causal) and (cls.gqa or not gqa)

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        """The op's call; see the module docstring."""
        raise NotImplementedError(cls.name)

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
        """FP8 e4m3 inputs with their descale factors (``fp8_scales``), output in ``out_dtype``
        (where the kernel can; the caller converts); only where ``fp8`` is set. With ``out`` (a
        contiguous (B, Sq, H, D) tensor) a kernel that can writes the answer there, rows past a
        query length left for the caller to zero, and returns ``out``; otherwise a new tensor
        as ``forward``'s."""
        raise ConfigError(f"attention kernel {cls.name!r} has no FP8 kernel")

    @classmethod
    def packed_shape(cls, b: int, s: int, h: int, d: int) -> Shape:
        """The shape ``forward_packed`` takes its inputs in (views of the padded batch's memory)."""
        return (b, s, h, d)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: Ragged, causal: bool, scale: float
    ) -> torch.Tensor:
        """Inside TensorRT: q in ``packed_shape(B, Sq, H, D)``, k and v in ``packed_shape(B, Sk,
        Hk, D)``, the lengths (any values: clamped here where the kernel would read past the
        buffers) and sequence starts in ``r``. Returns a new tensor (packed like q); its padded
        rows are the caller's to zero."""
        raise ConfigError(f"attention kernel {cls.name!r} reads lengths on the host and cannot run inside TensorRT")

    @classmethod
    def launcher(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens_q: torch.Tensor,
        lens_k: torch.Tensor,
        out: torch.Tensor,
        causal: bool,
        scale: float,
    ) -> Callable[[], None] | None:
        """A launch writing ``out`` from these exact tensors, lengths already within [0, Sq] and
        [0, Sk]; the padded rows are the caller's to zero. None where the kernel refuses the shape."""
        return None


class SequsedKernel(AttentionKernel):
    """FlashAttention's own kernels (FA3, the CuTe kernel): the padded batch as it is, with
    ``seqused_q/k`` on the GPU, cross-attention, causal masks, grouped-query heads and a scale
    of their own, written into a caller's buffer if given; rows past a length are left
    unwritten. A subclass sets ``call`` to its module's ``attention``."""

    dtypes = HALF_DTYPES
    device_lengths = True
    direct_write = True
    unwritten_tail = True

    call: ClassVar[Callable[..., torch.Tensor]]
    """The module's ``attention(q, k, v, seq_lens=None, seq_lens_k=None, *, causal=False,
    softmax_scale=None, out=None, zero_tail=True)``."""

    @classmethod
    def forward(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seq_lens: torch.Tensor | None,
        seq_lens_k: torch.Tensor | None = None,
        *,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        lens_k = key_lengths(seq_lens, seq_lens_k, q.shape[1], k.shape[1])
        lens_q = None if dense_batch(seq_lens, q.shape[1]) else seq_lens
        lens_k = None if dense_batch(lens_k, k.shape[1]) else lens_k
        return cls.call(q, k, v, lens_q, lens_k, causal=causal, softmax_scale=scale)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: Ragged, causal: bool, scale: float
    ) -> torch.Tensor:
        lens_q = r.lens_q.clamp(0, r.sq)
        lens_k = lens_q if r.lens_k is r.lens_q and r.sq == r.sk else r.lens_k.clamp(0, r.sk)
        return cls.call(q, k, v, lens_q, lens_k, causal=causal, softmax_scale=scale, zero_tail=False)

    @classmethod
    def launcher(
        cls,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens_q: torch.Tensor,
        lens_k: torch.Tensor,
        out: torch.Tensor,
        causal: bool,
        scale: float,
    ) -> Callable[[], None] | None:
        def launch() -> None:
            cls.call(q, k, v, lens_q, lens_k, causal=causal, softmax_scale=scale, out=out, zero_tail=False)

        return launch
