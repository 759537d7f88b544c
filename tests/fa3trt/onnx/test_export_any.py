"""Export of any model by named inputs and axes, checked in ONNX Runtime against the eager model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import fa3trt
from fa3trt.attention.op import onnx_export_mode
from fa3trt.errors import ExportError
from fa3trt.onnx.export import _name_axes, export_onnx, plugin_nodes, verify_onnx
from tests.models import flux_inputs, tiny_flux
from tests.utils import captured_log

C, H = 32, 4
D = C // H


class CrossBlock(nn.Module):
    """Self-attention with lengths, cross-attention to a context of its own length, causal self-attention."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * C)
        self.qkv_causal = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)

    def forward(self, x: torch.Tensor, context: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        t = context.shape[1]
        q, k, v = self.qkv(x).view(b, s, 3, H, D).unbind(2)
        x = x + fa3trt.attention(q, k, v, seq_lens).reshape(b, s, C)
        k, v = self.kv(context).view(b, t, 2, H, D).unbind(2)
        x = x + fa3trt.attention(self.q(x).view(b, s, H, D), k, v, seq_lens).reshape(b, s, C)
        q, k, v = self.qkv_causal(x).view(b, s, 3, H, D).unbind(2)
        x = x + fa3trt.attention(q, k, v, seq_lens, causal=True).reshape(b, s, C)
        return self.out(x)


class CrossModel(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(CrossBlock() for _ in range(blocks))

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            hidden_states = blk(hidden_states, context, seq_lens)
        return hidden_states


AXES = {"hidden_states": {0: "B", 1: "S"}, "context": {0: "B", 1: "T"}, "seq_lens": {0: "B"}}


def make_inputs(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Ragged query lengths (the first full) so padding is checked at every size."""
    g = torch.Generator().manual_seed(sum(sizes.values()))
    b, s, t = sizes["B"], sizes["S"], sizes["T"]
    lens = torch.randint(1, s + 1, (b,), generator=g, dtype=torch.int32)
    lens[0] = s
    return {
        "hidden_states": torch.randn(b, s, C, generator=g),
        "context": torch.randn(b, t, C, generator=g),
        "seq_lens": lens,
    }


def test_cross_attention_model_round_trip(tmp_path: Path) -> None:
    model = CrossModel(blocks=2).eval()
    inputs = make_inputs({"B": 2, "S": 24, "T": 11})
    res = export_onnx(model, tmp_path / "m.onnx", inputs, AXES, plugin_namespace="ns")
    assert res.plugin_nodes == 3 * 2 and res.strict
    assert res.inputs == {
        "hidden_states": {"dtype": "float32", "shape": ["B", "S", C]},
        "context": {"dtype": "float32", "shape": ["B", "T", C]},
        "seq_lens": {"dtype": "int32", "shape": ["B"]},
    }
    assert res.output == {"name": "y", "dtype": "float32", "shape": ["B", "S", C]}
    proto = onnx.load(res.path)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in plugin_nodes(proto)]
    assert sorted(a["causal"] for a in attrs) == [0, 0, 0, 0, 1, 1]
    assert {a["plugin_namespace"] for a in attrs} == {b"ns"}
    # ONNX Runtime vs eager at the samples and at the smallest and largest size of each axis.
    err = verify_onnx(
        res.path,
        model,
        inputs,
        check_sizes={"B": [1, 3], "S": [5, 40], "T": [3, 29]},
        make_inputs=make_inputs,
        atol=1e-4,
    )
    assert err < 1e-4


def test_default_resizing_without_a_factory(tmp_path: Path) -> None:
    """Without make_inputs, float inputs are drawn anew at each size (no lengths here)."""

    class NoLens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = CrossModel(blocks=1)

        def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            lens = torch.full(hidden_states.shape[:1], hidden_states.shape[1], dtype=torch.int32)
            return self.inner(hidden_states, context, lens)

    inputs = {"hidden_states": torch.randn(2, 8, C), "context": torch.randn(2, 6, C)}
    axes = {"hidden_states": {0: "B", 1: "S"}, "context": {0: "B", 1: "T"}}
    res = export_onnx(NoLens().eval(), tmp_path / "m.onnx", inputs, axes)
    assert res.plugin_nodes == 3
    assert verify_onnx(res.path, NoLens().eval(), inputs) < 1e-4


class FixedView(nn.Module):
    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q = self.proj(x).view(b, x.shape[1] if self.branch else 16, H, D)
        y = fa3trt.attention(q, q, q).reshape(b, -1, C)
        if self.branch and x.shape[1] == 16:
            y = y * 2
        return y


@pytest.mark.parametrize("branch", [False, True], ids=["view", "branch"])
def test_specialized_axis_is_an_error_naming_input_and_axis(tmp_path: Path, branch: bool) -> None:
    with pytest.raises(ExportError, match=r"axis S \(x\[1\]\) is declared dynamic.*Fix:"):
        export_onnx(FixedView(branch), tmp_path / "m.onnx", {"x": torch.randn(2, 16, C)}, {"x": {0: "B", 1: "S"}})


def test_a_static_graph_axis_declared_dynamic_is_an_error() -> None:
    """The check after export, for axes the ONNX exporter fixed silently."""
    x = onnx.helper.make_tensor_value_info("frames", onnx.TensorProto.FLOAT, ["s0", 13, 8])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["s0", 13, 8])
    proto = onnx.helper.make_model(
        onnx.helper.make_graph([onnx.helper.make_node("Identity", ["frames"], ["y"])], "g", [x], [y])
    )
    with pytest.raises(ExportError, match=r"axis F of input frames \(axis 1\) came out static \(13\)"):
        _name_axes(proto, {"frames": {0: "B", 1: "F"}}, {"B": ["frames[0]"], "F": ["frames[1]"]})
    _name_axes(proto, {"frames": {0: "B"}}, {"B": ["frames[0]"]})
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "B"


class SameLength(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        q = x.view(*x.shape[:2], H, D)
        return fa3trt.attention(q, q, q).reshape(x.shape) + y


def test_axes_the_model_makes_equal_are_an_error_naming_both(tmp_path: Path) -> None:
    inputs = {"x": torch.randn(2, 8, C), "y": torch.randn(2, 8, C)}
    with pytest.raises(ExportError, match="output_name 'y' is also an input's name"):
        export_onnx(SameLength(), tmp_path / "m.onnx", inputs)
    axes = {"x": {0: "B", 1: "S"}, "y": {0: "B", 1: "T"}}
    with pytest.raises(ExportError, match=r"axis T \(y\[1\]\) .*T = y.shape\[1\] and S = x.shape\[1\] must always be"):
        export_onnx(SameLength(), tmp_path / "m.onnx", inputs, axes, output_name="out")
    # One axis name for both is the fix.
    axes = {"x": {0: "B", 1: "S"}, "y": {0: "B", 1: "S"}}
    res = export_onnx(SameLength(), tmp_path / "m.onnx", inputs, axes, output_name="out")
    assert res.inputs["y"]["shape"] == ["B", "S", C]
    assert verify_onnx(res.path, SameLength(), inputs) < 1e-4


@dataclass
class Out:
    sample: torch.Tensor
    extra: torch.Tensor


class ManyOutputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> object:
        b, s, _ = x.shape
        q = self.proj(x).view(b, s, H, D)
        a = fa3trt.attention(q, q, q).reshape(b, s, C)
        if self.kind == "dict":
            return {"aux": x.sum(-1), "sample": a + 1}
        if self.kind == "object":
            return Out(sample=a + 1, extra=x.sum(-1))
        return (x.sum(-1), a + 1)


@pytest.mark.parametrize(("kind", "output"), [("dict", "sample"), ("tuple", 1), ("object", "sample"), ("dict", 1)])
def test_output_selected_by_name_or_position(tmp_path: Path, kind: str, output: str | int) -> None:
    model = ManyOutputs(kind).eval()
    x = torch.randn(2, 12, C)
    res = export_onnx(model, tmp_path / "m.onnx", {"x": x}, {"x": {0: "B", 1: "S"}}, output=output, output_name="out")
    assert res.output == {"name": "out", "dtype": "float32", "shape": ["B", "S", C]}
    assert res.plugin_nodes == 1
    assert verify_onnx(res.path, model, {"x": x}, output=output, check_sizes={"S": [3, 20]}) < 1e-4


def test_argument_errors_name_the_fix(tmp_path: Path) -> None:
    model = ManyOutputs("dict").eval()
    x = {"x": torch.randn(2, 12, C)}
    with pytest.raises(ExportError, match=r"output='nope' selects nothing .*\['aux', 'sample'\]"):
        export_onnx(model, tmp_path / "m.onnx", x, {"x": {0: "B"}}, output="nope")
    with pytest.raises(ExportError, match="inputs must be a non-empty dict of name -> sample tensor"):
        export_onnx(model, tmp_path / "m.onnx", {})
    with pytest.raises(ExportError, match=r"routing must be one of .*'off' keeps PyTorch's attention"):
        export_onnx(model, tmp_path / "m.onnx", x, routing="sometimes")
    with pytest.raises(ExportError, match=r"x\[0\] \(axis B\) has sample size 1; .* >= 2"):
        export_onnx(model, tmp_path / "m.onnx", {"x": torch.randn(1, 12, C)}, {"x": {0: "B"}}, output="sample")
    with pytest.raises(ExportError, match="dynamic_axes names input 'y'"):
        export_onnx(model, tmp_path / "m.onnx", x, {"y": {0: "B"}}, output="sample")
    with pytest.raises(ExportError, match="within its range"):
        export_onnx(model, tmp_path / "m.onnx", x, {"x": {1: "S"}}, output="sample", axis_ranges={"S": (1, 8)})


FLUX_AXES = {
    "hidden_states": {0: "B", 1: "I"},
    "encoder_hidden_states": {0: "B", 1: "T"},
    "pooled_projections": {0: "B"},
    "timestep": {0: "B"},
    "img_ids": {0: "I"},
    "txt_ids": {0: "T"},
}


def test_export_routes_a_diffusers_model_by_default(tmp_path: Path) -> None:
    """No router around the call: export_onnx routes the model itself, strictly traced, one
    plugin node per routed call, and says so in its result."""
    model = tiny_flux(1, 1)
    inputs = flux_inputs(2, 16, 8)
    with torch.no_grad(), captured_log("fa3trt.onnx.export") as warnings:
        res = export_onnx(model, tmp_path / "m.onnx", inputs, FLUX_AXES, output="sample")
    assert res.strict and not warnings  # no "strict torch.export failed ..., falling back"
    assert res.plugin_nodes == 2  # one joint, one single-stream block
    assert res.routing is not None and res.routing["method"] == "sdpa" and res.routing["left"] == {}
    assert res.routing["routed"] >= res.plugin_nodes  # strict export may count a call once per pass
    assert [p["head_dim"] for p in res.plugins] == [16, 16]
    assert verify_onnx(res.path, model, inputs, output="sample") < 1e-4


def test_export_with_routing_off_keeps_pytorch_attention_and_says_why(tmp_path: Path) -> None:
    model = tiny_flux(1, 1)
    with torch.no_grad(), captured_log("fa3trt.onnx.export") as warnings:
        res = export_onnx(model, tmp_path / "m.onnx", flux_inputs(2, 16, 8), FLUX_AXES, output="sample", routing="off")
    assert res.plugin_nodes == 0 and res.routing is None
    assert any("no CustomAttnPlugin node: routing is off" in w for w in warnings)


def test_exported_program_runs_the_attention_eagerly() -> None:
    """The traced node is a real op: the program's module computes what the model does."""
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("tiny", layers=1))
    x, lens = torch.randn(2, 12, 256), torch.tensor([12, 5], dtype=torch.int32)
    with onnx_export_mode():
        program = torch.export.export(model, (x, lens), strict=True)
    assert sum("plugin_node" in str(n.target) for n in program.graph.nodes) == 1
    torch.testing.assert_close(program.module()(x, lens), model(x, lens), rtol=1e-5, atol=1e-5)


class TokenModel(nn.Module):
    """int64 token ids through an embedding, and an int64 length count, into attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, C)
        self.proj = nn.Linear(C, C)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        assert input_ids.dtype == torch.int64 and lengths.dtype == torch.int64  # the model sees int64
        b, s = input_ids.shape
        q = self.proj(self.embed(input_ids)).view(b, s, H, D)
        return fa3trt.attention(q, q, q, lengths).reshape(b, s, C)


def test_int64_inputs_enter_the_graph_as_int32(tmp_path: Path) -> None:
    model = TokenModel().eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 10)), "lengths": torch.tensor([10, 4])}
    axes = {"input_ids": {0: "B", 1: "S"}, "lengths": {0: "B"}}
    res = export_onnx(model, tmp_path / "m.onnx", inputs, axes)
    assert res.inputs == {
        "input_ids": {"dtype": "int32", "shape": ["B", "S"]},
        "lengths": {"dtype": "int32", "shape": ["B"]},
    }
    assert res.strict and res.plugin_nodes == 1
    # ONNX Runtime fed int32 against the eager model fed the int64 originals.
    assert verify_onnx(res.path, model, inputs, check_sizes={"B": [1, 3], "S": [10, 16]}) < 1e-4
    kept = export_onnx(model, tmp_path / "k.onnx", inputs, axes, narrow_int64_inputs=False)
    assert kept.inputs["input_ids"]["dtype"] == "int64"
    big = dict(inputs, input_ids=torch.full((2, 10), 1 << 40))
    with pytest.raises(ExportError, match=r"input 'input_ids' holds values outside int32 .*narrow_int64=False"):
        export_onnx(model, tmp_path / "b.onnx", big, axes)
