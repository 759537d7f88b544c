"""``export_source`` of models whose attention mask the server makes (``fill: mask``): the traced
masks become key lengths (one ``CustomAttnPlugin`` node per layer), and ``verify_source`` checks
the file in ONNX Runtime against the eager unrouted model on padded batches (CPU)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from fa3trt.buckets import Buckets
from fa3trt.config import AppArgs
from fa3trt.errors import ConfigError, ExportError
from fa3trt.models.export import export_source, ragged_lengths, verify_source
from fa3trt.models.sources import load_source
from fa3trt.models.spec import SourceSpec
from fa3trt.onnx.check import _register_ort_plugin_op
from fa3trt.onnx.export import plugin_nodes

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")
ort_extensions = pytest.importorskip("onnxruntime_extensions")

ROOT = Path(__file__).resolve().parents[3]


def bert_args() -> AppArgs:
    config = yaml.safe_load((ROOT / "examples" / "serve_bert.yaml").read_text())
    return AppArgs.model_validate(config["applications"][0]["args"])


def left_alone(routing: dict | None, reason: str) -> int:
    """From an export's routing report: no call routed, and how many were left alone, each for
    ``reason`` (a mask's key axis may print as torch's symbol before the first guard unifies it)."""
    assert routing is not None and routing["routed"] == 0, routing
    for key in routing["left"]:
        assert re.fullmatch(r"attn_mask \(B,1,S,\w+\) bool " + re.escape(reason), key), routing
    return int(sum(routing["left"].values()))


def run_onnx(path: str, feed: dict[str, torch.Tensor]) -> np.ndarray:
    from onnxruntime_extensions import get_library_path

    _register_ort_plugin_op()
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    # the graph takes int64 inputs as int32 (export_onnx narrows them)
    return session.run(None, {n: t.to(torch.int32).numpy() for n, t in feed.items()})[0]


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[AppArgs, str, dict]:
    args = bert_args()
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    res = export_source(args.model, path, args.bucket_set())
    assert res.plugin_nodes == args.model.config["num_hidden_layers"] == 2  # type: ignore[union-attr,index]
    return args, res.path, res.routing or {}


def test_example_bert_exports_one_plugin_node_per_layer(bert_onnx: tuple[AppArgs, str, dict]) -> None:
    args, path, routing = bert_onnx
    proto = onnx.load(path)
    nodes = plugin_nodes(proto)
    assert len(nodes) == 2
    # key lengths computed in the graph from the mask: a fifth input other than the query lengths
    assert all(n.input[3] != n.input[4] for n in nodes)  # type: ignore[attr-defined]
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert routing == {"method": "transformers+sdpa", "routed": 2, "routed_with": {"key lengths": 2}, "left": {}}


def test_example_bert_verifies_on_padded_batches(bert_onnx: tuple[AppArgs, str, dict]) -> None:
    args, path, _ = bert_onnx
    assert verify_source(args.model, path, args.bucket_set()) < 1e-4


@pytest.mark.parametrize("n", [9, 64, 300])
def test_example_bert_padded_rows_equal_each_sequence_alone(bert_onnx: tuple[AppArgs, str, dict], n: int) -> None:
    # ONNX Runtime on a padded batch against the eager unrouted model: the batch with the same
    # mask (every row), and each sequence run alone without padding (its kept rows).
    args, path, _ = bert_onnx
    model = load_source(args.model).module
    lengths = ragged_lengths(3, n)
    assert lengths == [n, n // 2, 1]
    ids = torch.randint(1, 64, (3, n), generator=torch.Generator().manual_seed(n))
    mask = (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()
    got = torch.from_numpy(run_onnx(path, {"input_ids": ids, "attention_mask": mask}))
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got, batch, rtol=1e-4, atol=1e-4)
        for i, m in enumerate(lengths):
            alone = model(input_ids=ids[i : i + 1, :m]).last_hidden_state[0]
            torch.testing.assert_close(got[i, :m], alone, rtol=1e-4, atol=1e-4)


def test_a_sent_mask_is_no_promise(tmp_path: Path) -> None:
    # Without fill: mask the mask is the client's: any values, so traced masks are left alone.
    args = bert_args()
    inputs = dict(
        args.model.inputs, attention_mask=args.model.inputs["attention_mask"].model_copy(update={"fill": None})
    )
    spec = args.model.model_copy(update={"inputs": inputs})
    res = export_source(spec, tmp_path / "sent.onnx", args.bucket_set())
    assert res.plugin_nodes == 0
    assert left_alone(res.routing, "while tracing (values unknown)") == 2
    assert verify_source(spec, res.path, args.bucket_set()) < 1e-4


def llama_spec() -> SourceSpec:
    return SourceSpec.model_validate(
        {
            "source": "transformers",
            "class": "LlamaForCausalLM",
            "config": {
                "vocab_size": 64,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
                "use_cache": False,
            },
            "inputs": {
                "input_ids": {"axes": ["S"], "dtype": "int64"},
                "attention_mask": {"axes": ["S"], "dtype": "int64", "fill": "mask"},
            },
            "output": {"name": "logits", "select": "logits", "axes": ["S", 64]},
            "bucketed_axis": "S",
            "batching": "pad",
        }
    )


def test_causal_model_with_the_promise_keeps_its_masks(tmp_path: Path) -> None:
    # Llama's masks are causal and padding: with fill: mask the promise is given, but its modules
    # are causal, so no mask becomes lengths, and ONNX Runtime equals eager on padded batches.
    spec, buckets = llama_spec(), Buckets((16, 32))
    res = export_source(spec, tmp_path / "llama.onnx", buckets)
    assert res.plugin_nodes == 0
    reason = "while tracing (values unknown; key_padding_masks does not hold for a causal module)"
    assert left_alone(res.routing, reason) == 2
    assert verify_source(spec, res.path, buckets) < 1e-4


# --------------------------------------------------------------------------- a python model calling SDPA
class PaddedAttention(nn.Module):
    """One attention over ``x`` with the server's mask as SDPA's key-padding mask; ``reverse``
    reads it back to front (kept keys a suffix): a model that breaks the promise."""

    def __init__(self, reverse: bool = False) -> None:
        super().__init__()
        self.reverse = reverse
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        keep = mask.flip(-1) if self.reverse else mask
        return (
            F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).transpose(1, 2).reshape(b, s, 16)
        )


def prefix_model() -> nn.Module:
    return PaddedAttention()


def suffix_model() -> nn.Module:
    return PaddedAttention(reverse=True)


def python_spec(factory: str) -> SourceSpec:
    return SourceSpec.model_validate(
        {
            "source": "python",
            "factory": f"tests.fa3trt.models.test_sources_masks:{factory}",
            "routing": "sdpa",
            "inputs": {"x": {"axes": ["S", 16]}, "mask": {"axes": ["S"], "dtype": "bool", "fill": "mask"}},
            "output": {"name": "y", "axes": ["S", 16]},
            "bucketed_axis": "S",
            "batching": "pad",
        }
    )


def test_python_model_mask_becomes_key_lengths(tmp_path: Path) -> None:
    spec, buckets = python_spec("prefix_model"), Buckets((8, 24))
    res = export_source(spec, tmp_path / "m.onnx", buckets)
    assert res.plugin_nodes == 1
    assert verify_source(spec, res.path, buckets) < 1e-4


def test_verification_catches_a_broken_promise(tmp_path: Path) -> None:
    # Kept keys a suffix: the count is right, the keys are not. Full masks cannot tell; the
    # padded masks verify_source feeds do.
    spec, buckets = python_spec("suffix_model"), Buckets((8, 24))
    res = export_source(spec, tmp_path / "m.onnx", buckets)
    assert res.plugin_nodes == 1
    with pytest.raises(ExportError, match="ONNX Runtime output differs from PyTorch"):
        verify_source(spec, res.path, buckets)


def test_samples_make_padded_masks_from_lengths() -> None:
    sig = bert_args().model.signature()
    made = sig.samples({"S": 5}, 3, lengths=[5, 2, 1])
    assert made["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert made["attention_mask"].dtype == torch.int64
    assert sig.samples({"S": 5}, 2)["attention_mask"].tolist() == [[1] * 5] * 2  # default: full
    with pytest.raises(ConfigError, match=r"lengths \[5, 0\] must be 2 values .* in \[1, 5\]"):
        sig.samples({"S": 5}, 2, lengths=[5, 0])
    assert ragged_lengths(4, 1) == [1, 1, 1, 1]
    assert ragged_lengths(1, 9) == [9]
