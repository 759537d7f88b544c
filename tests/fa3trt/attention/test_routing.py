"""``fa3trt.route_attention`` on real diffusers, transformers and torch classes (tiny configs,
random weights, CPU): the routed model against the same model unrouted (eager, an independent
reference), and the report's counts exactly.

Calls that need the generalized op (``seq_lens_k``, ``causal``, ``softmax_scale``) are routed only
once it is in the tree; until then the assertions about them skip, naming what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from fa3trt import ConfigError, RoutingReport, route_attention
from fa3trt.attention.op import onnx_export_mode
from fa3trt.onnx.node import translation_table
from tests.models import flux_inputs, tiny_bert, tiny_flux

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-5
CAUSAL_ROWS = "attn_mask (B,1,S,S) bool: query rows differ (causal or another per-query mask)"


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


# --------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def flux() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = tiny_flux()
    return model, flux_inputs()


@pytest.fixture(scope="module")
def wan() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    ).eval()
    b = 2  # 2 frames of 8x8 in 2x2 patches: 32 video tokens; 7 text tokens
    inputs = {
        "hidden_states": torch.randn(b, 4, 2, 8, 8),
        "timestep": torch.full((b,), 10),
        "encoder_hidden_states": torch.randn(b, 7, 32),
    }
    return model, inputs


def test_flux_routes_one_call_per_block(flux: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = flux
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        with route_attention(model) as report:
            got = model(**inputs, return_dict=False)[0]
    close(got, expected)
    # two joint (image + text) blocks and two single blocks: one self-attention call each
    assert report.as_dict() == {"method": "sdpa", "routed": 4, "routed_with": {}, "left": {}}


def test_wan_routes_self_and_cross_attention(wan: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    model, inputs = wan
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        with route_attention(model, "sdpa") as report:
            got = model(**inputs, return_dict=False)[0]
    close(got, expected)
    assert report.routed + sum(report.left.values()) == 4  # self + cross per block, 2 blocks
    assert report.routed >= 2  # the two self-attention calls (32 queries, 32 keys)
    # cross-attention: 32 video queries over 7 text keys
    assert report.as_dict() == {"method": "sdpa", "routed": 4, "routed_with": {"Sq != Sk": 2}, "left": {}}


def sd3() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8),
        "encoder_hidden_states": torch.randn(2, 5, 32),
        "pooled_projections": torch.randn(2, 32),
        "timestep": torch.full((2,), 3),
    }
    return model, inputs


def cogvideox() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=5,
        patch_size=2,
        max_text_seq_length=6,
    )
    inputs = {
        "hidden_states": torch.randn(2, 2, 4, 8, 8),
        "encoder_hidden_states": torch.randn(2, 6, 32),
        "timestep": torch.full((2,), 3),
    }
    return model, inputs


@pytest.mark.parametrize("make", [sd3, cogvideox])
def test_processors_that_call_sdpa_directly_are_routed(make: Callable[[], tuple[torch.nn.Module, dict]]) -> None:
    # diffusers' attention dispatcher does not see these two; SDPA interception does
    torch.manual_seed(0)
    model, inputs = make()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        with route_attention(model) as report:
            got = model(**inputs, return_dict=False)[0]
    close(got, expected)
    assert report.as_dict() == {"method": "sdpa", "routed": 2, "routed_with": {}, "left": {}}  # one per block


def custom_attn_nodes(program: torch.export.ExportedProgram) -> int:
    return sum("custom_attn" in str(n.target) for n in program.graph.nodes)


def test_flux_export_holds_one_plugin_node_per_routed_call(
    flux: tuple[torch.nn.Module, dict[str, torch.Tensor]],
) -> None:
    model, inputs = flux
    batch, image, text = (torch.export.Dim(n, min=2, max=64) for n in ("B", "I", "T"))
    dynamic = {
        "hidden_states": {0: batch, 1: image},
        "encoder_hidden_states": {0: batch, 1: text},
        "pooled_projections": {0: batch},
        "timestep": {0: batch},
        "img_ids": {0: image},
        "txt_ids": {0: text},
    }
    # dynamic image and text lengths: the joint attention's Sq == Sk holds symbolically, no guard
    with torch.no_grad(), route_attention(model) as report:
        program = torch.export.export(model, (), inputs, dynamic_shapes=dynamic)
    assert report.routed == custom_attn_nodes(program) == 4 and not report.left
    with torch.no_grad(), route_attention(model) as report, onnx_export_mode():
        onnx_program = torch.onnx.export(
            model,
            (),
            kwargs={**inputs, "return_dict": False},
            dynamo=True,
            custom_translation_table=translation_table(),
            verbose=False,
        )
    assert onnx_program is not None
    nodes = [n.op_type for n in onnx_program.model_proto.graph.node]
    assert nodes.count("CustomAttnPlugin") == report.routed == 4


def test_wan_export_keeps_the_text_length_dynamic(wan: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    # Sq != Sk is decided without a guard: a text length of 32 (the video's) is not excluded
    model, inputs = wan
    batch, text = torch.export.Dim("B", min=1, max=8), torch.export.Dim("T", min=2, max=64)
    dynamic = {"hidden_states": {0: batch}, "timestep": {0: batch}, "encoder_hidden_states": {0: batch, 1: text}}
    with torch.no_grad(), route_attention(model) as report:
        program = torch.export.export(model, (), inputs, dynamic_shapes=dynamic)
    assert report.routed == custom_attn_nodes(program) == 4


# --------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_bert()


LENGTHS = [10, 6, 3]


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (len(LENGTHS), max(LENGTHS)))
    mask = (torch.arange(max(LENGTHS))[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize(
    "method, hooks", [("auto", "transformers+sdpa"), ("transformers", "transformers"), ("sdpa", "sdpa")]
)
def test_bert_padding_mask_becomes_key_lengths(bert: torch.nn.Module, method: str, hooks: str) -> None:
    ids, mask = padded_batch()
    implementation = bert.config._attn_implementation
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        with route_attention(bert, method) as report:
            got = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert bert.config._attn_implementation == implementation  # restored
        valid = mask.bool()
        close(got[valid], expected[valid])
        # the padded batch through lengths equals each sequence run alone, row for row
        for i, n in enumerate(LENGTHS):
            alone = bert(input_ids=ids[i : i + 1, :n]).last_hidden_state[0]
            close(got[i, :n], alone)
    assert report.as_dict() == {"method": hooks, "routed": 2, "routed_with": {"key lengths": 2}, "left": {}}


def test_bert_padded_rows_equal_too_with_seq_lens_k(bert: torch.nn.Module) -> None:
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        with route_attention(bert):
            got = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    close(got, expected)


@pytest.mark.parametrize("method", ["transformers", "sdpa"])
def test_dropout_in_training_is_left_alone(method: str) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    config.attention_probs_dropout_prob = 0.5
    model = transformers.BertModel(config).train()
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.manual_seed(2)
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with route_attention(model, method) as report:
            torch.manual_seed(2)
            got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert report.routed == 0 and report.left == {"dropout_p > 0": 2}


def test_inputs_that_need_grad_are_left_alone(bert: torch.nn.Module) -> None:
    ids, mask = padded_batch()
    with route_attention(bert) as report:
        bert(input_ids=ids, attention_mask=mask)
    assert report.routed == 0 and report.left == {"inputs require grad (the op has no backward)": 2}


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["auto", "sdpa"])
def test_llama_causal_masks_are_left_alone(llama: torch.nn.Module, method: str) -> None:
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = llama(input_ids=ids, attention_mask=mask).logits
        with route_attention(llama, method) as report:
            got = llama(input_ids=ids, attention_mask=mask).logits
    close(got, expected)
    # causal + padding: a (B,1,S,S) mask whose rows differ, never turned into lengths
    assert report.routed == 0 and report.left == {CAUSAL_ROWS: 2}


def test_llama_without_mask_is_causal_with_grouped_heads(llama: torch.nn.Module) -> None:
    ids, _ = padded_batch()
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        with route_attention(llama) as report:
            got = llama(input_ids=ids).logits
    close(got, expected)
    assert report.routed == 2 and report.routed_with == {"causal": 2, "grouped heads": 2} and not report.left


@pytest.mark.parametrize("name, with_mask", [("bert", True), ("llama", True), ("llama", False)])
def test_masks_are_left_alone_while_exporting(request: pytest.FixtureRequest, name: str, with_mask: bool) -> None:
    # Exporting, transformers materializes every mask (a causal one too) and its values are unknown:
    # none becomes lengths, so the program computes what the eager model does.
    model = request.getfixturevalue(name)
    ids, mask = padded_batch()
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask} if with_mask else {"input_ids": ids}
    if name == "llama":
        inputs["use_cache"] = False  # no KV cache in the program's outputs
    with torch.no_grad(), route_attention(model) as report:
        program = torch.export.export(model, (), inputs)
    assert custom_attn_nodes(program) == 0
    assert report.routed == 0 and report.left == {"attn_mask (B,1,S,S) bool while tracing (values unknown)": 2}
    with torch.no_grad():
        expected = model(**inputs)[0]
        close(program.module()(**inputs)[0], expected)


PROMISE_CAUSAL = (
    "attn_mask (B,1,S,S) bool while tracing (values unknown; key_padding_masks does not hold for a causal module)"
)


def test_promised_padding_masks_become_key_lengths_while_exporting(bert: torch.nn.Module) -> None:
    # The promise: transformers' (B,1,S,S) encoder masks become key lengths counted in the graph,
    # over dynamic batch and length, and the program equals the eager model on padded batches.
    ids, mask = padded_batch()
    batch, seq = torch.export.Dim("B", min=1, max=8), torch.export.Dim("S", min=2, max=32)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with torch.no_grad(), route_attention(bert, key_padding_masks=True) as report:
        program = torch.export.export(bert, (), {"input_ids": ids, "attention_mask": mask}, dynamic_shapes=dynamic)
    assert custom_attn_nodes(program) == 2
    assert report.as_dict() == {
        "method": "transformers+sdpa",
        "routed": 2,
        "routed_with": {"key lengths": 2},
        "left": {},
    }
    with torch.no_grad():
        for n in (7, 10, 20):  # other lengths than traced; rows padded to n
            ids_n = torch.randint(1, 64, (3, n), generator=torch.Generator().manual_seed(n))
            mask_n = (torch.arange(n)[None, :] < torch.tensor([n, n // 2, 1])[:, None]).long()
            expected = bert(input_ids=ids_n, attention_mask=mask_n).last_hidden_state
            close(program.module()(input_ids=ids_n, attention_mask=mask_n)[0], expected)


@pytest.mark.parametrize("method", ["auto", "sdpa"])
def test_promise_is_not_taken_for_causal_modules(llama: torch.nn.Module, method: str) -> None:
    # Llama's masks are causal and padding: row 0 keeps one key. Its modules say is_causal, so the
    # promise does not hold there (the SDPA hook: any causal module of the model) and they stay masks.
    ids, mask = padded_batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    with torch.no_grad(), route_attention(llama, method, key_padding_masks=True) as report:
        program = torch.export.export(llama, (), inputs)
    assert custom_attn_nodes(program) == 0
    assert report.routed == 0 and report.left == {PROMISE_CAUSAL: 2}
    with torch.no_grad():
        close(program.module()(**inputs)[0], llama(**inputs)[0])


def test_promise_changes_nothing_eagerly(llama: torch.nn.Module, bert: torch.nn.Module) -> None:
    # Eagerly the values are read and checked as without the promise: Llama's causal masks stay
    # masks (rows differ), BERT's padding masks become lengths.
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = llama(input_ids=ids, attention_mask=mask).logits
        with route_attention(llama, "sdpa", key_padding_masks=True) as report:
            got = llama(input_ids=ids, attention_mask=mask).logits
    close(got, expected)
    assert report.routed == 0 and report.left == {CAUSAL_ROWS: 2}
    with torch.no_grad(), route_attention(bert, key_padding_masks=True) as report:
        bert(input_ids=ids, attention_mask=mask)
    assert report.routed_with == {"key lengths": 2} and not report.left


# --------------------------------------------------------------------------- the rules, one SDPA call each
B, H, S, D = 2, 4, 6, 8
KEEP = torch.arange(S)[None, :] < torch.tensor([S, 4])[:, None]  # (B, S): key lengths 6 and 4
PAD = KEEP[:, None, None, :]  # (B,1,1,S)


def additive(keep: torch.Tensor, masked: float) -> torch.Tensor:
    return torch.zeros(keep.shape).masked_fill(~keep, masked)


def qkv(hk: int = H, sk: int = S, sq: int = S, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, H, sq, D, generator=g, dtype=dtype),) + tuple(
        torch.randn(B, hk, sk, D, generator=g, dtype=dtype) for _ in range(2)
    )


# (name, q/k/v, SDPA kwargs, expected: a tuple of what the routed call needed, or the reason it
# was left alone; a reason of the form "general:<needs>|<reason before it>" depends on the op).
RULES = [
    ("bool key padding (B,1,1,S)", qkv(), {"attn_mask": PAD}, ("key lengths",)),
    ("additive -inf key padding", qkv(), {"attn_mask": additive(PAD, float("-inf"))}, ("key lengths",)),
    (
        "additive dtype-min padding, expanded (B,1,S,S)",
        qkv(),
        {"attn_mask": additive(PAD, torch.finfo(torch.float32).min).expand(B, 1, S, S)},
        ("key lengths",),
    ),
    (
        "bool (B,1,S,S) with equal rows, materialized",
        qkv(),
        {"attn_mask": PAD.expand(B, 1, S, S).clone()},
        ("key lengths",),
    ),
    ("mask keeping every key", qkv(), {"attn_mask": torch.ones(B, 1, 1, S, dtype=torch.bool)}, ()),
    ("grouped heads", qkv(hk=2), {"enable_gqa": True}, ("grouped heads",)),
    (
        "kept keys not a prefix",
        qkv(),
        {"attn_mask": torch.tensor([True, False, True, True, True, True]).expand(B, 1, 1, S)},
        "attn_mask (B,1,1,S) bool: kept keys are not a prefix",
    ),
    (
        "a bias",
        qkv(),
        {"attn_mask": torch.randn(B, 1, 1, S)},
        "attn_mask (B,1,1,S) additive: values other than 0, -inf and the dtype's min",
    ),
    (
        "causal (S,S)",
        qkv(),
        {"attn_mask": torch.ones(S, S, dtype=torch.bool).tril()},
        "attn_mask (S,S) bool: not a key-padding shape",
    ),
    (
        "causal (B,1,S,S)",
        qkv(),
        {"attn_mask": torch.ones(S, S, dtype=torch.bool).tril().expand(B, 1, S, S)},
        CAUSAL_ROWS,
    ),
    (
        "per-head (B,H,S,S)",
        qkv(),
        {"attn_mask": PAD.expand(B, H, S, S)},
        "attn_mask (B,H,S,S) bool: not a key-padding shape",
    ),
    (
        "a sequence keeping no key",
        qkv(),
        {"attn_mask": torch.zeros(B, 1, 1, S, dtype=torch.bool).index_fill(0, torch.tensor([0]), True)},
        "attn_mask (B,1,1,S) bool: a sequence keeps no key",
    ),
    ("float64", qkv(dtype=torch.float64), {}, "dtype torch.float64"),
    ("is_causal with Sq != Sk", qkv(sk=9), {"is_causal": True}, "is_causal with Sq != Sk (top-left alignment)"),
    ("is_causal", qkv(), {"is_causal": True}, ("causal",)),
    ("Sq != Sk", qkv(sk=9), {}, ("Sq != Sk",)),
    ("a scale", qkv(), {"scale": 0.5}, ()),
]


@pytest.mark.parametrize("name, tensors, kwargs, expected", RULES, ids=[r[0] for r in RULES])
def test_sdpa_rules(name: str, tensors: tuple[torch.Tensor, ...], kwargs: dict, expected: tuple | str) -> None:
    q, k, v = tensors
    reference = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with route_attention(torch.nn.Identity(), "sdpa") as report:
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    if isinstance(expected, str):
        assert report.routed == 0 and report.left == {expected: 1}
        close(got, reference)
        return
    assert report.routed == 1 and not report.left
    assert report.routed_with == dict.fromkeys(expected, 1)
    close(got, reference)


class MaskedSDPA(torch.nn.Module):
    def __init__(self, causal_module: bool = False) -> None:
        super().__init__()
        if causal_module:
            self.is_causal = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# (name, the mask, a causal module, q/k/v dtype, expected: the routed call's needs, or why it was left alone)
PROMISED = [
    ("bool (B,1,1,S)", PAD, False, torch.float32, ("key lengths",)),
    ("additive -inf (B,1,1,S)", additive(PAD, float("-inf")), False, torch.float32, ("key lengths",)),
    (
        "additive dtype-min (B,1,S,S)",
        additive(PAD, torch.finfo(torch.float32).min).expand(B, 1, S, S).clone(),
        False,
        torch.float32,
        ("key lengths",),
    ),
    ("one mask for the batch (1,1,1,S)", PAD[1:], False, torch.float32, ("key lengths",)),
    (
        "per-head (B,H,S,S)",
        PAD.expand(B, H, S, S).clone(),
        False,
        torch.float32,
        "attn_mask (B,H,S,S) bool: not a key-padding shape",
    ),
    (
        "float32 mask, bfloat16 q",
        additive(PAD, float("-inf")),
        False,
        torch.bfloat16,
        "attn_mask (B,1,1,S) additive: dtype torch.float32",
    ),
    (
        "a causal module",
        PAD,
        True,
        torch.float32,
        "attn_mask (B,1,1,S) bool while tracing (values unknown; key_padding_masks does not hold for a causal module)",
    ),
]


@pytest.mark.parametrize("name, mask, causal_module, dtype, expected", PROMISED, ids=[r[0] for r in PROMISED])
def test_sdpa_rules_under_the_promise_while_exporting(
    name: str, mask: torch.Tensor, causal_module: bool, dtype: torch.dtype, expected: tuple | str
) -> None:
    model = MaskedSDPA(causal_module)
    q, k, v = qkv(dtype=dtype)
    with route_attention(model, "sdpa", key_padding_masks=True) as report:
        program = torch.export.export(model, (q, k, v, mask))
    if isinstance(expected, str):
        assert custom_attn_nodes(program) == 0 and report.routed == 0 and report.left == {expected: 1}
    else:
        assert custom_attn_nodes(program) == 1 and not report.left
        assert report.routed_with == dict.fromkeys(expected, 1)
    # the program (lengths counted in the graph) against PyTorch's SDPA with the mask
    close(program.module()(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_promise_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="key_padding_masks must be True or False, got 'yes'"):
        route_attention(torch.nn.Identity(), key_padding_masks="yes").__enter__()  # type: ignore[arg-type]


def test_multihead_attention_runs_as_it_would() -> None:
    """nn.MultiheadAttention: its fused fast path (eval, no grad) calls no SDPA and is not seen;
    its other path calls SDPA by name, routed exactly."""
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        with route_attention(mha) as report:
            got = mha(x, x, x, need_weights=False)[0]
    close(got, expected)
    assert report.routed == 0 and report.left == {}
    mha.train()  # no fast path (dropout is 0): multi_head_attention_forward calls SDPA
    with torch.no_grad():
        expected = mha(x, x, x, need_weights=False)[0]
        with route_attention(mha) as report:
            got = mha(x, x, x, need_weights=False)[0]
    close(got, expected)
    assert report.routed == 1, report.as_dict()


def test_sdpa_is_restored_and_other_threads_are_not_routed(
    flux: tuple[torch.nn.Module, dict[str, torch.Tensor]],
) -> None:
    import threading

    sdpa = F.scaled_dot_product_attention
    model, inputs = flux
    seen: list[int] = []
    with torch.no_grad(), route_attention(model) as report:
        assert F.scaled_dot_product_attention is not sdpa
        t = threading.Thread(target=lambda: seen.append(int(model(**inputs).sample.numel())))
        t.start()
        t.join()
        assert seen and report.routed == 0  # the other thread's calls ran on PyTorch's SDPA
        model(**inputs)
        assert report.routed == 4
    assert F.scaled_dot_product_attention is sdpa


# --------------------------------------------------------------------------- methods and the report
def test_unknown_method_is_refused(flux: tuple[torch.nn.Module, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(ConfigError, match=r"\['auto', 'sdpa', 'transformers'\], got 'flash'"):
        route_attention(flux[0], "flash").__enter__()
    with pytest.raises(ConfigError, match="needs a transformers PreTrainedModel"):
        route_attention(flux[0], "transformers").__enter__()


def test_implementation_restored_after_an_error(bert: torch.nn.Module) -> None:
    implementation = bert.config._attn_implementation
    with pytest.raises(RuntimeError, match="inside"), route_attention(bert):
        assert bert.config._attn_implementation == "fa3trt"
        raise RuntimeError("inside")
    assert bert.config._attn_implementation == implementation


def test_summary_is_logged_on_exit(caplog: pytest.LogCaptureFixture) -> None:
    report = RoutingReport("sdpa", 3, {"key lengths": 1}, {"dropout_p > 0": 2})
    assert report.summary() == (
        "route_attention (sdpa): routed 3 attention calls (1 with key lengths); left 2 alone: 2 x dropout_p > 0"
    )
    q, k, v = qkv()
    with (
        caplog.at_level(logging.INFO, logger="fa3trt.attention.routing"),
        route_attention(torch.nn.Identity()) as report,
    ):
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert caplog.messages[-1] == report.summary()
    assert report.summary() == "route_attention (sdpa): routed 0 attention calls; left 1 alone: 1 x dropout_p > 0"


@pytest.mark.gpu
def test_flux_at_its_real_width_routed_on_the_gpu() -> None:
    """FLUX.1's attention width (24 heads of 128, bf16), one joint and one single block at
    1024 image + 128 text tokens: routed to the op's GPU kernel, within bf16 tolerance of the
    unrouted model (diffusers calling PyTorch SDPA)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from bench.routing import flux, inputs

    model = flux(1, 1, "cuda")
    x = inputs(1024, 128, "cuda")
    with torch.no_grad():
        want = model(**x, return_dict=False)[0].float()
        with route_attention(model, "sdpa") as report:
            got = model(**x, return_dict=False)[0].float()
    assert report.routed == 2 and not report.left
    assert float((got - want).norm() / want.norm()) < 2e-2
