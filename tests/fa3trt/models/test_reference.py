"""The reference model as one more source: its forward, weights round trip, and its export by
the one pipeline (``export_source``) verified in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

import fa3trt
from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.models.export import export_source, verify_source
from fa3trt.models.spec import ReferenceSpec
from fa3trt.onnx.export import export_onnx, plugin_nodes
from tests.utils import rel_err


def test_presets() -> None:
    tiny = fa3trt.ModelConfig.preset("tiny")
    assert (tiny.hidden, tiny.heads, tiny.layers) == (256, 4, 2)
    seed = fa3trt.ModelConfig.preset("seed", layers=4)
    assert (seed.hidden, seed.heads, seed.head_dim, seed.layers, seed.dtype) == (4096, 32, 128, 4, "bfloat16")
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        fa3trt.ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="not divisible"):
        fa3trt.ModelConfig(hidden=100, heads=3)


def test_padded_batch_equals_each_sequence_alone() -> None:
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))
    lens = [50, 13, 1]
    xs = [torch.randn(n, 256) for n in lens]
    x = torch.zeros(3, 50, 256)
    for i, t in enumerate(xs):
        x[i, : len(t)] = t
        x[i, len(t) :] = 7.0  # garbage in the padding must not leak
    y = model(x, torch.tensor(lens, dtype=torch.int32))
    for i, t in enumerate(xs):
        alone = model(t[None])[0]
        assert rel_err(y[i, : len(t)], alone) < 1e-5
        assert torch.all(y[i, len(t) :] == 0)


def test_model_matches_a_hand_written_forward() -> None:
    """The block stack recomputed with reference attention and plain torch ops."""
    cfg = fa3trt.ModelConfig.preset("tiny", layers=1)
    model = fa3trt.build_model(cfg)
    x = torch.randn(2, 9, 256)
    blk = model.blocks[0]
    h = torch.nn.functional.layer_norm(x, (256,), blk.norm1.weight, blk.norm1.bias)
    q, k, v = (h @ blk.qkv.weight.T + blk.qkv.bias).view(2, 9, 3, 4, 64).unbind(2)
    from fa3trt.testing import reference_attention

    a = reference_attention(q, k, v).reshape(2, 9, 256)
    x1 = x + a @ blk.proj.weight.T + blk.proj.bias
    h2 = torch.nn.functional.layer_norm(x1, (256,), blk.norm2.weight, blk.norm2.bias)
    m = torch.nn.functional.gelu(h2 @ blk.fc1.weight.T + blk.fc1.bias, approximate="tanh")
    x2 = x1 + m @ blk.fc2.weight.T + blk.fc2.bias
    want = torch.nn.functional.layer_norm(x2, (256,), model.norm.weight, model.norm.bias)
    assert rel_err(model(x), want) < 1e-5


def test_weights_roundtrip_and_seeded_init(tmp_path: Path) -> None:
    cfg = fa3trt.ModelConfig.preset("tiny")
    a, b = fa3trt.build_model(cfg), fa3trt.build_model(cfg)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny", seed=1))
    assert not torch.equal(a.blocks[0].qkv.weight, c.blocks[0].qkv.weight)
    fa3trt.save_weights(c, tmp_path / "w.safetensors")
    d = fa3trt.build_model(cfg, tmp_path / "w.safetensors")
    assert torch.equal(c.blocks[1].fc2.weight, d.blocks[1].fc2.weight)
    with pytest.raises(ConfigError, match="does not match"):
        fa3trt.build_model(fa3trt.ModelConfig.preset("tiny", layers=3), tmp_path / "w.safetensors")


def test_model_rejects_wrong_hidden() -> None:
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))
    with pytest.raises(InvalidInputError, match=r"\(batch, seq, 256\)"):
        model(torch.randn(1, 4, 128))


def test_export_writes_plugin_nodes_and_matches_in_ort(tmp_path: Path) -> None:
    spec = ReferenceSpec(preset="tiny")
    cfg = spec.config()
    buckets = Buckets((32, 96))
    res = export_source(spec, tmp_path / "m.onnx", buckets)
    proto = onnx.load(res.path)
    nodes = plugin_nodes(proto)
    assert res.plugin_nodes == len(nodes) == cfg.layers
    assert res.plugins == [{"mode": 0, "causal": False, "head_dim": cfg.head_dim}] * cfg.layers
    assert res.routing is None  # the reference model calls the op itself: nothing to route
    for n in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert n.domain == "attn"
        scale = attrs.pop("softmax_scale")
        assert attrs == {"mode": 0, "causal": 0, "plugin_version": b"2", "plugin_namespace": b""}
        assert scale == pytest.approx(cfg.head_dim**-0.5)
        # q, k, v, then the query and key lengths: for the reference model's self-attention
        # both are the graph's seq_lens input.
        assert len(n.input) == 5 and len(n.output) == 1 and n.input[3] == n.input[4]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"x": ["B", "S", 256], "seq_lens": ["B"]}
    assert res.inputs == {
        "x": {"dtype": "float32", "shape": ["B", "S", 256]},
        "seq_lens": {"dtype": "int32", "shape": ["B"]},
    }
    assert res.output["name"] == "y" and res.strict  # traced by strict torch.export: no fallback
    assert not res.external_data
    # fp32, padded batches (ragged lengths), at the sample sizes and each axis's smallest and largest.
    assert verify_source(spec, res.path, buckets) < 1e-4


def test_plugin_namespace_is_written_to_every_node(tmp_path: Path) -> None:
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny", layers=1))
    sample = {"x": torch.randn(2, 8, 256), "seq_lens": torch.tensor([8, 3], dtype=torch.int32)}
    res = export_onnx(
        model,
        tmp_path / "m.onnx",
        sample,
        {"x": {0: "B", 1: "S"}, "seq_lens": {0: "B"}},
        routing="off",
        plugin_namespace="fa3trt",
    )
    attrs = [
        {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in plugin_nodes(onnx.load(res.path))
    ]
    assert [a["plugin_namespace"] for a in attrs] == [b"fa3trt"]


def test_export_external_data(tmp_path: Path) -> None:
    spec = ReferenceSpec(preset="tiny", layers=1)
    model = fa3trt.build_model(spec.config())
    sample = {"x": torch.randn(2, 8, 256), "seq_lens": torch.tensor([8, 3], dtype=torch.int32)}
    res = export_onnx(
        model, tmp_path / "m.onnx", sample, {"x": {0: "B", 1: "S"}, "seq_lens": {0: "B"}}, external_data=True
    )
    assert res.external_data
    assert any(p.name != "m.onnx" for p in tmp_path.iterdir())  # weights beside the graph
    assert verify_source(spec, res.path, Buckets((32,))) < 1e-4
