"""A batch of checked requests as a model's keyword inputs on its device, and its answers.

Contract:
- ``group_key(signature, request)``: requests with equal keys may share a batch (``pad``: all;
  ``shape``: equal shapes and equal unbatched tensors).
- ``assemble(signature, requests, device, ...)`` makes one group's batch. Each float input is
  staged in one page-locked buffer in the requests' own float dtype, moved by one DMA and
  converted on the device (a host conversion of a large float16 request to bfloat16 costs more
  than its forward; a copy from pageable memory goes through the driver's staging buffer and
  blocks the host per row); its padding is filled on the device. Integer and boolean inputs,
  small, are padded on the host and queued to the device. ``fill: lengths`` inputs go to the
  device where the kernel reads them there (``lengths_on_device``) and some sequence is padded,
  else they stay on the host (a batch without padding then runs the dense kernels); ``fill:
  mask`` inputs are made on the device. On the CPU everything is made in place, converted once.
- ``Batch.finite``: per float input and row, whether it holds no NaN or Inf, found on the device
  after the conversion (a value the model's dtype cannot hold shows as Inf): one pass the GPU
  does in microseconds, whose answer comes back with the batch's, instead of a pass over every
  request's bytes on the host. A row holding one gets its own error; the others are answered.
- ``wire_dtype`` and ``split``: the output leaves the device in the dtype the answers need
  (float16 where every request wants float16, else the output's: half the bytes to move), and
  is cut into each request's answer along the bucketed axis under ``pad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fa3trt.errors import InvalidInputError
from fa3trt.requests import Checked
from fa3trt.signature import Signature, TensorSpec
from fa3trt.transfer import to_device

__all__ = ["Batch", "assemble", "group_key", "wire_dtype", "split", "answer_dtype"]


@dataclass
class Batch:
    """One group's inputs on the device, the rows' lengths along the bucketed axis, the padded
    size, and per float input which rows are free of NaN and Inf (empty when not checked)."""

    inputs: dict[str, torch.Tensor]
    lengths: list[int]
    size: int
    finite: dict[str, torch.Tensor] = field(default_factory=dict)


def group_key(signature: Signature, req: Checked) -> tuple[Any, ...]:
    """Requests with equal keys may share a batch (see the module docstring)."""
    if signature.batching == "pad":
        return ()
    return tuple(
        (t.name, req.tensors[t.name].shape, None if t.batched else req.tensors[t.name].tobytes())
        for t in signature.sent
    )


def _stage_dtype(arrays: Sequence[np.ndarray]) -> torch.dtype:
    """The dtype float rows travel in: their own when they share float16 or float32 (the device
    converts), else float32 (converted once, while staging)."""
    kinds = {a.dtype for a in arrays}
    if len(kinds) == 1 and next(iter(kinds)) in (np.float16, np.float32):
        return torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype  # (a request's input may be 0-d)
    return torch.float32


def _host_rows(
    t: TensorSpec, signature: Signature, arrays: Sequence[np.ndarray], longest: int, dtype: torch.dtype, pin: bool
) -> tuple[torch.Tensor, int | None]:
    """The rows in one host tensor of ``dtype`` (converted while copied; page-locked where
    ``pin``), and the dim padded to ``longest`` (its padding left unset), if any."""
    dim = t.axes.index(signature.bucketed) if signature.batching == "pad" and signature.bucketed in t.axes else None
    shape = list(arrays[0].shape)
    if dim is not None:
        shape[dim] = longest
    out = torch.empty((len(arrays), *shape), dtype=dtype, pin_memory=pin)
    for i, a in enumerate(arrays):
        # (np.ascontiguousarray would make a 0-d array 1-d.)
        src = torch.from_numpy(np.require(a, requirements="C"))
        (out[i] if dim is None else out[i].narrow(dim, 0, a.shape[dim])).copy_(src)
    return out, dim


def assemble(
    signature: Signature,
    reqs: Sequence[Checked],
    device: torch.device,
    *,
    lengths_on_device: bool = False,
    check_finite: bool = False,
) -> Batch:
    """The batch of ``reqs`` (one group: see ``group_key``) on ``device`` (see the module docstring)."""
    if not reqs:
        raise InvalidInputError("cannot assemble an empty batch")
    lengths = [r.length for r in reqs]
    longest = max(lengths)
    padded = signature.batching == "pad" and any(n < longest for n in lengths)
    cuda = device.type == "cuda"
    lens = torch.tensor(lengths, dtype=torch.int32)
    # On the device where a mask is made there, or where the kernel reads padded lengths there.
    wants = any(t.fill == "mask" for t in signature.inputs) or (lengths_on_device and padded)
    lens_dev = to_device(lens, device) if cuda and wants else lens
    finite: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for t in signature.inputs:
        if t.fill == "lengths":
            out[t.name] = lens_dev if lengths_on_device and padded else lens
            continue
        if t.fill == "mask":
            shape = [longest if a == signature.bucketed else int(a) for a in t.axes]
            view = [len(reqs)] + [longest if a == signature.bucketed else 1 for a in t.axes]
            keep = torch.arange(longest, device=device)[None, :] < lens_dev[:, None]
            out[t.name] = keep.view(view).expand(len(reqs), *shape).to(t.torch_dtype)
            continue
        arrays = [r.tensors[t.name] for r in reqs]
        if not t.batched:
            one = torch.from_numpy(np.require(arrays[0], requirements="C"))
            out[t.name] = to_device(one, device).to(t.torch_dtype)
            continue
        is_float = t.torch_dtype.is_floating_point
        # Floats travel in their own dtype and are converted by the device; the rest, small, as declared.
        stage = _stage_dtype(arrays) if is_float and cuda else t.torch_dtype
        host, dim = _host_rows(t, signature, arrays, longest, stage, pin=cuda)
        # The caching host allocator keeps the pinned block until this copy has completed.
        dev = host.to(device, non_blocking=True).to(t.torch_dtype) if cuda else host
        if dim is not None:
            for i, r in enumerate(reqs):
                n = r.tensors[t.name].shape[dim]
                if n < longest:
                    dev[i].narrow(dim, n, longest - n).fill_(t.pad)
        out[t.name] = dev
        if check_finite and is_float and dev.numel():
            # min and max propagate NaN and show an Inf: one pass per input, no copy of it.
            lo, hi = torch.aminmax(dev.reshape(len(reqs), -1), dim=1)
            finite[t.name] = torch.isfinite(lo) & torch.isfinite(hi)
    return Batch(out, lengths, longest, finite)


def answer_dtype(signature: Signature, req: Checked) -> np.dtype:
    """The dtype ``req``'s answer goes back in: its own (the single-array API answers in the
    request's dtype), else the output's (bfloat16 as float32: NumPy has none)."""
    if req.answer_dtype is not None:
        return np.dtype(req.answer_dtype)
    return np.dtype("float32" if signature.output.dtype == "bfloat16" else signature.output.dtype)


def wire_dtype(signature: Signature, reqs: Sequence[Checked]) -> torch.dtype:
    """The dtype a batch's output leaves the device in (see the module docstring)."""
    wanted = {answer_dtype(signature, r) for r in reqs}
    if wanted == {np.dtype("float16")}:
        return torch.float16
    out = signature.output.torch_dtype
    return torch.float32 if out == torch.bfloat16 or np.dtype("float64") in wanted else out


def split(signature: Signature, y: torch.Tensor, reqs: Sequence[Checked]) -> list[np.ndarray]:
    """The batch output ``y`` (on the CPU, in ``wire_dtype``) cut into each request's answer."""
    if y.shape[0] < len(reqs):
        raise InvalidInputError(f"the model returned {y.shape[0]} rows for a batch of {len(reqs)}")
    cut = signature.batching == "pad" and signature.bucketed in signature.output.axes
    dim = signature.output.axes.index(signature.bucketed) if cut else 0
    answers = []
    for i, r in enumerate(reqs):
        a = (y[i].narrow(dim, 0, r.length) if cut else y[i]).numpy()
        want = answer_dtype(signature, r)
        answers.append(a if a.dtype == want else a.astype(want))
    return answers
