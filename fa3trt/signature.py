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
  range of every other named axis, and how requests of different sizes share a batch:
  ``"pad"`` pads every tensor with the bucketed axis to the batch's longest (with ``pad``) and
  cuts each answer back to its own length: exact only when every cross-token op of the model is
  attention that reads the lengths (the reference model; an encoder with a padding mask);
  ``"shape"`` batches only requests of equal shapes (``group_key``).
- ``check(request, buckets)`` validates one request (a mapping of name -> array) before it joins
  a batch: missing or extra names, rank, fixed sizes, named axes out of range or disagreeing
  between tensors, dtypes that cannot be converted without loss. Every error is an
  ``InvalidInputError`` naming the input. ``assemble`` and ``split`` make a batch and cut its
  output back into answers.
- ``to_dict``/``from_dict`` round-trip it (engine metadata, ``/v1/info``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, InvalidInputError

__all__ = ["TensorSpec", "Signature", "Checked", "TORCH_DTYPES", "BATCH_AXIS", "Batching", "Fill"]

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

_FLOAT_IN = (np.float16, np.float32, np.float64)
_INT_IN = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32)


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


@dataclass(frozen=True)
class Checked:
    """One validated request: its tensors in their declared dtypes, bucket and length."""

    tensors: dict[str, np.ndarray]
    bucket: int
    length: int
    """Its size along the bucketed axis."""


@dataclass(frozen=True)
class Signature:
    """Inputs, output, bucketed axis, axis ranges and batching of a served model."""

    inputs: tuple[TensorSpec, ...]
    output: TensorSpec
    bucketed: str
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    batching: Batching = "shape"

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
            if a == self.bucketed:
                raise ConfigError(
                    f"axis {a!r} is bucketed: its range comes from the buckets; remove it from axis_ranges"
                )
            if a not in axes:
                raise ConfigError(f"axis_ranges names {a!r}, which no input has; axes: {sorted(axes)}")
            if not 1 <= lo <= hi:
                raise ConfigError(f"axis_ranges[{a!r}] = [{lo}, {hi}] must satisfy 1 <= min <= max")
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
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            output=TensorSpec.from_dict(d["output"]),
            bucketed=str(d["bucketed"]),
            ranges={a: (int(r[0]), int(r[1])) for a, r in d.get("ranges", {}).items()},
            batching=d.get("batching", "shape"),
        )

    def axis_range(self, axis: str, buckets: Buckets) -> tuple[int, int]:
        return (1, buckets.max_len) if axis == self.bucketed else self.ranges[axis]

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

    # ------------------------------------------------------------------ requests
    def check(self, request: Any, buckets: Buckets, convert: bool = True) -> Checked:
        """Validate one request (see the module docstring); its tensors in the declared dtypes.

        ``convert=False``: a float tensor keeps its own float dtype, for a caller that converts
        when it batches (the reference model's batch is assembled from the requests' dtype, so
        a float16 request is never widened on the host first)."""
        if not isinstance(request, Mapping):
            names = [t.name for t in self.sent]
            raise InvalidInputError(
                f"a request is a mapping of input name -> array with the inputs {names}, got {type(request).__name__}"
            )
        want = {t.name for t in self.sent}
        missing = sorted(want - set(request))
        extra = sorted(set(request) - want)
        if missing or extra:
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise InvalidInputError(f"inputs {', '.join(parts)}: this model takes exactly {sorted(want)}")
        sizes: dict[str, tuple[int, str]] = {}
        out: dict[str, np.ndarray] = {}
        for t in self.sent:
            arr = _as_array(request[t.name], t, convert)
            if arr.ndim != len(t.axes):
                raise InvalidInputError(
                    f"input {t.name!r} has shape {arr.shape} (rank {arr.ndim}); it must have rank {len(t.axes)}: "
                    f"axes {list(t.axes)}, without the batch axis"
                )
            for dim, (a, n) in enumerate(zip(t.axes, arr.shape)):
                if isinstance(a, int):
                    if n != a:
                        raise InvalidInputError(f"input {t.name!r} has size {n} on axis {dim}; it must be {a}")
                    continue
                seen = sizes.get(a)
                if seen is not None and seen[0] != n:
                    raise InvalidInputError(
                        f"input {t.name!r} has {a}={n} on axis {dim}, but {seen[1]!r} has {a}={seen[0]}; "
                        f"every input's axis {a!r} must have the same size"
                    )
                sizes[a] = (n, t.name)
            out[t.name] = arr
        for a, (n, name) in sizes.items():
            if a == self.bucketed:
                continue
            lo, hi = self.ranges[a]
            if not lo <= n <= hi:
                raise InvalidInputError(f"input {name!r} has axis {a}={n}, outside this model's range [{lo}, {hi}]")
        length = sizes[self.bucketed][0]
        try:
            bucket = buckets.index(length)
        except InvalidInputError as e:
            raise InvalidInputError(f"input {sizes[self.bucketed][1]!r}, axis {self.bucketed}: {e}") from None
        return Checked(out, bucket, length)

    def group_key(self, req: Checked) -> tuple[Any, ...]:
        """Requests with equal keys may share a batch (``"shape"``: equal shapes, equal unbatched tensors)."""
        if self.batching == "pad":
            return ()
        return tuple(
            (t.name, req.tensors[t.name].shape, None if t.batched else req.tensors[t.name].tobytes()) for t in self.sent
        )

    def assemble(self, reqs: Sequence[Checked], device: torch.device) -> dict[str, torch.Tensor]:
        """The batch of ``reqs`` (one group: see ``group_key``) as the model's keyword inputs.

        Every tensor in its declared dtype."""
        longest = max(r.length for r in reqs)
        lens = torch.tensor([r.length for r in reqs], dtype=torch.int32)
        batch: dict[str, torch.Tensor] = {}
        for t in self.inputs:
            dtype = t.torch_dtype
            if t.fill == "lengths":
                batch[t.name] = lens.to(device)
                continue
            if t.fill == "mask":
                if any(isinstance(a, str) and a != self.bucketed for a in t.axes):
                    raise ConfigError(f"{t.name}: a mask may have only the bucketed axis and fixed sizes")
                shape = [longest if a == self.bucketed else int(a) for a in t.axes]
                m = torch.arange(longest)[None, :] < lens[:, None]
                view = [len(reqs)] + [longest if a == self.bucketed else 1 for a in t.axes]
                batch[t.name] = m.view(view).expand(len(reqs), *shape).to(device, dtype)
                continue
            # (np.ascontiguousarray would make a 0-d array 1-d.)
            arrays = [torch.from_numpy(np.require(r.tensors[t.name], requirements="C")) for r in reqs]
            if not t.batched:
                batch[t.name] = arrays[0].to(device, dtype)
                continue
            if self.batching == "pad" and self.bucketed in t.axes:
                dim = t.axes.index(self.bucketed)
                padded = list(arrays[0].shape)
                padded[dim] = longest
                out = torch.full((len(arrays), *padded), t.pad, dtype=arrays[0].dtype)
                for i, a in enumerate(arrays):
                    out[i].narrow(dim, 0, a.shape[dim]).copy_(a)
                batch[t.name] = out.to(device, dtype)
            else:
                batch[t.name] = torch.stack(arrays).to(device, dtype)
        return batch

    def split(self, y: torch.Tensor, reqs: Sequence[Checked]) -> list[np.ndarray]:
        """The batch output ``y`` (on the CPU) cut into each request's answer, in the output dtype
        (bfloat16 goes out as float32: NumPy has no bfloat16)."""
        if y.shape[0] != len(reqs):
            raise InvalidInputError(f"the model returned {y.shape[0]} rows for a batch of {len(reqs)}")
        dtype = self.output.torch_dtype
        y = y.to(torch.float32 if dtype == torch.bfloat16 else dtype)
        cut = self.batching == "pad" and self.bucketed in self.output.axes
        dim = self.output.axes.index(self.bucketed) if cut else 0
        return [(y[i].narrow(dim, 0, r.length) if cut else y[i]).numpy() for i, r in enumerate(reqs)]

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

    def sample_request(self, length: int, seed: int = 0, other: int | None = None) -> dict[str, np.ndarray]:
        """Random inputs of one request as a client sends them (no batch axis, bfloat16 as
        float32): the bucketed axis at ``length``, every other named axis at ``other`` (default
        its range's min)."""
        sizes = {a: lo if other is None else other for a, (lo, _) in self.ranges.items()} | {self.bucketed: length}
        batch = self.samples(sizes, 1, seed)
        out = {}
        for t in self.sent:
            v = batch[t.name][0] if t.batched else batch[t.name]
            out[t.name] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
        return out

    def sample_sizes(self, buckets: Buckets, length: int | None = None) -> dict[str, int]:
        """Every named axis at its range's max (the bucketed one at ``length``, default the
        largest bucket's edge)."""
        sizes = {a: hi for a, (_, hi) in self.ranges.items()}
        sizes[self.bucketed] = buckets.max_len if length is None else length
        return sizes


