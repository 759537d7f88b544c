"""What a served model takes and gives: named inputs with named axes, one named output.

Contract:
- A ``TensorSpec`` is one tensor of one request: its ``dtype`` and its ``axes`` (a name for a
  dynamic axis, shared by every tensor that has it; an int for a fixed size). The batch axis is
  not listed: the server adds it in front of every ``batched`` tensor. An unbatched tensor
  (FLUX's ``img_ids``) is one for the whole batch, so only requests whose copies are equal are
  batched together. ``fill`` tensors are made by the server from each request's length along
  the bucketed axis (``"lengths"``: int32 (B,); ``"mask"``: 1 up to the length, 0 after) and are
  never sent.
- A ``Signature`` is the inputs, the output, the bucketed axis (its size picks the bucket), the
  range of every other named axis (the bucketed one may have a lower bound; its upper bound is
  the largest bucket), the step each named axis must be a multiple of (a DiT's latent axes: its
  patch size), and how requests of different sizes share a batch:
  ``"pad"`` pads every tensor with the bucketed axis to the batch's longest (with ``pad``) and
  cuts each answer back to its own length: exact only when every cross-token op of the model is
  attention that reads the lengths (the reference model; an encoder with a padding mask);
  ``"shape"`` batches only requests of equal shapes (``group_key``).
- Requests are checked against it by ``fa3trt.requests.check_request``.
- ``samples``, ``sample_sizes`` and ``smallest_sizes`` make inputs at sizes the model accepts
  (warm-up, health checks, export samples and checks).
- ``to_dict``/``from_dict`` round-trip it (engine metadata, ``/v1/info``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError

__all__ = ["TensorSpec", "Signature", "TORCH_DTYPES", "BATCH_AXIS", "Batching", "Fill", "round_up", "round_down"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
"""The dtypes a tensor of a signature may have."""
BATCH_AXIS = "B"
"""The name of the batch axis the server adds."""

Batching = Literal["pad", "shape"]
Fill = Literal["lengths", "mask"]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a request (axes without the batch axis)."""

    name: str
    dtype: str = "float32"
    axes: tuple[str | int, ...] = ()
    batched: bool = True
    pad: float = 0.0
    fill: Fill | None = None

    def __post_init__(self) -> None:
        if self.dtype not in TORCH_DTYPES:
            raise ConfigError(f"{self.name}: dtype {self.dtype!r} is not one of {sorted(TORCH_DTYPES)}")
        object.__setattr__(self, "axes", tuple(self.axes))
        for a in self.axes:
            if isinstance(a, bool) or not isinstance(a, (str, int)) or (isinstance(a, int) and a < 1):
                raise ConfigError(f"{self.name}: axis {a!r} must be an axis name or a size >= 1")
            if a == BATCH_AXIS:
                raise ConfigError(
                    f"{self.name}: axis name {BATCH_AXIS!r} is the batch axis the server adds; leave it out of axes"
                )
        if self.fill == "lengths" and self.axes:
            raise ConfigError(f"{self.name}: fill 'lengths' makes one length per sequence; give it axes []")
        if self.fill is not None and not self.batched:
            raise ConfigError(f"{self.name}: a filled tensor is one per sequence; it must be batched")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "axes": list(self.axes),
            "batched": self.batched,
            "pad": self.pad,
            "fill": self.fill,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(
            name=str(d["name"]),
            dtype=str(d.get("dtype", "float32")),
            axes=tuple(d.get("axes", ())),
            batched=bool(d.get("batched", True)),
            pad=float(d.get("pad", 0.0)),
            fill=d.get("fill"),
        )


