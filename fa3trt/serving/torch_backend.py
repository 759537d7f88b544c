"""The torch backend: any model from its spec, its attention routed to the op, on the CPU or a GPU.

Contract:
- ``TorchBackend(spec)`` loads the model (``fa3trt.models.sources``) onto the device and runs
  batches (keyword tensors as ``fa3trt.serving.batch.assemble`` makes them) under
  ``fa3trt.route_attention`` with the spec's method (``off``: as is: the reference model calls
  the op itself). It returns the selected output (B, ...) on the device. Every batch's routing
  report is added to ``routing`` (the totals ``/v1/info`` shows).
- At load it runs one small batch and records the model's attention calls
  (``fa3trt.attention.op.recording_calls``): a call in FP8 (mode 1) at a head dim no FP8 kernel
  of the device takes is refused then (``MissingDependencyError``), and a batch's lengths go to
  the device only where the kernel reads them there at every recorded head dim and dtype.
- ``cuda_graphs``: batches run as CUDA graphs (``fa3trt.serving.graphs``) where the model
  qualifies; where it does not (a CPU device, a forward that waits on the host), the first
  capture (at warm-up, before the replica takes traffic) raises ``ConfigError`` naming why.
- ``compile``: the model runs under ``torch.compile`` with its attention routed, each routed call
  one opaque op node in the compiled graph (``fa3trt.attention.routing.compile_routed``).
- Batches of a model routed through transformers' attention interface run one at a time (the
  hook sets the model's attention implementation for the length of a call); others run
  concurrently, one per bucket stream.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fa3trt.attention.compiled import compile_routed
from fa3trt.attention.kernels.fp8 import require_fp8_kernel
from fa3trt.attention.kernels.registry import get
from fa3trt.attention.kernels.selector import lengths_on_device, select_kernel
from fa3trt.attention.op import MODE_FP8, AttentionCall, recording_calls
from fa3trt.attention.routing import RoutingReport, route_attention
from fa3trt.errors import ConfigError
from fa3trt.models.sources import load_source, model_id
from fa3trt.models.spec import AnyModelSpec
from fa3trt.onnx.calls import select_output
from fa3trt.serving.backends import default_device, describe_device
from fa3trt.serving.graphs import GraphRunner
from fa3trt.signature import Signature

__all__ = ["TorchBackend", "batch_sizes"]

log = logging.getLogger(__name__)


def batch_sizes(signature: Signature, batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(rows, size of the bucketed axis) of a batch."""
    for t in signature.inputs:
        if t.batched and t.fill is None and signature.bucketed in t.axes:
            x = batch[t.name]
            return int(x.shape[0]), int(x.shape[1 + t.axes.index(signature.bucketed)])
    raise ConfigError(f"no batched input has the bucketed axis {signature.bucketed!r}")


