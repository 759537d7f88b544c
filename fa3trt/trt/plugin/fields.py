"""The plugin's fields and its build-time decisions, as plain functions over plain values.

Contract:
- ``FIELD_NAMES``: what the ONNX node carries and an engine serializes (``mode``, int32: 0
  attention in the input dtype, 1 FP8; ``causal``, int32 0 or 1; ``softmax_scale``, float32).
  ``parse_fields`` / ``serialize_fields`` are inverses.
- ``format_supported`` is ``supports_format_combination`` over TensorRT ``DataType`` names;
  ``output_shape`` checks q, k, v's own dims and gives the output's.
No TensorRT here: the IPluginV3 classes (``fa3trt.trt.plugin.registry``) call these.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from fa3trt.attention.op import MODE_FP8, MODE_NATIVE, PLUGIN_NAME
from fa3trt.errors import ConfigError, InvalidInputError

__all__ = [
    "FIELD_NAMES",
    "NUM_INPUTS",
    "TORCH_BY_TRT_NAME",
    "Shape",
    "parse_fields",
    "serialize_fields",
    "format_supported",
    "output_shape",
]

log = logging.getLogger(__name__)

Shape = tuple[int, ...]

FIELD_NAMES = ("mode", "causal", "softmax_scale")
"""The plugin's fields: what the ONNX node carries and what an engine serializes."""

NUM_INPUTS = 5
"""q, k, v, seq_lens (query lengths), seq_lens_k (key lengths)."""

# Attributes the ONNX parser consumes to find the creator; they may also reach create_plugin.
_LOOKUP_ATTRS = ("plugin_version", "plugin_namespace")


def _one(name: str, data: Any) -> Any:
    arr = np.asarray(data).reshape(-1)
    if arr.size != 1:
        raise ConfigError(f"{PLUGIN_NAME} field {name!r} must hold one value, got {arr.tolist()!r}")
    return arr[0]


def parse_fields(fields: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Plugin fields from (name, data) pairs, as TensorRT passes them to ``create_plugin``.

    ``data`` is an array-like with one number. Missing ``mode`` and ``causal`` mean 0, like
    the op's defaults; ``softmax_scale`` has no default (the exporter always writes the value)
    and is None when missing, which the plugin reads as 1/sqrt(D).
    """
    parsed: dict[str, Any] = {"mode": MODE_NATIVE, "causal": False, "softmax_scale": None}
    for name, data in fields:
        if name == "mode":
            mode = int(_one(name, data))
            if mode not in (MODE_NATIVE, MODE_FP8):
                raise ConfigError(
                    f"{PLUGIN_NAME} field mode={mode}; use 0 (input dtype) or 1 (FP8): re-export the model "
                    "with ModelConfig.attn_mode set to 0 or 1"
                )
            parsed["mode"] = mode
        elif name == "causal":
            causal = int(_one(name, data))
            if causal not in (0, 1):
                raise ConfigError(f"{PLUGIN_NAME} field causal={causal}; use 0 or 1")
            parsed["causal"] = bool(causal)
        elif name == "softmax_scale":
            scale = float(_one(name, data))
            if not (scale > 0 and math.isfinite(scale)):
                raise ConfigError(f"{PLUGIN_NAME} field softmax_scale={scale}; it must be a finite number > 0")
            parsed["softmax_scale"] = scale
        elif name in _LOOKUP_ATTRS:
            continue
        else:
            # A newer exporter may add fields; ignoring them keeps old engines loadable, and
            # the warning makes a misspelled field visible.
            log.warning("%s: ignoring unknown field %r (known: %s)", PLUGIN_NAME, name, FIELD_NAMES)
    return parsed


def serialize_fields(mode: int, causal: bool, softmax_scale: float | None) -> list[tuple[str, np.ndarray]]:
    """What ``get_fields_to_serialize`` writes into an engine: the inverse of ``parse_fields``."""
    fields = [("mode", np.array([int(mode)], dtype=np.int32)), ("causal", np.array([int(causal)], dtype=np.int32))]
    if softmax_scale is not None:
        fields.append(("softmax_scale", np.array([softmax_scale], dtype=np.float32)))
    return fields


_FLOAT_TYPE_NAMES = ("HALF", "BF16", "FLOAT")
TORCH_BY_TRT_NAME = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


def format_supported(pos: int, type_names: Sequence[str], linear: bool, num_inputs: int = NUM_INPUTS) -> bool:
    """``supports_format_combination`` as a plain function over TensorRT ``DataType`` names.

    Positions: 0..2 q, k, v (one float dtype, chosen by q), 3 and 4 the query and key lengths
    (INT32), 5 the output (q's dtype). ``type_names[:pos + 1]`` are the types of positions
    0..pos; only linear (dense row-major) layouts, because the kernels take contiguous
    (B, S, H, D) memory.
    """
    if not linear or num_inputs != NUM_INPUTS or not 0 <= pos <= NUM_INPUTS or len(type_names) <= pos:
        return False
    t = type_names[pos]
    if pos == 0:
        return t in _FLOAT_TYPE_NAMES
    if pos in (3, 4):
        return t == "INT32"
    return t == type_names[0]


def output_shape(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> Shape:
    """The output's shape, (B, Sq, H) from q and head_dim from V's own dims; checks the inputs.

    Each shape comes from its own descriptor, and any disagreement is an error instead of an
    out-of-bounds read: k and v share one shape (B, Sk, Hk, D) with q's batch and head dim, and
    q's heads are a multiple of k's.
    """
    for name, shp in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shp) != 4:
            raise InvalidInputError(f"{PLUGIN_NAME}: {name} must be 4-D (B, S, H, D), got shape {tuple(shp)}")
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    if k_shape != v_shape or k_shape[0] != q_shape[0] or k_shape[3] != q_shape[3]:
        raise InvalidInputError(
            f"{PLUGIN_NAME}: k and v must share one shape (B, Sk, Hk, D) with q's B and D, got q {q_shape}, "
            f"k {k_shape}, v {v_shape}; check the QKV split before the attention node"
        )
    if k_shape[2] == 0 or q_shape[2] % k_shape[2]:
        raise InvalidInputError(f"{PLUGIN_NAME}: q's {q_shape[2]} heads are not a multiple of k's {k_shape[2]}")
    return (q_shape[0], q_shape[1], q_shape[2], v_shape[3])
