"""What an attention kernel is: its capabilities as data, and the calls the op and the plugin make.

Contract:
- A kernel is a subclass of ``AttentionKernel`` listed in ``fa3trt.kernels.registry``. Its class
  attributes say what it takes (dtypes, head dims, lengths on the device, writing a caller's
  buffer, a real FP8 kernel, the GPUs it runs on); the selector reads them and nobody keeps a
  second list.
- ``forward(q, k, v, seq_lens)`` is the op's call: (B, S, H, D) tensors of one dtype, optional
  int32 lengths (B,) on either device; it returns a new tensor whose rows past each length are
  zero, so a padded batch equals each sequence run alone.
- A kernel with ``device_lengths`` reads the lengths on the GPU with no host sync, so it can run
  inside TensorRT's ``enqueue``: ``forward_packed`` over views shaped by ``packed_shape``. With
  ``direct_write`` it also gives ``launcher``: one launch into a caller's output buffer.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ClassVar

import torch

from fa3trt.errors import ConfigError

__all__ = [
    "AttentionKernel",
    "SequsedKernel",
    "FLOAT_DTYPES",
    "HALF_DTYPES",
    "Shape",
    "log_once",
    "host_lengths",
    "dense_batch",
    "cuda_capability",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


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
    cuda_only: ClassVar[bool] = True
    """Runs on CUDA devices only."""
    capability: ClassVar[tuple[tuple[int, int], tuple[int, int]] | None] = None
    """(lowest, highest) compute capability it runs on; None: any CUDA GPU."""
    auto_from: ClassVar[tuple[int, int] | None] = None
    """Inside TensorRT the selector picks it by itself only from this compute capability."""
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
    def forward(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
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
    ) -> torch.Tensor:
        """FP8 e4m3 inputs with per-(batch, head) descale factors; only where ``fp8`` is set."""
        raise ConfigError(f"attention kernel {cls.name!r} has no FP8 kernel")

    @classmethod
    def packed_shape(cls, b: int, s: int, h: int, d: int) -> Shape:
        """The shape ``forward_packed`` takes its inputs in (views of the padded batch's memory)."""
        return (b, s, h, d)

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, cu: torch.Tensor, s: int
    ) -> torch.Tensor:
        """Inside TensorRT: inputs in ``packed_shape``, ``lens`` (B,) int32 on the GPU (any
        values: clamped here where the kernel would read past S), ``cu`` the padded batch's
        sequence starts (B+1,). Returns a new tensor; its padded rows are the caller's to zero."""
        raise ConfigError(f"attention kernel {cls.name!r} reads lengths on the host and cannot run inside TensorRT")

    @classmethod
    def launcher(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, out: torch.Tensor
    ) -> Callable[[], None] | None:
        """A launch writing ``out`` from these exact tensors, lengths already within [0, S]; the
        padded rows are the caller's to zero. None where the kernel refuses the shape."""
        return None


class SequsedKernel(AttentionKernel):
    """FlashAttention's own kernels (FA3, the CuTe kernel): the padded (B, S, H, D) batch as it
    is, with ``seqused_q/k`` on the GPU, written into a caller's buffer if given; rows past a
    length are left unwritten. A subclass sets ``call`` to its module's ``attention``."""

    dtypes = HALF_DTYPES
    device_lengths = True
    direct_write = True
    unwritten_tail = True

    call: ClassVar[Callable[..., torch.Tensor]]
    """The module's ``attention(q, k, v, seq_lens=None, *, out=None, zero_tail=True)``."""

    @classmethod
    def forward_packed(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, cu: torch.Tensor, s: int
    ) -> torch.Tensor:
        return cls.call(q, k, v, lens.clamp(0, s), zero_tail=False)

    @classmethod
    def launcher(
        cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, out: torch.Tensor
    ) -> Callable[[], None] | None:
        def launch() -> None:
            cls.call(q, k, v, lens, out=out, zero_tail=False)

        return launch