def round_up(n: int, step: int) -> int:
    """The smallest multiple of ``step`` at or above ``n``."""
    return -(-n // step) * step


def round_down(n: int, step: int) -> int:
    """The largest multiple of ``step`` at or below ``n``."""
    return n // step * step


@dataclass(frozen=True)
class Signature:
    """Inputs, output, bucketed axis, axis ranges and batching of a served model."""

    inputs: tuple[TensorSpec, ...]
    output: TensorSpec
    bucketed: str
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Per named axis [min, max]; required for every axis but the bucketed one, whose max is the
    largest bucket (a declared one is the most the model takes: the buckets must stay within)."""
    batching: Batching = "shape"
    steps: dict[str, int] = field(default_factory=dict)
    """Per named axis, the step its sizes must be a multiple of (default 1)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        names = [t.name for t in self.inputs]
        if len(set(names)) != len(names) or not names:
            raise ConfigError(f"inputs must be one or more distinct names, got {names}")
        if self.output.name in names:
            raise ConfigError(f"output name {self.output.name!r} is also an input's name; name the output otherwise")
        axes = self.axis_names()
        if self.bucketed not in axes:
            raise ConfigError(
                f"bucketed axis {self.bucketed!r} is no input's axis (the inputs have {sorted(axes) or 'none'}); "
                "name one of them"
            )
        for a in sorted(axes - {self.bucketed}):
            if a not in self.ranges:
                raise ConfigError(f"axis {a!r} has no range; give axis_ranges: {{{a}: [min, max]}}")
        for a, (lo, hi) in self.ranges.items():
            if a not in axes:
                raise ConfigError(f"axis_ranges names {a!r}, which no input has; axes: {sorted(axes)}")
            if not 1 <= lo <= hi:
                raise ConfigError(f"axis_ranges[{a!r}] = [{lo}, {hi}] must satisfy 1 <= min <= max")
        for a, step in self.steps.items():
            if a not in axes:
                raise ConfigError(f"axis_multiples names {a!r}, which no input has; axes: {sorted(axes)}")
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise ConfigError(f"axis_multiples[{a!r}] = {step!r} must be an integer >= 1")
            if a in self.ranges and round_up(self.ranges[a][0], step) > self.ranges[a][1]:
                lo, hi = self.ranges[a]
                raise ConfigError(f"axis {a!r}: no multiple of {step} lies in its range [{lo}, {hi}]; widen the range")
        if self.batching == "pad":
            if any(not t.batched for t in self.inputs):
                raise ConfigError(
                    "batching 'pad' needs every input batched (an unbatched input is shared by the batch); "
                    "use batching 'shape'"
                )
            if self.bucketed not in self.output.axes:
                raise ConfigError(
                    f"batching 'pad' cuts answers back along {self.bucketed!r}: list it in the output's axes "
                    f"(got {list(self.output.axes)})"
                )
        elif self.batching != "shape":
            raise ConfigError(f"batching must be 'pad' or 'shape', got {self.batching!r}")

    # ------------------------------------------------------------------ description
    def axis_names(self) -> set[str]:
        return {a for t in self.inputs for a in t.axes if isinstance(a, str)}

    @property
    def sent(self) -> tuple[TensorSpec, ...]:
        """The inputs a request carries (the filled ones are made by the server)."""
        return tuple(t for t in self.inputs if t.fill is None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "output": self.output.to_dict(),
            "bucketed": self.bucketed,
            "ranges": {a: list(r) for a, r in self.ranges.items()},
            "batching": self.batching,
            "steps": dict(self.steps),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            output=TensorSpec.from_dict(d["output"]),
            bucketed=str(d["bucketed"]),
            ranges={a: (int(r[0]), int(r[1])) for a, r in d.get("ranges", {}).items()},
            batching=d.get("batching", "shape"),
            steps={a: int(n) for a, n in d.get("steps", {}).items()},
        )

    def step(self, axis: str) -> int:
        """The step sizes of ``axis`` must be a multiple of (1 when none is declared)."""
        return self.steps.get(axis, 1)

    def axis_range(self, axis: str, buckets: Buckets) -> tuple[int, int]:
        """[min, max] of ``axis`` (the bucketed one: its declared min, the largest bucket)."""
        if axis == self.bucketed:
            return self.ranges.get(axis, (1, buckets.max_len))[0], buckets.max_len
        return self.ranges[axis]

    def accepted(self, axis: str, lo: int, hi: int) -> tuple[int, int] | None:
        """The smallest and largest sizes of ``axis`` within [lo, hi] that the model accepts
        (its own range and step), or None when there is none."""
        step = self.step(axis)
        if axis in self.ranges:
            lo, hi = max(lo, self.ranges[axis][0]), min(hi, self.ranges[axis][1])
        first, last = round_up(lo, step), round_down(hi, step)
        return (first, last) if first <= last else None

    def check_buckets(self, buckets: Buckets) -> None:
        """``ConfigError`` unless every bucket holds a size of the bucketed axis the model accepts."""
        a = self.bucketed
        if a in self.ranges and buckets.max_len > self.ranges[a][1]:
            raise ConfigError(
                f"the largest bucket ({buckets.max_len}) exceeds the most the model takes along {a!r} "
                f"({self.ranges[a][1]}); use bucket edges up to {self.ranges[a][1]}"
            )
        for i, edge in enumerate(buckets.edges):
            if self.accepted(a, buckets.lower(i), edge) is None:
                lo = self.ranges.get(a, (1, edge))[0]
                raise ConfigError(
                    f"bucket {edge} holds no size of axis {a!r} the model accepts (from {max(lo, buckets.lower(i))} to "
                    f"{edge}, a multiple of {self.step(a)}); choose bucket edges that are multiples of {self.step(a)}"
                )

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Per input, dim -> axis name of the batched tensor (``fa3trt.export_onnx``'s form)."""
        out: dict[str, dict[int, str]] = {}
        for t in self.inputs:
            off = 1 if t.batched else 0
            d = {i + off: a for i, a in enumerate(t.axes) if isinstance(a, str)}
            if t.batched:
                d = {0: BATCH_AXIS, **d}
            out[t.name] = d
        return out

    def samples(
        self, sizes: Mapping[str, int], batch: int = 1, seed: int = 0, lengths: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Random batched inputs with the named axes at ``sizes`` (warmup, export and checks):
        floats normal, integers 1 (a valid id in any vocabulary, and a full mask). Filled inputs
        come from ``lengths`` (one per sequence along the bucketed axis, as the server makes
        them: padded masks), by default every sequence at the bucketed axis's size (masks full)."""
        full = sizes[self.bucketed]
        lens = [full] * batch if lengths is None else [int(n) for n in lengths]
        if len(lens) != batch or not all(1 <= n <= full for n in lens):
            raise ConfigError(
                f"samples: lengths {list(lens)} must be {batch} values (one per sequence) in [1, {full}] "
                f"(the size of the bucketed axis {self.bucketed!r})"
            )
        g = torch.Generator().manual_seed(seed)
        out: dict[str, torch.Tensor] = {}
        for t in self.inputs:
            shape = [sizes[a] if isinstance(a, str) else a for a in t.axes]
            if t.batched:
                shape = [batch, *shape]
            if t.fill == "lengths":
                out[t.name] = torch.tensor(lens, dtype=t.torch_dtype)
            elif t.fill == "mask" and lengths is not None:
                if self.bucketed not in t.axes:
                    raise ConfigError(f"{t.name}: a mask is made along the bucketed axis {self.bucketed!r}; list it")
                keep = torch.arange(full)[None, :] < torch.tensor(lens)[:, None]
                view = [batch] + [full if a == self.bucketed else 1 for a in t.axes]
                out[t.name] = keep.view(view).expand(shape).to(t.torch_dtype).contiguous()
            elif t.fill == "mask" or t.torch_dtype == torch.bool:
                out[t.name] = torch.ones(shape, dtype=t.torch_dtype)
            elif t.torch_dtype.is_floating_point:
                out[t.name] = torch.randn(shape, generator=g).to(t.torch_dtype)
            else:
                out[t.name] = torch.ones(shape, dtype=t.torch_dtype)
        return out

    def sample_request(
        self, length: int, seed: int = 0, other: int | Mapping[str, int] | None = None
    ) -> dict[str, np.ndarray]:
        """Random inputs of one request as a client sends them (no batch axis, bfloat16 as
        float32): the bucketed axis at ``length``, every other named axis at ``other`` (one size
        for all, or a size per axis; default and for an axis not named, its smallest accepted size)."""
        if isinstance(other, int):
            sizes = {a: other for a in self.ranges}
        else:
            sizes = {**self.smallest_sizes(), **(other or {})}
        batch = self.samples(sizes | {self.bucketed: length}, 1, seed)
        out = {}
        for t in self.sent:
            v = batch[t.name][0] if t.batched else batch[t.name]
            out[t.name] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        return out

    def sample_sizes(self, buckets: Buckets, length: int | None = None) -> dict[str, int]:
        """Every named axis at its largest accepted size (the bucketed one at the largest it
        accepts up to ``length``, default the largest bucket's edge)."""
        sizes = {}
        for a in self.axis_names():
            hi = (buckets.max_len if length is None else length) if a == self.bucketed else self.ranges[a][1]
            got = self.accepted(a, 1, hi)
            if got is None:
                raise ConfigError(f"axis {a!r} takes no size up to {hi} (min and step); raise the size")
            sizes[a] = got[1]
        return sizes

    def smallest_sizes(self) -> dict[str, int]:
        """Every named axis at its smallest accepted size: the health check's request."""
        return {a: round_up(self.ranges.get(a, (1, 1))[0], self.step(a)) for a in self.axis_names()}
