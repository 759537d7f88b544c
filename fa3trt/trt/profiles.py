"""Optimization profiles and IO checks of an engine built from a ``Signature``: plain functions.

Contract:
- ``profiles(signature, buckets, batch_limits)`` is one profile per bucket: per input a
  (min, opt, max) shape. The batch axis runs 1..limit (opt = limit), the bucketed axis over the
  sizes of the bucket the model accepts (``buckets.lower(i)``..edge, within its declared min and
  step; opt = the largest), every other named axis over the sizes it accepts (opt = the
  largest), fixed sizes as they are; an unbatched input has no batch axis, ``fill:
  lengths`` is (B,), ``fill: mask`` is shaped by its axes like any input. Opt is the full batch
  at its largest: under load, batches fill to their limit, where throughput is decided.
- ``select_profile(profiles, shapes)`` is the first profile holding every input's shape,
  else an ``InvalidInputError`` naming the input and axis that no profile holds.
- Engine dtypes: an ``int64`` input enters the engine as ``int32`` (``ENGINE_DTYPES``; why:
  ``fa3trt.onnx.calls.NamedCall``); floating inputs take the exported model's float dtype.
  ``dtype_fits(declared, engine)`` says whether a tensor of the signature's dtype may be bound
  to an engine tensor of that dtype (after the runtime's cast).
- ``io_differences(signature, io)``: what an engine's (or ONNX file's) inputs and output lack
  or have otherwise than the signature, one line each, naming the tensor.
- ``signature_differences(stored, expected)``: how an engine's signature differs from the one
  a server expects, where it matters to the engine (names, dtypes, axes, ranges, bucketed axis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.onnx.graph import IOSpec
from fa3trt.signature import BATCH_AXIS, Signature, TensorSpec

__all__ = [
    "Profile",
    "profiles",
    "batch_limits",
    "select_profile",
    "ENGINE_DTYPES",
    "engine_dtype",
    "dtype_fits",
    "io_differences",
    "signature_differences",
    "engine_signature",
    "IOSpec",
]

Shape = tuple[int, ...]

ENGINE_DTYPES: dict[str, str] = {"int64": "int32"}
"""Declared dtype -> the dtype the engine takes it in (others unchanged)."""
_FLOATS = ("float32", "float16", "bfloat16")


def engine_dtype(dtype: str) -> str:
    """The dtype an input declared as ``dtype`` has in the exported graph and the engine."""
    return ENGINE_DTYPES.get(dtype, dtype)


def dtype_fits(declared: str, engine: str) -> bool:
    """A tensor declared ``declared`` can be bound to an engine tensor of dtype ``engine``."""
    if declared in _FLOATS:
        return engine in _FLOATS
    return engine in (declared, engine_dtype(declared))


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per input its (min, opt, max) shape."""

    index: int
    bucket_edge: int
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def admits(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        for name, (lo, _, hi) in self.shapes.items():
            got = tuple(shapes[name])
            if len(got) != len(lo) or any(not a <= n <= b for a, n, b in zip(lo, got, hi)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.index,
            "bucket_edge": self.bucket_edge,
            "shapes": {n: [list(s) for s in mom] for n, mom in self.shapes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Profile:
        shapes = {
            str(n): (tuple(map(int, m[0])), tuple(map(int, m[1])), tuple(map(int, m[2])))
            for n, m in d["shapes"].items()
        }
        return cls(int(d["profile"]), int(d["bucket_edge"]), shapes)


def batch_limits(buckets: Buckets, max_batch_tokens: int) -> list[int]:
    """Each bucket's largest batch under a token budget (``Buckets.batch_limit``)."""
    if not isinstance(max_batch_tokens, int) or max_batch_tokens < 1:
        raise ConfigError(f"max_batch_tokens must be an integer >= 1, got {max_batch_tokens!r}")
    return [buckets.batch_limit(i, max_batch_tokens) for i in range(len(buckets.edges))]


def _axis_box(t: TensorSpec, signature: Signature, lower: int, edge: int) -> tuple[Shape, Shape, Shape]:
    lo: list[int] = []
    opt: list[int] = []
    hi: list[int] = []
    for a in t.axes:
        if isinstance(a, int):
            box = (a, a, a)
        else:
            span = (lower, edge) if a == signature.bucketed else signature.ranges[a]
            accepted = signature.accepted(a, *span)
            if accepted is None:
                raise ConfigError(
                    f"axis {a!r} accepts no size in [{span[0]}, {span[1]}]; check its range, step and the buckets"
                )
            box = (accepted[0], accepted[1], accepted[1])
        lo.append(box[0])
        opt.append(box[1])
        hi.append(box[2])
    return tuple(lo), tuple(opt), tuple(hi)


def profiles(signature: Signature, buckets: Buckets, limits: Sequence[int]) -> list[Profile]:
    """One profile per bucket (see the module docstring); ``limits``: each bucket's largest batch."""
    if len(limits) != len(buckets.edges):
        raise ConfigError(
            f"batch limits {list(limits)} must give one limit per bucket {list(buckets.edges)}; "
            "use fa3trt.trt.profiles.batch_limits(buckets, max_batch_tokens)"
        )
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in limits):
        raise ConfigError(f"batch limits must be integers >= 1, got {list(limits)}")
    out = []
    for i, (edge, limit) in enumerate(zip(buckets.edges, limits)):
        shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
        for t in signature.inputs:
            lo, opt, hi = _axis_box(t, signature, buckets.lower(i), edge)
            if t.batched:
                lo, opt, hi = (1, *lo), (limit, *opt), (limit, *hi)
            shapes[t.name] = (lo, opt, hi)
        out.append(Profile(i, edge, shapes))
    return out


def _axis_label(t: TensorSpec, dim: int) -> str:
    axes: list[str | int] = [BATCH_AXIS, *t.axes] if t.batched else list(t.axes)
    return str(axes[dim]) if dim < len(axes) else "?"


def select_profile(
    candidates: Sequence[Profile], shapes: Mapping[str, Sequence[int]], signature: Signature | None = None
) -> int:
    """Index of the first profile holding every input's shape; else ``InvalidInputError`` naming
    the input and axis outside every profile, or the batch limits."""
    if not candidates:
        raise ConfigError("the engine has no optimization profiles; rebuild it")
    for p in candidates:
        missing = sorted(set(p.shapes) - set(shapes))
        if missing:
            raise InvalidInputError(f"the batch lacks inputs {missing}; the engine takes {sorted(p.shapes)}")
        if p.admits(shapes):
            return p.index
    specs = {t.name: t for t in signature.inputs} if signature is not None else {}
    for name in candidates[0].shapes:
        got = tuple(shapes[name])
        rank = len(candidates[0].shapes[name][0])
        if len(got) != rank:
            raise InvalidInputError(f"input {name!r} has shape {got} (rank {len(got)}); the engine takes rank {rank}")
        for dim, n in enumerate(got):
            lo = min(p.shapes[name][0][dim] for p in candidates)
            hi = max(p.shapes[name][2][dim] for p in candidates)
            if not lo <= n <= hi:
                axis = _axis_label(specs[name], dim) if name in specs else f"dim {dim}"
                raise InvalidInputError(
                    f"input {name!r} has {axis}={n} (axis {dim}), outside the engine's range [{lo}, {hi}]; "
                    "send sizes within it, or rebuild the engine with wider buckets or axis_ranges"
                )
    limits = ", ".join(f"bucket {p.bucket_edge}: " + _limits_text(p) for p in candidates)
    raise InvalidInputError(
        f"a batch of shapes {dict((n, tuple(s)) for n, s in shapes.items())} fits no optimization profile "
        f"({limits}); split the batch, or raise max_batch_tokens and rebuild the engine"
    )


def _limits_text(p: Profile) -> str:
    return "; ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.shapes.items())


def io_differences(signature: Signature, io: Mapping[str, IOSpec]) -> list[str]:
    """What ``io`` (an engine's or an ONNX graph's tensors) lacks or has otherwise than ``signature``."""
    problems: list[str] = []
    want_in = {t.name: t for t in signature.inputs}
    got_in = {n: s for n, s in io.items() if s[2]}
    got_out = [n for n, s in io.items() if not s[2]]
    for name in sorted(set(want_in) - set(got_in)):
        problems.append(f"input {name!r} is declared but the graph has no such input (it has {sorted(got_in)})")
    for name in sorted(set(got_in) - set(want_in)):
        problems.append(f"graph input {name!r} is not declared in the signature (inputs {sorted(want_in)})")
    for name in sorted(set(want_in) & set(got_in)):
        t, (dtype, rank, _) = want_in[name], got_in[name]
        want_rank = len(t.axes) + (1 if t.batched else 0)
        if rank != want_rank:
            problems.append(
                f"input {name!r} has rank {rank} in the graph; the signature gives rank {want_rank} "
                f"(axes {list(t.axes)}{' after the batch axis' if t.batched else ''})"
            )
        if not dtype_fits(t.dtype, dtype):
            problems.append(
                f"input {name!r} is {dtype} in the graph; declared {t.dtype} (the graph must take "
                f"{engine_dtype(t.dtype) if t.dtype not in _FLOATS else 'a float dtype'})"
            )
    out = signature.output
    if got_out != [out.name]:
        problems.append(f"the graph's outputs are {got_out}; the signature's output is {out.name!r}")
    elif not dtype_fits(out.dtype, io[out.name][0]):
        problems.append(f"output {out.name!r} is {io[out.name][0]} in the graph; declared {out.dtype}")
    elif io[out.name][1] != len(out.axes) + 1:
        problems.append(
            f"output {out.name!r} has rank {io[out.name][1]} in the graph; the signature gives "
            f"{len(out.axes) + 1} (the batch axis and {list(out.axes)})"
        )
    return problems


def engine_signature(signature: Signature) -> dict[str, Any]:
    """The parts of a signature that shape an engine (not ``batching`` nor ``pad``): what its key hashes."""
    d = signature.to_dict()
    d.pop("batching")
    for t in (*d["inputs"], d["output"]):
        t.pop("pad")
    return d


def signature_differences(stored: Signature, expected: Signature) -> list[str]:
    """How an engine's signature ``stored`` differs from ``expected`` where the engine cares."""
    problems: list[str] = []
    a, b = engine_signature(stored), engine_signature(expected)
    got = {t["name"]: t for t in a["inputs"]}
    want = {t["name"]: t for t in b["inputs"]}
    if sorted(got) != sorted(want):
        problems.append(f"inputs: the engine takes {sorted(got)}, the server sends {sorted(want)}")
    for name in sorted(set(got) & set(want)):
        for key in ("dtype", "axes", "batched", "fill"):
            if got[name][key] != want[name][key]:
                problems.append(f"input {name!r}: {key} {got[name][key]!r} in the engine, {want[name][key]!r} expected")
    for key in ("name", "dtype", "axes"):
        if a["output"][key] != b["output"][key]:
            problems.append(f"output: {key} {a['output'][key]!r} in the engine, {b['output'][key]!r} expected")
    if a["bucketed"] != b["bucketed"]:
        problems.append(f"bucketed axis: {a['bucketed']!r} in the engine, {b['bucketed']!r} expected")
    for axis, (lo, hi) in sorted(b["ranges"].items()):
        have = a["ranges"].get(axis)
        if have is None or not (have[0] <= lo and hi <= have[1]):
            problems.append(f"axis {axis}: the engine takes {have or 'no range'}, the server admits [{lo}, {hi}]")
    return problems