class TorchBackend:
    """A model in inference mode on the CPU or a CUDA device (see the module docstring)."""

    name = "torch"

    def __init__(
        self,
        spec: AnyModelSpec,
        device: torch.device | str | None = None,
        *,
        cuda_graphs: bool = False,
        compile: bool = False,
        graph_seq_step: int = 128,
    ) -> None:
        self.spec = spec
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype: torch.dtype = getattr(torch, spec.model_dtype)
        loaded = load_source(spec)
        self.signature: Signature = loaded.signature
        self.module = loaded.module.to(self.device)
        self.model_id = model_id(spec)
        self.kernel = select_kernel(self.device)
        self.routing = RoutingReport(spec.routing)
        self._report_lock = threading.Lock()
        self._lock: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        self.calls = self._probe()
        self.compiled = compile
        self._forward = self._compile() if compile else self._eager
        self.lengths_on_device = (
            self.device.type == "cuda"
            and get(self.kernel).device_lengths
            and all(lengths_on_device(self.kernel, c.dtype, c.head_dim) for c in self.calls)
        )
        self.graphs: GraphRunner | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ConfigError(
                    f"cuda_graphs needs a CUDA device and this backend runs on {self.device}; set cuda_graphs to false"
                )
            if graph_seq_step < 1:
                raise ConfigError(f"graph_seq_step must be >= 1, got {graph_seq_step}")
            self.graphs = GraphRunner(self._forward, self.signature, self.device, seq_step=graph_seq_step)

    def _probe(self) -> list[AttentionCall]:
        """One batch of the smallest accepted sizes, its attention calls recorded (module docstring)."""
        sample = {k: v.to(self.device) for k, v in self.signature.samples(self.signature.smallest_sizes(), 1).items()}
        with recording_calls() as calls, torch.inference_mode():
            if self.spec.routing == "off":
                self.module(**sample)
            else:
                with self._routed() as report:
                    self.module(**sample)
                self.routing = RoutingReport(report.method)  # the hooks used; the counts are the batches'
                if "transformers" in report.method:
                    self._lock = threading.Lock()
        for head_dim, causal in sorted({(c.head_dim, c.causal) for c in calls if c.mode == MODE_FP8}):
            require_fp8_kernel(self.device, head_dim, causal=causal)
        return sorted(set(calls), key=lambda c: (c.mode, c.head_dim, str(c.dtype)))

    def _routed(self) -> contextlib.AbstractContextManager[RoutingReport]:
        """The model's attention routed for one eager call, as its spec says (a server routing
        every batch logs at DEBUG and reports its totals instead)."""
        return route_attention(self.module, self.spec.routing, attn_mode=self.spec.attn_mode, log_level=logging.DEBUG)

    def _compile(self) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """The model under ``torch.compile``, its routed attention one op node of the graph."""
        if self.spec.routing == "off":
            compiled: Any = torch.compile(self.module)
        else:
            # The server makes a fill: mask input from each request's length: a key-padding
            # prefix mask, so a compiled graph may count its kept keys as the lengths.
            promise = any(t.fill == "mask" for t in self.signature.inputs)
            compiled = compile_routed(
                self.module, self.spec.routing, key_padding_masks=promise, attn_mode=self.spec.attn_mode
            )
            self.routing = compiled.report
        self._lock = threading.Lock()  # one compiled call at a time (its report, dynamo's caches)

        def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return select_output(compiled(**batch), self.spec.select)

        return forward

    def _eager(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's selected output for one batch, routed by the spec's method."""
        if self.spec.routing == "off":
            return select_output(self.module(**batch), self.spec.select)
        with self._routed() as report:
            out = self.module(**batch)
        with self._report_lock:
            self.routing.add(report)
        return select_output(out, self.spec.select)

    def run(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's selected output for one batch, on the device. Inputs move to the device;
        a ``fill: lengths`` input stays where the batch put it (host lengths: dense kernels)."""
        keep = {t.name for t in self.signature.inputs if t.fill == "lengths"}
        batch = {k: v if k in keep else v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self._lock, torch.inference_mode():
            if self.graphs is not None:
                b, n = batch_sizes(self.signature, batch)
                try:
                    y = self.graphs.run(batch, b, n)
                except RuntimeError as e:
                    if not len(self.graphs):
                        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise ConfigError(
                            f"cuda_graphs: this model cannot run as a CUDA graph on {self.device} ({why}); its forward "
                            "waits on the host (or its attention kernel reads lengths on the host: install FA3 or "
                            "FlashAttention's CuTe kernel). Set cuda_graphs to false"
                        ) from e
                    raise
                if y is not None:
                    return y
            return self._forward(batch)

    def warmup(self, batches: Sequence[dict[str, torch.Tensor]]) -> None:
        t0 = time.perf_counter()
        for b in batches:
            self.run(b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        routed = self.routing.summary() if self.spec.routing != "off" else "routing off"
        log.info("torch backend warmed %d batches in %.2fs; %s", len(batches), time.perf_counter() - t0, routed)

    def batch_rows(self, b: int) -> int:
        """``b``, or under CUDA graphs the rows of the graph it replays."""
        return b if self.graphs is None else self.graphs.shape_for(b, 0)[0]

    def describe(self) -> dict[str, Any]:
        return describe_device(self.name, self.device, self.spec.model_dtype, self.kernel) | {
            "model": {"spec": self.spec.describe(), "model_id": self.model_id},
            "routing": self.routing.as_dict() if self.spec.routing != "off" else None,
            "attention_calls": [{"mode": c.mode, "head_dim": c.head_dim, "dtype": str(c.dtype)} for c in self.calls],
            "lengths_on_device": self.lengths_on_device,
            "compile": self.compiled,
            "cuda_graphs": None
            if self.graphs is None
            else {"captured": len(self.graphs), "seq_step": self.graphs.seq_step},
        }
