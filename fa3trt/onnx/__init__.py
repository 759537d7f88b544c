"""ONNX: a model's export by named inputs and axes, the ``CustomAttnPlugin`` node, and the check
of an exported file in ONNX Runtime against the eager model.

- ``calls``: how export calls a model (named inputs in, one selected output out);
- ``node``: the node's schema and its translation from the traced op;
- ``export``: ``export_onnx``;
- ``check``: ``verify_onnx``.

``onnx`` and ``onnxscript`` are imported lazily, where a file is written or read.
"""

from fa3trt.onnx.export import ExportResult, export_onnx

__all__ = ["export_onnx", "ExportResult"]
