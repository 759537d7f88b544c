"""One request checked against a model's ``Signature`` before it joins a batch.

Contract: ``check_request(signature, request, buckets)`` takes a mapping of input name -> array
(no batch axis; NumPy arrays, lists or CPU torch tensors) and returns a ``Checked``: missing or
extra names, rank, fixed sizes, named axes out of range, off their step or disagreeing between
tensors, and dtypes that cannot be converted without loss are each an ``InvalidInputError``
naming the input and the axis. Float arrays keep their own float dtype (the batch converts them
on the device: ``fa3trt.serving.batch``); integers and masks come in their declared dtype here.
NaN and Inf are looked for later, on the device, in the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import InvalidInputError
from fa3trt.signature import Signature, TensorSpec, round_down, round_up

__all__ = ["Checked", "check_request"]

_FLOAT_IN = (np.float16, np.float32, np.float64)
_INT_IN = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32)


@dataclass(frozen=True)
class Checked:
    """One validated request: its tensors (floats in their own float dtype, the rest in their
    declared dtypes), its bucket and its length along the bucketed axis."""

    tensors: dict[str, np.ndarray]
    bucket: int
    length: int
    """Its size along the bucketed axis."""
    answer_dtype: np.dtype | None = None
    """The dtype its answer goes back in; None: the output's declared dtype (bfloat16 as float32)."""


def check_request(
    signature: Signature, request: Any, buckets: Buckets, answer_dtype: np.dtype | None = None
) -> Checked:
    """Validate one request (see the module docstring); floats keep their own float dtype,
    the other tensors come in their declared dtypes. ``answer_dtype``: the dtype its answer
    goes back in (None: the output's)."""
    if not isinstance(request, Mapping):
        names = [t.name for t in signature.sent]
        raise InvalidInputError(
            f"a request is a mapping of input name -> array with the inputs {names}, got {type(request).__name__}"
        )
    want = {t.name for t in signature.sent}
    missing = sorted(want - set(request))
    extra = sorted(set(request) - want)
    if missing or extra:
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise InvalidInputError(f"inputs {', '.join(parts)}: this model takes exactly {sorted(want)}")
    sizes: dict[str, tuple[int, str]] = {}
    out: dict[str, np.ndarray] = {}
    for t in signature.sent:
        arr = _as_array(request[t.name], t)
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
        if a == signature.bucketed:  # its max is the largest bucket's (below)
            lo = signature.ranges.get(a, (1, n))[0]
            if n < lo:
                raise InvalidInputError(f"input {name!r} has axis {a}={n}; this model takes at least {lo} along {a}")
        else:
            lo, hi = signature.ranges[a]
            if not lo <= n <= hi:
                raise InvalidInputError(f"input {name!r} has axis {a}={n}, outside this model's range [{lo}, {hi}]")
        if n % signature.step(a):
            near = sorted({max(signature.step(a), round_down(n, signature.step(a))), round_up(n, signature.step(a))})
            raise InvalidInputError(
                f"input {name!r} has axis {a}={n}, which is not a multiple of {signature.step(a)} (this model's "
                f"step along {a}, e.g. its patch size); send {' or '.join(map(str, near))}"
            )
    length = sizes[signature.bucketed][0]
    try:
        bucket = buckets.index(length)
    except InvalidInputError as e:
        raise InvalidInputError(f"input {sizes[signature.bucketed][1]!r}, axis {signature.bucketed}: {e}") from None
    return Checked(out, bucket, length, answer_dtype)


def _as_array(value: Any, t: TensorSpec) -> np.ndarray:
    """``value`` as an array fit for ``t``: a float input's float array in its own dtype (the
    batch converts it on the device), integers of a float input as float32, other inputs in
    their declared dtype; an error naming the input when the conversion would change values."""
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
        return value if kind in _FLOAT_IN else value.astype(np.float32)
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
