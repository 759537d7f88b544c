"""How export and its check call a model: named inputs in, one named output out.

Contract:
- ``NamedCall(model, names, output, widen)`` is an ``nn.Module`` taking the inputs positionally
  in the order of ``names`` and calling ``model(**dict(zip(names, args)))``; it returns the one
  tensor that ``output`` selects (``select_output``). Positional, because ``torch.export``
  matches ``dynamic_shapes`` against a ``*args`` tuple reliably and against a ``**kwargs`` dict
  not. The inputs named in ``widen`` arrive as int32 and are cast to int64 inside the graph.
- 64-bit integer inputs (token ids, positions, masks) enter the exported graph, and so the
  engine, as int32 and are widened in the graph's first op. Why not TensorRT's own int64:
  TensorRT takes int64 I/O only from release 10, and not in every layer or plugin (the
  attention plugin's lengths are int32), while every TensorRT version binds int32; ids and
  masks fit int32 exactly (vocabularies are far below 2**31), which export checks on the
  samples and the runtime on every batch (an error naming the input, never a wrap-around);
  the model's own int64 arithmetic (embedding lookups, position ids) is traced unchanged; the
  engine's integer inputs are half the bytes.
- ``select_output(out, output)``: a tensor as is (``output`` 0); a mapping (dict, diffusers' and
  transformers' ``ModelOutput``) by key or by position among its values; a tuple or list by
  position; any other object by attribute name (``.sample``). Anything else is an ``ExportError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fa3trt.errors import ExportError

__all__ = ["NamedCall", "select_output", "narrow_int64"]


def select_output(out: Any, output: str | int = 0) -> torch.Tensor:
    """The tensor ``output`` names in a model's return value (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        if output not in (0, -1):
            raise ExportError(f"the model returns one tensor; output={output!r} selects nothing, use output=0")
        return out
    picked: Any
    try:
        if isinstance(out, Mapping):
            picked = out[output] if isinstance(output, str) else list(out.values())[output]
        elif isinstance(out, Sequence) and isinstance(output, int):
            picked = out[output]
        elif isinstance(output, str):
            picked = getattr(out, output)
        else:
            raise TypeError(type(out).__name__)
    except (KeyError, IndexError, AttributeError, TypeError) as e:
        keys = list(out.keys()) if isinstance(out, Mapping) else None
        has = f" (it has {keys})" if keys is not None else ""
        raise ExportError(
            f"output={output!r} selects nothing in the model's {type(out).__name__} output{has}; "
            "pass output= a key, an attribute name or a position of a tensor it returns"
        ) from e
    if not isinstance(picked, torch.Tensor):
        raise ExportError(
            f"output={output!r} selects a {type(picked).__name__}, not a tensor; pass output= naming a tensor"
        )
    return picked


class NamedCall(nn.Module):
    """``model`` called with keyword inputs given positionally, returning one selected tensor."""

    def __init__(
        self, model: nn.Module, names: Sequence[str], output: str | int = 0, widen: Sequence[str] = ()
    ) -> None:
        super().__init__()
        unknown = sorted(set(widen) - set(names))
        if unknown:
            raise ExportError(f"widen names {unknown}, which are not inputs {list(names)}; name int64 inputs only")
        self.model = model
        self.names = tuple(names)
        self.output = output
        self.widen = frozenset(widen)

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        kwargs = {n: a.to(torch.int64) if n in self.widen else a for n, a in zip(self.names, args)}
        return select_output(self.model(**kwargs), self.output)


def narrow_int64(inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``inputs`` with every int64 tensor as int32 (see the module docstring), and their names.

    A value outside int32 is an ``ExportError`` naming the input (it would not survive the cast)."""
    out: dict[str, torch.Tensor] = {}
    narrowed: list[str] = []
    info = torch.iinfo(torch.int32)
    for name, t in inputs.items():
        if t.dtype != torch.int64:
            out[name] = t
            continue
        if t.numel() and (int(t.min()) < info.min or int(t.max()) > info.max):
            raise ExportError(
                f"input {name!r} holds values outside int32 ({int(t.min())}..{int(t.max())}); 64-bit integer "
                "inputs enter the engine as int32: send ids within int32, or pass narrow_int64=False to export_onnx"
            )
        out[name] = t.to(torch.int32)
        narrowed.append(name)
    return out, narrowed
