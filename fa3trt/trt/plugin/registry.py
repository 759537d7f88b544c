"""The TensorRT classes: ``CustomAttnPlugin`` (IPluginV3), its creator, and registration.

Contract:
- Name ``CustomAttnPlugin``, version ``"1"``, namespace chosen at registration (default ""): the
  same name, version and fields (``mode``, ``causal``, ``softmax_scale``) as the ONNX node
  ``fa3trt.onnx.export`` writes. Inputs q (B, Sq, H, D), k and v (B, Sk, Hk, D) in one dtype (fp16,
  bf16 or fp32), ``seq_lens`` and ``seq_lens_k`` (int32, (B,)); one output shaped like q, rows
  past each query length zero.
- ``register_plugin(namespace)`` must run in every process (driver, build worker, replica)
  before an ONNX parse or an engine deserialize; it is idempotent, thread-safe and, once done,
  a dict lookup. ``require_registered`` raises ``PluginNotRegisteredError`` otherwise.
- The classes are defined on first use (``plugin_classes()``): TensorRT is imported through
  ``fa3trt.trt._trt`` then, never at import time. Their decisions are ``fa3trt.trt.plugin.fields``'
  plain functions and their enqueue is ``fa3trt.trt.plugin.enqueue.run_enqueue``.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from fa3trt.attention.op import MODE_NATIVE, PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.errors import InvalidInputError, PluginNotRegisteredError
from fa3trt.trt import _trt
from fa3trt.trt.plugin.enqueue import run_enqueue
from fa3trt.trt.plugin.fields import (
    FIELD_NAMES,
    NUM_INPUTS,
    TORCH_BY_TRT_NAME,
    Shape,
    format_supported,
    output_shape,
    parse_fields,
    serialize_fields,
)
from fa3trt.trt.plugin.views import EnqueueCache

if TYPE_CHECKING:
    # Static only: mypy checks every TensorRT call below against tensorrt-stubs.
    import tensorrt as trt
else:
    from fa3trt.trt._trt import tensorrt as trt

__all__ = ["register_plugin", "is_registered", "require_registered", "plugin_classes"]

log = logging.getLogger(__name__)

_reg_lock = threading.Lock()
_registered: dict[str, Any] = {}  # namespace -> creator; held so Python keeps the object alive


def is_registered(namespace: str = "") -> bool:
    """Whether TensorRT's registry has ``CustomAttnPlugin`` v1 in ``namespace`` (False without TensorRT)."""
    if namespace in _registered:
        return True
    if not _trt.available():
        return False
    return trt.get_plugin_registry().get_creator(PLUGIN_NAME, PLUGIN_VERSION, namespace) is not None


def require_registered(namespace: str = "") -> None:
    """Raise ``PluginNotRegisteredError`` unless the plugin is registered in ``namespace``."""
    if not is_registered(namespace):
        raise PluginNotRegisteredError(
            f"TensorRT plugin {PLUGIN_NAME} v{PLUGIN_VERSION} (namespace {namespace!r}) is not registered in "
            f"this process (pid {os.getpid()}); call fa3trt.trt.plugin.register_plugin({namespace!r}) before "
            "parsing ONNX or deserializing an engine, in every process that does either"
        )


def register_plugin(namespace: str = "") -> None:
    """Register the plugin creator with TensorRT's registry. Idempotent, thread-safe, cheap.

    The first call per process and namespace imports TensorRT and registers; later calls are
    one dict lookup. A creator registered earlier by other code under the same name, version
    and namespace is accepted as is.
    """
    if namespace in _registered:
        return
    _trt.require()
    with _reg_lock:
        if namespace in _registered:
            return
        registry = trt.get_plugin_registry()
        creator = registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, namespace)
        if creator is None:
            creator = plugin_classes()[1](namespace)
            if not registry.register_creator(creator, namespace):
                raise PluginNotRegisteredError(
                    f"TensorRT refused to register {PLUGIN_NAME} v{PLUGIN_VERSION} in namespace {namespace!r}; "
                    "another creator with that name, version and namespace may be half-registered: "
                    "restart the process"
                )
            log.info("registered TensorRT plugin %s v%s (namespace %r)", PLUGIN_NAME, PLUGIN_VERSION, namespace)
        _registered[namespace] = creator


def _dims(desc: trt.PluginTensorDesc) -> Shape:
    """A tensor descriptor's dims as a tuple. Dims iterates through __getitem__; the stubs omit
    __iter__."""
    return tuple(desc.dims)  # type: ignore[arg-type]


def _fields_of(fc: Any) -> list[tuple[str, Any]]:
    return [(f.name, f.data) for f in fc] if fc is not None else []


