"""CUDA graphs of any model for the torch backend (``TorchBackend(cuda_graphs=True)``).

A batch runs as the replay of a graph captured for its shape rounded up: the batch to 1, 2, 3,
4, 6, 8, 12, ... (fewer than half again as many rows), and, under ``batching: pad``, the bucketed
axis to a multiple of ``seq_step`` (and of the axis's own step); every other size as it is. One
launch instead of the model's dozens, so the host's share of a batch, which the eager model pays
per kernel and under contention, nearly vanishes. The price is the rounding: padded rows and
tokens are computed and dropped. Each graph keeps one static buffer per input and its output;
once they hold ``max_bytes``, shapes without a graph run eagerly.

Padding is what the batch assembler would make: the bucketed axis past a row's length holds the
input's ``pad`` value, ``fill: lengths`` of the added rows is 0 and their masks keep every key,
so every shape is one graph whatever its lengths. Only a model whose forward never waits on the
host qualifies (no ``.item()``, no data-dependent shapes; lengths read on the device: FA3 or
FlashAttention's CuTe kernel under ``pad``): its capture fails otherwise, and the backend refuses
``cuda_graphs`` at start with the reason.

Graphs are captured on first use of their shape (an eager run first, so kernels are compiled
and libraries have their workspaces), each into a memory pool shared by the graphs replayed on
the same CUDA stream. One thread at a time uses a stream's graphs, capture included: replays on
one stream never overlap, and each replay's output is copied out before the next replay is
queued, so the pool's buffers are reused safely. A replica's buckets have a stream each, so
their graphs run side by side.

Each replay stream has a capture stream of its own. PyTorch keys a cuBLAS workspace by
(handle, stream), and a graph keeps the address of the workspace it was captured with
(pytorch/pytorch#193402): graphs captured on one shared stream would share a workspace, and
two of them replayed at once on two buckets' streams would race on it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fa3trt.signature import Signature, round_up
from fa3trt.transfer import to_device

__all__ = ["GraphRunner", "batch_rows"]

log = logging.getLogger(__name__)

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def batch_rows(b: int) -> int:
    """``b`` rounded up to 1, 2, 3, 4, 6, 8, 12, 16, 24, ...: fewer than half again as many rows."""
    p = 1 << max(0, b - 1).bit_length()  # the power of two at or above b
    return 3 * p // 4 if p >= 4 and b <= 3 * p // 4 else p


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static inputs at the graph's shape
    y: torch.Tensor  # static output
    bytes: int


@dataclass
class _Stream:
    """What the graphs replayed on one stream share."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # their use (capture included), one thread at a time
    capture: torch.cuda.Stream | None = None  # the stream they are captured on, made at the first capture
    pool: Any = None  # their memory pool, from the first capture


