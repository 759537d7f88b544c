"""The plugin's fields and its build-time decisions, as plain functions over plain values.

Contract:
- ``FIELD_NAMES``: what the ONNX node carries and an engine serializes (``mode``, int32: 0
  attention in the input dtype, 1 FP8). ``parse_fields`` / ``serialize_fields`` are inverses.
- ``format_supported`` is ``supports_format_combination`` over TensorRT ``DataType`` names;
  ``output_shape`` checks q, k, v's own dims and gives the output's.
No TensorRT here: the IPluginV3 classes (``fa3trt.plugin.registry``) call these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.op import MODE_FP8, MODE_NATIVE, PLUGIN_NAME

__all__ = [
    "FIELD_NAMES",
    "TORCH_BY_TRT_NAME",
    "Shape",
    "parse_fields",
    "serialize_fields",
    "format_supported",
    "output_shape",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

FIELD_NAMES = ("mode",)
"""The plugin's fields: what the ONNX node carries and what an engine serializes."""

# Attributes the ONNX parser consumes to find the creator; they may also reach create_plugin.
_LOOKUP_ATTRS = ("plugin_version", "plugin_namespace")


def parse_fields(fields: Iterable[tuple[str, Any]]) -> dict[str, int]:
    """Plugin fields from (name, data) pairs, as TensorRT passes them to ``create_plugin``.

    ``data`` is an array-like with one integer. Missing ``mode`` means 0, like the op's default.
    """
    parsed = {"mode": MODE_NATIVE}
    for name, data in fields:
        if name == "mode":
            arr = np.asarray(data).reshape(-1)
            if arr.size != 1:
                raise ConfigError(f"{PLUGIN_NAME} field 'mode' must hold one int32, got {arr.tolist()!r}")
            mode = int(arr[0])
            if mode not in (MODE_NATIVE, MODE_FP8):
                raise ConfigError(
                    f"{PLUGIN_NAME} field mode={mode}; use 0 (input dtype) or 1 (FP8): re-export the model "
                    "with ModelConfig.attn_mode set to 0 or 1"
                )
            parsed["mode"] = mode
        elif name in _LOOKUP_ATTRS:
            continue
        else:
            # A newer exporter may add fields; ignoring them keeps old engines loadable, and
            # the warning makes a misspelled field visible.
            log.warning("%s: ignoring unknown field %r (known: %s)", PLUGIN_NAME, name, FIELD_NAMES)
    return parsed


def serialize_fields(mode: int) -> list[tuple[str, np.ndarray]]:
    """What ``get_fields_to_serialize`` writes into an engine: the inverse of ``parse_fields``."""
    return [("mode", np.array([int(mode)], dtype=np.int32))]


_FLOAT_TYPE_NAMES = ("HALF", "BF16", "FLOAT")
TORCH_BY_TRT_NAME = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


def format_supported(pos: int, type_names: Sequence[str], linear: bool, num_inputs: int = 4) -> bool:
    """``supports_format_combination`` as a plain function over TensorRT ``DataType`` names.

    Positions: 0..2 q, k, v (one float dtype, chosen by q), 3 seq_lens (INT32), 4 the output
    (q's dtype). ``type_names[:pos + 1]`` are the types of positions 0..pos; only linear
    (dense row-major) layouts, because the kernels take contiguous (B, S, H, D) memory.
    """
    if not linear or num_inputs != 4 or not 0 <= pos <= 4 or len(type_names) <= pos:
        return False
    t = type_names[pos]
    if pos == 0:
        return t in _FLOAT_TYPE_NAMES
    if pos == 3:
        return t == "INT32"
    return t == type_names[0]


def output_shape(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> Shape:
    """The output's shape, (B, S, H) from q and head_dim from V's own dims; checks the inputs.

    The seed read V's shape from Q's dims: here each shape comes from its own descriptor, and
    any disagreement is an error instead of an out-of-bounds read.
    """
    for name, shp in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shp) != 4:
            raise InvalidInputError(f"{PLUGIN_NAME}: {name} must be 4-D (B, S, H, D), got shape {tuple(shp)}")
    if tuple(k_shape) != tuple(q_shape) or tuple(v_shape) != tuple(q_shape):
        raise InvalidInputError(
            f"{PLUGIN_NAME}: q, k, v must have one shape (B, S, H, D), got q {tuple(q_shape)}, "
            f"k {tuple(k_shape)}, v {tuple(v_shape)}; check the QKV split before the attention node"
        )
    return (q_shape[0], q_shape[1], q_shape[2], v_shape[3])
