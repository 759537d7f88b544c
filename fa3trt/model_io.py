"""How export and its check call a model: named inputs in, one named output out.

Contract:
- ``NamedCall(model, names, output)`` is an ``nn.Module`` taking the inputs positionally in the
  order of ``names`` and calling ``model(**dict(zip(names, args)))``; it returns the one tensor
  that ``output`` selects (``select_output``). Positional, because ``torch.export`` matches
  ``dynamic_shapes`` against a ``*args`` tuple reliably and against a ``**kwargs`` dict not.
- ``select_output(out, output)``: a tensor as is (``output`` 0); a mapping (dict, diffusers' and
  transformers' ``ModelOutput``) by key or by position among its values; a tuple or list by
  position; any other object by attribute name (``.sample``). Anything else is an ``ExportError``.
- ``reference_inputs(model, batch, seq)`` gives the reference ``Transformer``'s sample inputs
  ``x`` (B, S, hidden) and ``seq_lens`` (B,) and their named dynamic axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from fa3trt.errors import ExportError
from fa3trt.model import ModelConfig, Transformer
from fa3trt.signature import Signature, TensorSpec

__all__ = ["NamedCall", "select_output", "reference_inputs", "reference_signature", "REFERENCE_AXES"]

REFERENCE_AXES: dict[str, dict[int, str]] = {"x": {0: "B", 1: "S"}, "seq_lens": {0: "B"}}
"""The reference model's dynamic axes: batch ``B`` and sequence ``S``."""


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

    def __init__(self, model: nn.Module, names: Sequence[str], output: str | int = 0) -> None:
        super().__init__()
        self.model = model
        self.names = tuple(names)
        self.output = output

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return select_output(self.model(**dict(zip(self.names, args))), self.output)


def reference_inputs(model: Transformer, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Sample inputs of the reference model on the CPU, in its dtype (sizes >= 2: see export_onnx)."""
    cfg = model.cfg
    x = torch.randn(batch, seq, cfg.hidden, dtype=cfg.torch_dtype)
    return {"x": x, "seq_lens": torch.full((batch,), seq, dtype=torch.int32)}


def reference_signature(cfg: ModelConfig) -> Signature:
    """The reference model as a served signature: ``x`` (S, hidden) in, ``y`` (S, hidden) out,
    ``seq_lens`` made by the server, requests of different lengths padded into one batch."""
    x = TensorSpec("x", cfg.dtype, ("S", cfg.hidden))
    lens = TensorSpec("seq_lens", "int32", (), fill="lengths")
    return Signature((x, lens), TensorSpec("y", cfg.dtype, ("S", cfg.hidden)), "S", {}, "pad")
