"""Export the model to ONNX with one ``CustomAttnPlugin`` node per attention call, and verify it.

``export_onnx(model, path)`` uses the dynamo exporter. Inside ``fa3trt.attention`` the call is
written with ``torch.onnx.ops.symbolic`` as node ``attn::CustomAttnPlugin`` carrying the TensorRT
plugin's fields (``mode``, ``causal``, ``softmax_scale``, ``plugin_version``, ``plugin_namespace``); inputs are ``x`` (B, S, D)
and ``seq_lens`` (B,) with symbolic ``B`` and ``S``. Weights go to an external-data file when the
model passes 2 GB (protobuf's limit).

``verify_onnx(path, model)`` runs the file in ONNX Runtime on the CPU, with ``CustomAttnPlugin``
implemented as an onnxruntime-extensions Python op that calls the same attention op, and
compares with the PyTorch model. ``python -m fa3trt.export --check`` does both for a preset.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import logging
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fa3trt.errors import ExportError
from fa3trt.model import ModelConfig, Transformer, build_model
from fa3trt.op import PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_VERSION, onnx_export_mode

__all__ = ["export_onnx", "verify_onnx", "ExportResult", "file_sha256", "plugin_nodes", "OPSET"]

log = logging.getLogger(__name__)

OPSET = 20
"""Opset 20 has Gelu and LayerNormalization as single nodes, which TensorRT 10 parses natively."""
_PROTOBUF_LIMIT = 2 << 30


@dataclass(frozen=True)
class ExportResult:
    path: str
    sha256: str
    external_data: bool
    plugin_nodes: int


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def plugin_nodes(model_proto: object) -> list[object]:
    """The ``CustomAttnPlugin`` nodes of an ``onnx.ModelProto``."""
    return [n for n in model_proto.graph.node if n.op_type == PLUGIN_NAME]  # type: ignore[attr-defined]


def export_onnx(
    model: Transformer,
    path: str | os.PathLike[str],
    *,
    sample_batch: int = 2,
    sample_seq: int = 64,
    plugin_namespace: str = "",
    external_data: bool | None = None,
) -> ExportResult:
    """Export ``model`` to ``path``; returns the file's sha256 and how many plugin nodes it has.

    ``external_data``: None decides by size (weights past 2 GB go to ``<path>.data``).
    """
    import onnx

    cfg = model.cfg
    if next(model.parameters()).device.type != "cpu":
        # Trace on the CPU: the graph does not depend on the device, and some torch releases
        # (2.11) give the plugin node's placeholder output a CPU device inside a CUDA graph.
        model = copy.deepcopy(model).to("cpu")
    device = torch.device("cpu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randn(sample_batch, sample_seq, cfg.hidden, device=device, dtype=cfg.torch_dtype)
    seq_lens = torch.full((sample_batch,), sample_seq, dtype=torch.int32, device=device)
    batch = torch.export.Dim("B", min=1, max=4096)
    seq = torch.export.Dim("S", min=1, max=1 << 20)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if external_data is None:
        external_data = n_bytes > _PROTOBUF_LIMIT - (64 << 20)
    try:
        with onnx_export_mode():
            program = torch.onnx.export(
                model,
                (x, seq_lens),
                dynamo=True,
                opset_version=OPSET,
                input_names=["x", "seq_lens"],
                output_names=["y"],
                dynamic_shapes={"x": {0: batch, 1: seq}, "seq_lens": {0: batch}},
                verbose=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for ModelConfig({cfg.name}): {e}") from e
    if program is None:  # the dynamo exporter always returns a program; guard the type
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(path), external_data=external_data)

    # The only edit after export: the plugin namespace is a deployment choice, not a property of
    # the model, so it is written into the nodes here instead of threading it through forward().
    proto = onnx.load(str(path), load_external_data=False)
    nodes = plugin_nodes(proto)
    if len(nodes) != cfg.layers:
        raise ExportError(
            f"expected {cfg.layers} {PLUGIN_NAME} nodes (one per layer), found {len(nodes)}; "
            "the attention call was traced into other ops"
        )
    if plugin_namespace:
        for node in nodes:
            for attr in node.attribute:  # type: ignore[attr-defined]
                if attr.name == "plugin_namespace":
                    attr.s = plugin_namespace.encode()
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))
    result = ExportResult(str(path), file_sha256(path), bool(external_data), len(nodes))
    log.info("exported %s: %d plugin nodes, sha256 %s", path, len(nodes), result.sha256[:12])
    return result


_ort_op_lock = threading.Lock()
_ort_op_registered = False


def _register_ort_plugin_op() -> None:
    """Register ``attn::CustomAttnPlugin`` as an onnxruntime-extensions Python op (once)."""
    global _ort_op_registered
    with _ort_op_lock:
        if _ort_op_registered:
            return
        from onnxruntime_extensions import PyCustomOpDef, onnx_op

        from fa3trt.op import custom_attn

        f32, i32, i64, s = (
            PyCustomOpDef.dt_float,
            PyCustomOpDef.dt_int32,
            PyCustomOpDef.dt_int64,
            PyCustomOpDef.dt_string,
        )

        @onnx_op(
            op_type=f"{PLUGIN_DOMAIN}::{PLUGIN_NAME}",
            inputs=[f32, f32, f32, i32, i32],
            outputs=[f32],
            attrs={"mode": i64, "causal": i64, "softmax_scale": f32, "plugin_version": s, "plugin_namespace": s},
        )
        def _custom_attn_plugin(q, k, v, seq_lens, seq_lens_k, **attrs):  # type: ignore[no-untyped-def]
            if str(attrs.get("plugin_version", PLUGIN_VERSION)) != PLUGIN_VERSION:
                raise ExportError(f"node has plugin_version {attrs['plugin_version']!r}, this is {PLUGIN_VERSION}")
            # The node always carries both lengths (the same values for padded self-attention).
            out = custom_attn(
                torch.from_numpy(q),
                torch.from_numpy(k),
                torch.from_numpy(v),
                torch.from_numpy(seq_lens),
                torch.from_numpy(seq_lens_k),
                int(attrs.get("mode", 0)),
                bool(attrs.get("causal", 0)),
                float(attrs["softmax_scale"]),
            )
            return out.numpy()

        _ort_op_registered = True


def verify_onnx(
    path: str | os.PathLike[str],
    model: Transformer,
    *,
    lengths: tuple[int, ...] = (48, 17, 1),
    atol: float = 1e-4,
    seed: int = 0,
) -> float:
    """Run ``path`` in ONNX Runtime (CPU) and the PyTorch ``model`` on one padded batch.

    Returns the max abs difference; raises ``ExportError`` above ``atol``. fp32 models only
    (ONNX Runtime's Python ops take float32).
    """
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    if model.cfg.torch_dtype != torch.float32:
        raise ExportError(f"verify_onnx needs a float32 model, got {model.cfg.dtype}; export a float32 copy to check")
    _register_ort_plugin_op()
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), model.cfg.hidden, generator=g)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    (got,) = session.run(["y"], {"x": x.numpy(), "seq_lens": seq_lens.numpy()})
    with torch.inference_mode():
        want = model(x, seq_lens).numpy()
    err = float(np.abs(got - want).max())
    if not err <= atol:  # also catches NaN
        raise ExportError(f"ONNX Runtime output differs from PyTorch by {err:.3g} (tolerance {atol:g}) for {path}")
    return err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa3trt.export", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (tiny, seed)")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--weights", default=None, help="safetensors weights (default: seeded init)")
    p.add_argument("--out", default="model.onnx", help="output path")
    p.add_argument("--plugin-namespace", default="")
    p.add_argument("--check", action="store_true", help="verify in ONNX Runtime against PyTorch (float32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {"layers": args.layers} if args.layers else {}
    cfg = ModelConfig.preset(args.preset, **overrides)
    if args.check:
        cfg = ModelConfig.preset(args.preset, dtype="float32", **overrides)
    model = build_model(cfg, args.weights)
    res = export_onnx(model, args.out, plugin_namespace=args.plugin_namespace)
    print(f"wrote {res.path} ({res.plugin_nodes} {PLUGIN_NAME} nodes, sha256 {res.sha256[:16]})")
    if args.check:
        try:
            err = verify_onnx(res.path, model)
        except Exception as e:
            print(f"FAILED: {e}", file=sys.stderr)
            return 1
        print(f"ONNX Runtime vs PyTorch: max abs error {err:.2e} (tolerance 1e-4): OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
