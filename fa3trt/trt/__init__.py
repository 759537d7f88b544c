"""TensorRT: the plugin, what makes engines compatible, profiles, the build and the runtime.

- ``_trt``: the only import of TensorRT (lazy, with the install hint);
- ``plugin/``: the ``CustomAttnPlugin`` plugin and ``register_plugin()``;
- ``compat``: an engine's key and the check that refuses one built for another TensorRT or GPU;
- ``profiles``: one optimization profile per bucket over a signature's named axes;
- ``build``: ONNX file in, engine bytes plus metadata out;
- ``runtime``: engine bytes in, calls bound by name.

This layer imports no model, exporter or store: what to build and where to keep it is
``fa3trt.artifacts``'s business. Importing it needs neither TensorRT nor a GPU.
"""

from fa3trt.trt._trt import INSTALL_HINT, available, require, version

__all__ = ["available", "require", "version", "INSTALL_HINT"]