@functools.cache
def plugin_classes() -> tuple[type, type]:
    """(CustomAttnPlugin, CustomAttnPluginCreator), defined on first use (imports TensorRT)."""
    _trt.require()  # fail here, with the install hint, rather than inside a class statement
    _FIELD_TYPES = {
        "mode": trt.PluginFieldType.INT32,
        "causal": trt.PluginFieldType.INT32,
        "softmax_scale": trt.PluginFieldType.FLOAT32,
    }

    class CustomAttnPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        """Attention over (B, S, H, D) tensors with per-sequence lengths; see the module docstring."""

        def __init__(
            self,
            mode: int = MODE_NATIVE,
            namespace: str = "",
            phase: Any = None,
            causal: bool = False,
            softmax_scale: float | None = None,
        ) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            # Python plugins must set every attribute TensorRT reads.
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = namespace
            self.num_outputs = 1
            # Identical attention layers time identically: share one timing-cache entry.
            self.timing_cache_id = f"{PLUGIN_NAME}.{PLUGIN_VERSION}.mode{mode}.causal{int(causal)}.scale{softmax_scale}"
            self.mode = mode
            self.causal = causal
            self.softmax_scale = softmax_scale
            self.phase = phase
            self.tactic = 0
            self.cache = EnqueueCache()

        # -- core
        def get_capability_interface(self, type: Any) -> Any:
            return self

        def clone(self) -> CustomAttnPlugin:
            # A fresh cache: no mutable state is shared between clones (contexts, builder copies).
            c = CustomAttnPlugin(self.mode, self.plugin_namespace, self.phase, self.causal, self.softmax_scale)
            c.tactic = self.tactic
            return c

        # -- build
        def get_output_data_types(self, input_types: list[trt.DataType]) -> list[trt.DataType]:
            return [input_types[0]]

        def get_output_shapes(
            self, inputs: list[trt.DimsExprs], shape_inputs: list[trt.DimsExprs], expr_builder: trt.IExprBuilder
        ) -> list[trt.DimsExprs]:
            # The stubs lack DimsExprs' copy constructor, which TensorRT's own samples use.
            out = trt.DimsExprs(inputs[0])  # type: ignore[call-overload]  # (B, Sq, H) of q ...
            out[3] = inputs[2][3]  # ... and head_dim from V's own dims
            return [out]

        def supports_format_combination(
            self, pos: int, in_out: list[trt.DynamicPluginTensorDesc], num_inputs: int
        ) -> bool:
            names = [t.desc.type.name for t in in_out[: pos + 1]]
            return format_supported(pos, names, in_out[pos].desc.format == trt.TensorFormat.LINEAR, num_inputs)

        def configure_plugin(
            self, inp: list[trt.DynamicPluginTensorDesc], out: list[trt.DynamicPluginTensorDesc]
        ) -> None:
            if len(inp) != NUM_INPUTS or len(out) != 1:
                raise InvalidInputError(
                    f"{PLUGIN_NAME} v{PLUGIN_VERSION} takes {NUM_INPUTS} inputs (q, k, v, seq_lens, seq_lens_k) and gives "
                    f"1 output, got {len(inp)} and {len(out)}; re-export the model with this fa3trt"
                )

        def get_workspace_size(
            self, inp: list[trt.DynamicPluginTensorDesc], out: list[trt.DynamicPluginTensorDesc]
        ) -> int:
            return 0  # kernel temporaries come from PyTorch's caching allocator on the stream

        def get_valid_tactics(self) -> list[int]:
            return []  # one implementation per (dtype, GPU); nothing for TensorRT to time

        # -- runtime
        def set_tactic(self, tactic: int) -> None:
            self.tactic = tactic

        def on_shape_change(self, inp: list[trt.PluginTensorDesc], out: list[trt.PluginTensorDesc]) -> None:
            # Called when shapes change, not per enqueue: validate here so a bad graph fails at
            # set_input_shape time with a readable message.
            output_shape(_dims(inp[0]), _dims(inp[1]), _dims(inp[2]))

        def enqueue(
            self,
            input_desc: list[trt.PluginTensorDesc],
            output_desc: list[trt.PluginTensorDesc],
            inputs: list[int],
            outputs: list[int],
            workspace: int,
            stream: int,
        ) -> None:
            q_desc = input_desc[0]
            dtype = TORCH_BY_TRT_NAME.get(q_desc.type.name)
            status = 1
            if dtype is None:
                log.error("%s: unsupported input type %s", PLUGIN_NAME, q_desc.type.name)
            else:
                status = run_enqueue(
                    inputs[0],
                    inputs[1],
                    inputs[2],
                    inputs[3],
                    outputs[0],
                    _dims(q_desc),
                    _dims(input_desc[1]),
                    _dims(input_desc[2]),
                    dtype,
                    stream,
                    self.mode,
                    seq_lens_k_ptr=inputs[4],
                    causal=self.causal,
                    softmax_scale=self.softmax_scale,
                    cache=self.cache,
                )
            if status != 0:
                # TensorRT's Python binding turns an exception into a failed enqueue (non-zero
                # status to the C++ side, execute_async_v3 returns False); the reason is logged.
                raise RuntimeError(f"{PLUGIN_NAME} enqueue failed (status {status}); see the log above")

        def attach_to_context(self, resource_context: Any) -> CustomAttnPlugin:
            return self.clone()

        def get_fields_to_serialize(self) -> trt.PluginFieldCollection_:
            # The stubs type the name as FallbackString, which a str converts to implicitly.
            fields = [
                trt.PluginField(n, a, _FIELD_TYPES[n])  # type: ignore[call-overload]
                for n, a in serialize_fields(self.mode, self.causal, self.softmax_scale)
            ]
            # pybind converts the list type implicitly; the stubs name only the underscore type.
            return trt.PluginFieldCollection(fields)  # type: ignore[return-value]

    class CustomAttnPluginCreator(trt.IPluginCreatorV3One):
        """Creates ``CustomAttnPlugin`` from ONNX attributes (build) or engine fields (runtime)."""

        def __init__(self, namespace: str = "") -> None:
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = namespace
            empty = {"mode": np.int32, "causal": np.int32, "softmax_scale": np.float32}
            self.field_names = trt.PluginFieldCollection(  # type: ignore[assignment]  # pybind converts
                [
                    trt.PluginField(n, np.array([], dtype=empty[n]), _FIELD_TYPES[n])  # type: ignore[call-overload]
                    for n in FIELD_NAMES
                ]
            )

        def create_plugin(self, name: str, field_collection: Any, phase: Any) -> CustomAttnPlugin:
            fields = parse_fields(_fields_of(field_collection))
            return CustomAttnPlugin(
                fields["mode"], self.plugin_namespace, phase, fields["causal"], fields["softmax_scale"]
            )

    return CustomAttnPlugin, CustomAttnPluginCreator
