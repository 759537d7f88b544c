"""The TensorRT plugin ``CustomAttnPlugin``: the node ``fa3trt.onnx.export`` writes, run inside engines.

- ``fields``: the plugin's fields and build-time decisions as plain functions (no TensorRT);
- ``views``: zero-copy torch views of TensorRT's buffers and the per-plugin cache;
- ``enqueue``: the torch-only runtime over raw device pointers (bindings, the enqueue);
- ``registry``: the IPluginV3 classes, their creator and ``register_plugin()``, defined on first
  use through ``fa3trt.trt._trt``, the only module that imports TensorRT.

Importing this package needs neither TensorRT nor a GPU.
"""

from fa3trt.attention.op import PLUGIN_NAME, PLUGIN_VERSION
from fa3trt.trt.plugin.enqueue import enqueue_core, run_enqueue
from fa3trt.trt.plugin.fields import FIELD_NAMES, format_supported, output_shape, parse_fields, serialize_fields
from fa3trt.trt.plugin.registry import is_registered, plugin_classes, register_plugin, require_registered
from fa3trt.trt.plugin.views import EnqueueCache, device_view

__all__ = [
    "PLUGIN_NAME",
    "PLUGIN_VERSION",
    "FIELD_NAMES",
    "register_plugin",
    "is_registered",
    "require_registered",
    "plugin_classes",
    "parse_fields",
    "serialize_fields",
    "format_supported",
    "output_shape",
    "EnqueueCache",
    "device_view",
    "enqueue_core",
    "run_enqueue",
]