def _as_array(value: Any, t: TensorSpec, convert: bool = True) -> np.ndarray:
    """``value`` as an array of ``t``'s dtype (bfloat16 as float32: NumPy has none), or an
    error naming the input when the conversion would change values. ``convert=False`` leaves
    a float array of a float input in its own dtype."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise InvalidInputError(f"input {t.name!r} is on {value.device}; send a CPU tensor or a NumPy array")
        value = value.detach()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    if isinstance(value, (list, np.generic, int, float, bool)):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise InvalidInputError(f"input {t.name!r} must be an array, got {type(value).__name__}")
    kind = value.dtype.type
    if t.torch_dtype.is_floating_point:
        if kind not in _FLOAT_IN and kind not in _INT_IN:
            raise InvalidInputError(f"input {t.name!r} has dtype {value.dtype}; send a float array ({t.dtype})")
        if not convert and kind in _FLOAT_IN:
            return value
        return value.astype(np.float32 if t.dtype == "bfloat16" else t.dtype, copy=False)
    if t.dtype == "bool":
        if kind is np.bool_:
            return value
        if kind in _INT_IN and value.size and not np.isin(value, (0, 1)).all():
            raise InvalidInputError(f"input {t.name!r} is a mask: send booleans or 0/1 integers")
        if kind not in _INT_IN:
            raise InvalidInputError(f"input {t.name!r} has dtype {value.dtype}; send booleans or 0/1 integers")
        return value.astype(np.bool_)
    if kind is np.bool_ or kind in _INT_IN:
        info = np.iinfo(t.dtype)
        if value.size and (int(value.min()) < info.min or int(value.max()) > info.max):
            raise InvalidInputError(f"input {t.name!r} holds values outside {t.dtype}")
        return value.astype(t.dtype, copy=False)
    if kind in _FLOAT_IN and value.size and np.array_equal(value, np.round(value)) and np.isfinite(value).all():
        return value.astype(t.dtype)  # JSON numbers of an integer input (2.0 -> 2)
    raise InvalidInputError(f"input {t.name!r} has dtype {value.dtype}; send integers ({t.dtype})")