class GraphRunner:
    """Runs ``forward(batch)`` through CUDA graphs keyed by rounded shape and stream."""

    def __init__(
        self,
        forward: Forward,
        signature: Signature,
        device: torch.device,
        seq_step: int = 128,
        max_bytes: int = 8 << 30,
    ) -> None:
        self.forward, self.signature, self.device = forward, signature, device
        step = signature.step(signature.bucketed)
        self.seq_step = seq_step * step // math.gcd(seq_step, step)
        self.max_bytes = max_bytes
        self.static_bytes = 0  # held by the graphs' input and output buffers
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._streams: dict[int, _Stream] = {}  # replay stream handle -> what its graphs share
        self._lock = threading.Lock()
        self._full_logged = False
        self._specs = {t.name: t for t in signature.inputs}

    def __len__(self) -> int:
        return len(self._graphs)

    def shape_for(self, b: int, n: int) -> tuple[int, int]:
        """The (rows, bucketed size) a batch of ``b`` rows padded to ``n`` runs in."""
        return batch_rows(b), round_up(n, self.seq_step) if self.signature.batching == "pad" else n

    def _graph_shapes(self, batch: Mapping[str, torch.Tensor], gb: int, gn: int) -> dict[str, tuple[int, ...]]:
        sig, shapes = self.signature, {}
        for name, t in batch.items():
            spec = self._specs[name]
            shape = list(t.shape)
            if spec.batched:
                shape[0] = gb
                if spec.fill != "lengths" and sig.bucketed in spec.axes:
                    shape[1 + spec.axes.index(sig.bucketed)] = gn
            shapes[name] = tuple(shape)
        return shapes

    def run(self, batch: Mapping[str, torch.Tensor], b: int, n: int) -> torch.Tensor | None:
        """The output of ``batch`` (``b`` rows, the bucketed axis at ``n``; inputs on the
        device, lengths on the device or the host), a tensor of its own; None when its shape
        has no graph and the graphs' buffers already hold ``max_bytes``: run it eagerly."""
        stream = torch.cuda.current_stream(self.device)
        gb, gn = self.shape_for(b, n)
        shapes = self._graph_shapes(batch, gb, gn)
        key = (tuple(sorted((k, v, str(batch[k].dtype)) for k, v in shapes.items())), stream.cuda_stream)
        with self._lock:
            shared = self._streams.setdefault(stream.cuda_stream, _Stream())
        # One thread at a time per stream, capture included: the stream's graphs share a pool.
        with shared.lock:
            g = self._graphs.get(key)
            if g is None:
                with self._lock:
                    need = sum(math.prod(s) * batch[k].element_size() for k, s in shapes.items())
                    if self.static_bytes + 2 * need > self.max_bytes:
                        if not self._full_logged:
                            log.warning(
                                "%d CUDA graphs hold %.1f GiB of buffers; shapes without a graph run eagerly",
                                len(self._graphs),
                                self.static_bytes / 2**30,
                            )
                            self._full_logged = True
                        return None
                    g = self._capture(batch, shapes, gn, stream, shared)
                    self._graphs[key] = g
                    self.static_bytes += g.bytes
            self._fill(g, batch, b, n)
            g.graph.replay()
            y = g.y[:b]
            if self.signature.batching == "pad" and self.signature.bucketed in self.signature.output.axes:
                y = y.narrow(1 + self.signature.output.axes.index(self.signature.bucketed), 0, n)
            return y.clone()

    def _fill(self, g: _Graph, batch: Mapping[str, torch.Tensor], b: int, n: int) -> None:
        """Copy the batch into the graph's static inputs and pad the rest (module docstring)."""
        sig = self.signature
        for name, t in batch.items():
            spec, static = self._specs[name], g.inputs[name]
            if not spec.batched:
                static.copy_(t, non_blocking=True)
                continue
            if spec.fill == "lengths":
                # Host lengths (a batch without padding) go through page-locked memory: a copy
                # from pageable memory would wait for the GPU.
                static[:b].copy_(to_device(t, self.device))
                static[b:].zero_()
                continue
            dim = 1 + spec.axes.index(sig.bucketed) if sig.bucketed in spec.axes else None
            rows = static[:b]
            if dim is None or static.shape[dim] == n:
                rows.copy_(t)
            else:
                rows.narrow(dim, 0, n).copy_(t)
                rows.narrow(dim, n, static.shape[dim] - n).fill_(0 if spec.fill == "mask" else spec.pad)
            static[b:].fill_(1 if spec.fill == "mask" else 0)

    def _capture(
        self,
        batch: Mapping[str, torch.Tensor],
        shapes: dict[str, tuple[int, ...]],
        gn: int,
        stream: torch.cuda.Stream,
        shared: _Stream,
    ) -> _Graph:
        sig = self.signature
        static: dict[str, torch.Tensor] = {}
        for name, t in batch.items():
            spec = self._specs[name]
            if spec.fill == "lengths":  # the capture's own run: every row full
                static[name] = torch.full(shapes[name], gn, dtype=t.dtype, device=self.device)
            elif spec.fill == "mask" or spec.torch_dtype == torch.bool:
                static[name] = torch.ones(shapes[name], dtype=t.dtype, device=self.device)
            else:
                static[name] = torch.zeros(shapes[name], dtype=t.dtype, device=self.device)
        if shared.capture is None:
            # Made once per replay stream: torch hands out streams round-robin from a pool of
            # 32, so a stream made (and dropped) on every capture would soon come round to one
            # that a bucket replays on, or captures another bucket's graphs on.
            shared.capture = torch.cuda.Stream(self.device)
        cs = shared.capture
        cs.wait_stream(stream)
        # One eager run on the capture stream first: kernels compile, and cuBLAS sets up its
        # workspace for this thread's handle on this stream, outside the capture.
        with torch.cuda.stream(cs):
            self.forward(static)
        cs.synchronize()
        graph = torch.cuda.CUDAGraph()
        # Replayed on ``stream``. thread_local: other buckets' threads keep running their own
        # streams during the capture.
        with torch.cuda.graph(graph, pool=shared.pool, stream=cs, capture_error_mode="thread_local"):
            y = self.forward(static)
        if shared.pool is None:
            shared.pool = graph.pool()
        size = sum(v.numel() * v.element_size() for v in static.values()) + y.numel() * y.element_size()
        log.info(
            "captured a CUDA graph for %s (%s) for stream %#x",
            {k: tuple(v.shape) for k, v in static.items()},
            sig.bucketed,
            stream.cuda_stream,
        )
        return _Graph(graph, static, y, size)
