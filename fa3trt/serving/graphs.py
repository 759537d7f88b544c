"""CUDA graphs of the model for the torch backend (``TorchBackend(cuda_graphs=True)``).

A batch of (B, S) runs as the replay of a graph captured for (B rounded up to 1, 2, 3, 4, 6,
8, 12, ..., S rounded up to a multiple of ``seq_step``): one launch instead of the model's few
dozen, so the host's share of a batch, which the eager model pays per kernel and under
contention, nearly vanishes. The price is the rounding: padded rows and sequences are computed
and dropped. Each graph keeps its own input and output buffers; once they hold ``max_bytes``,
shapes without a graph run eagerly.

Graphs are captured on first use of their shape (an eager run first, so kernels are compiled
and libraries have their workspaces), each into a memory pool shared by the graphs replayed on
the same CUDA stream. One thread at a time uses a stream's graphs, capture included: replays on
one stream never overlap, and each replay's output is copied out before the next replay is
queued, so the pool's buffers are reused safely. A replica's buckets have a stream each
(deploy.app), so their graphs run side by side.

Each replay stream has a capture stream of its own. PyTorch keys a cuBLAS workspace by
(handle, stream), and a graph keeps the address of the workspace it was captured with
(pytorch/pytorch#193402): graphs captured on one shared stream would share a workspace, and
two of them replayed at once on two buckets' streams would race on it.

The lengths go to the graph on the device and padded sequences get length 0, so every shape is
one graph whatever its lengths: only kernels that take lengths on the device with no host
sync (FA3, FlashAttention's CuTe kernel; ``fa3trt.attention.kernels.selector.lengths_on_device``) qualify.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GraphRunner"]

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static input (B, S, hidden)
    lens: torch.Tensor  # static lengths (B,), int32, on the device
    y: torch.Tensor  # static output


@dataclass
class _Stream:
    """What the graphs replayed on one stream share."""

    lock: threading.Lock = field(default_factory=threading.Lock)  # their use (capture included), one thread at a time
    capture: torch.cuda.Stream | None = None  # the stream they are captured on, made at the first capture
    pool: Any = None  # their memory pool, from the first capture


class GraphRunner:
    """Runs ``model(x, lens)`` through CUDA graphs keyed by rounded shape and stream."""

    def __init__(
        self,
        model: torch.nn.Module,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        seq_step: int = 128,
        max_bytes: int = 8 << 30,
    ) -> None:
        self.model, self.hidden, self.dtype, self.device = model, hidden, dtype, device
        self.seq_step, self.max_bytes = seq_step, max_bytes
        self.static_bytes = 0  # held by the graphs' input and output buffers
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._streams: dict[int, _Stream] = {}  # replay stream handle -> what its graphs share
        self._lock = threading.Lock()
        self._full_logged = False

    def shape_for(self, b: int, s: int) -> tuple[int, int]:
        """The graph shape a (b, s) batch runs in: b rounded up to 1, 2, 3, 4, 6, 8, 12, 16, 24, ...
        (fewer than half again as many sequences), s up to a multiple of ``seq_step``."""
        p = 1 << max(0, b - 1).bit_length()  # the power of two at or above b
        gb = 3 * p // 4 if p >= 4 and b <= 3 * p // 4 else p
        return gb, -(-s // self.seq_step) * self.seq_step

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor | None:
        """``x`` (b, s, hidden) in the model dtype on the device, ``lens`` int32 (b,) on the
        device; the output (b, s, hidden), a tensor of its own. None when this shape has no graph
        and the graphs' buffers already hold ``max_bytes``: run it eagerly."""
        b, s = int(x.shape[0]), int(x.shape[1])
        stream = torch.cuda.current_stream(self.device)
        gb, gs = self.shape_for(b, s)
        key = (gb, gs, stream.cuda_stream)
        with self._lock:
            shared = self._streams.setdefault(stream.cuda_stream, _Stream())
        # One thread at a time per stream, capture included: the stream's graphs share a pool.
        with shared.lock:
            g = self._graphs.get(key)
            if g is None:
                with self._lock:
                    need = 2 * gb * gs * self.hidden * x.element_size()
                    if self.static_bytes + need > self.max_bytes:
                        if not self._full_logged:
                            log.warning(
                                "%d CUDA graphs hold %.1f GiB of buffers; shapes without a graph run eagerly",
                                len(self._graphs),
                                self.static_bytes / 2**30,
                            )
                            self._full_logged = True
                        return None
                    g = self._capture(gb, gs, stream, shared)
                    self._graphs[key] = g
                    self.static_bytes += need
            g.x[:b, :s].copy_(x)
            if s < gs:
                g.x[:b, s:].zero_()
            g.lens[:b].copy_(lens)
            g.lens[b:].zero_()
            g.graph.replay()
            return g.y[:b, :s].clone()

    def _capture(self, b: int, s: int, stream: torch.cuda.Stream, shared: _Stream) -> _Graph:
        x = torch.zeros(b, s, self.hidden, dtype=self.dtype, device=self.device)
        lens = torch.full((b,), s, dtype=torch.int32, device=self.device)
        if shared.capture is None:
            # Made once per replay stream: torch hands out streams round-robin from a pool of
            # 32, so a stream made (and dropped) on every capture would soon come round to one
            # that a bucket replays on, or captures another bucket's graphs on.
            shared.capture = torch.cuda.Stream(self.device)
        cs = shared.capture
        cs.wait_stream(stream)  # x and lens were filled on ``stream``
        # One eager run on the capture stream first: kernels compile, and cuBLAS sets up its
        # workspace for this thread's handle on this stream, outside the capture.
        with torch.cuda.stream(cs):
            self.model(x, lens)
        cs.synchronize()
        graph = torch.cuda.CUDAGraph()
        # Replayed on ``stream``. thread_local: other buckets' threads keep running their own
        # streams during the capture.
        with torch.cuda.graph(graph, pool=shared.pool, stream=cs, capture_error_mode="thread_local"):
            y = self.model(x, lens)
        if shared.pool is None:
            shared.pool = graph.pool()
        log.info("captured a CUDA graph for batch %d x %d tokens for stream %#x", b, s, stream.cuda_stream)
        return _Graph(graph, x, lens, y)
