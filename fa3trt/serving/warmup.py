"""What a replica runs before it takes traffic, at sizes the model accepts.

Contract:
- ``warmup_requests(signature, buckets, i, limit)``: the requests that warm bucket ``i``: one
  alone and a full batch of ``limit`` at the largest size the bucket holds (every other axis at
  its largest), and under ``pad`` a ragged full batch too (a kernel that compiles per variant,
  dense and ragged, is then ready for the first padded batch). They go through the batch
  assembler like any request, so staging and CUDA graphs are warmed as served.
- ``health_request(signature)``: one request at every axis's smallest accepted size.
- ``check_padding(backend, buckets)`` proves at start that ``batching: pad`` is exact for this
  model: a request alone and the same request padded in a batch with a longer one must agree,
  else a ``ConfigError`` says to batch by shape.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError
from fa3trt.requests import Checked
from fa3trt.serving.backends import Backend
from fa3trt.serving.batch import assemble, split
from fa3trt.signature import Signature, round_down

__all__ = ["warmup_requests", "health_request", "check_padding", "request_at", "PAD_TOLERANCE"]

log = logging.getLogger(__name__)

PAD_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 6e-2}
"""Largest difference, relative to the answer's largest value, between a request alone and the
same request padded in a batch (summation order only; a leak through the padding is of order 1)."""


def request_at(signature: Signature, sizes: dict[str, int], bucket: int, seed: int = 0) -> Checked:
    """A checked request with every named axis at ``sizes`` (random floats, integers 1)."""
    sample = signature.samples(sizes, 1, seed)
    tensors = {}
    for t in signature.sent:
        v = sample[t.name][0] if t.batched else sample[t.name]
        tensors[t.name] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return Checked(tensors, bucket, sizes[signature.bucketed])


def warmup_requests(signature: Signature, buckets: Buckets, i: int, limit: int) -> list[list[Checked]]:
    """The batches that warm bucket ``i`` (see the module docstring)."""
    sizes = signature.sample_sizes(buckets, buckets.edges[i])
    full = [request_at(signature, sizes, i, seed=s) for s in range(limit)]
    batches = [full[:1]] + ([full] if limit > 1 else [])
    n, step = sizes[signature.bucketed], signature.step(signature.bucketed)
    if signature.batching == "pad" and limit > 1 and n > step:
        lo = signature.accepted(signature.bucketed, buckets.lower(i), n)
        short = max(lo[0] if lo else step, round_down(n // 2, step))
        batches.append(full[:-1] + [request_at(signature, sizes | {signature.bucketed: short}, i, seed=limit)])
    return batches


def health_request(signature: Signature) -> Checked:
    """One request at every axis's smallest accepted size (bucket 0 holds it)."""
    return request_at(signature, signature.smallest_sizes(), 0)


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max()) or 1.0
    return float(np.abs(a.astype(np.float64) - b).max()) / scale


def check_padding(backend: Backend, buckets: Buckets) -> float:
    """For ``batching: pad``: a request alone vs the same request padded next to a longer one
    (see the module docstring). Returns the relative difference; raises ``ConfigError`` past
    ``PAD_TOLERANCE`` of the model's dtype."""
    sig = backend.signature
    if sig.batching != "pad":
        return 0.0
    got = sig.accepted(sig.bucketed, 1, buckets.edges[0])
    if got is None:
        return 0.0
    long = got[1]
    short = max(got[0], round_down(long // 2, sig.step(sig.bucketed)))
    if short == long:
        return 0.0
    other = sig.smallest_sizes()
    reqs = [request_at(sig, other | {sig.bucketed: n}, 0, seed) for n, seed in ((short, 1), (long, 2))]

    def answer(group: list[Checked]) -> np.ndarray:
        batch = assemble(sig, group, backend.device, lengths_on_device=backend.lengths_on_device)
        return split(sig, backend.run(batch.inputs).float().cpu(), group)[0]

    diff = _rel_diff(answer(reqs), answer(reqs[:1]))
    if not diff <= PAD_TOLERANCE.get(backend.dtype, 1e-3):
        raise ConfigError(
            f"batching: pad is not exact for this model: a request of {short} alone and padded to {long} in a batch "
            f"differ by {diff:.3g} of its largest value (its padding reaches other tokens through an op that "
            "reads no lengths: a mask input, fill: mask, lets attention skip it); use batching: shape"
        )
    log.info("batching: pad checked exact for this model (relative difference %.2e)", diff)
    return diff
