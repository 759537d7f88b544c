"""Optimization profiles and IO checks of an engine built from a model's signature: plain
functions, tested without TensorRT."""

from __future__ import annotations

import json

import pytest

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.signature import Signature, TensorSpec
from fa3trt.trt.profiles import (
    Profile,
    batch_limits,
    dtype_fits,
    io_differences,
    profiles,
    select_profile,
    signature_differences,
)


def dit_signature() -> Signature:
    """Tokens (S, 8), a context (T, 4) over a range, lengths and a mask filled by the server."""
    return Signature(
        inputs=(
            TensorSpec("x", "float32", ("S", 8)),
            TensorSpec("context", "bfloat16", ("T", 4)),
            TensorSpec("seq_lens", "int32", (), fill="lengths"),
            TensorSpec("mask", "int64", ("S",), fill="mask"),
        ),
        output=TensorSpec("y", "float32", ("S", 8)),
        bucketed="S",
        ranges={"T": (2, 10)},
        batching="pad",
    )


# --------------------------------------------------------------------------- profiles


def test_one_profile_per_bucket_per_named_axis() -> None:
    buckets = Buckets((16, 64))
    assert batch_limits(buckets, 128) == [8, 2]
    p0, p1 = profiles(dit_signature(), buckets, [8, 2])
    assert (p0.index, p0.bucket_edge, p1.index, p1.bucket_edge) == (0, 16, 1, 64)
    assert p0.shapes == {
        "x": ((1, 1, 8), (8, 16, 8), (8, 16, 8)),
        "context": ((1, 2, 4), (8, 10, 4), (8, 10, 4)),  # the named range, opt at its max
        "seq_lens": ((1,), (8,), (8,)),
        "mask": ((1, 1), (8, 16), (8, 16)),
    }
    assert p1.shapes["x"] == ((1, 17, 8), (2, 64, 8), (2, 64, 8))  # the bucket's range
    assert p1.shapes["mask"] == ((1, 17), (2, 64), (2, 64))
    # Through JSON and back, as in the engine metadata.
    assert Profile.from_dict(json.loads(json.dumps(p1.to_dict()))) == p1


def test_unbatched_inputs_have_no_batch_axis() -> None:
    sig = Signature(
        inputs=(TensorSpec("img", "float32", ("I", 8)), TensorSpec("img_ids", "float32", ("I", 3), batched=False)),
        output=TensorSpec("out", "float32", ("I", 8)),
        bucketed="I",
    )
    (p,) = profiles(sig, Buckets((32,)), [4])
    assert p.shapes == {"img": ((1, 1, 8), (4, 32, 8), (4, 32, 8)), "img_ids": ((1, 3), (32, 3), (32, 3))}


def test_profile_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"batch limits \[8\] must give one limit per bucket \[16, 64\]"):
        profiles(dit_signature(), Buckets((16, 64)), [8])
    with pytest.raises(ConfigError, match="integers >= 1"):
        profiles(dit_signature(), Buckets((16,)), [0])
    with pytest.raises(ConfigError, match="max_batch_tokens must be an integer >= 1, got 0"):
        batch_limits(Buckets((16,)), 0)


def test_select_profile_and_its_errors() -> None:
    sig = dit_signature()
    found = profiles(sig, Buckets((16, 64)), [8, 2])

    def shapes(b: int, s: int, t: int) -> dict[str, tuple[int, ...]]:
        return {"x": (b, s, 8), "context": (b, t, 4), "seq_lens": (b,), "mask": (b, s)}

    assert select_profile(found, shapes(8, 16, 10), sig) == 0
    assert select_profile(found, shapes(1, 17, 2), sig) == 1
    with pytest.raises(InvalidInputError, match=r"input 'x' has S=65 \(axis 1\), outside the engine's range \[1, 64\]"):
        select_profile(found, shapes(1, 65, 2), sig)
    with pytest.raises(InvalidInputError, match=r"input 'context' has T=11 \(axis 1\), outside .*\[2, 10\]"):
        select_profile(found, shapes(1, 8, 11), sig)
    with pytest.raises(InvalidInputError, match="fits no optimization profile .*split the batch"):
        select_profile(found, shapes(3, 40, 2), sig)  # bucket 64 takes 2 at most
    with pytest.raises(InvalidInputError, match=r"lacks inputs \['mask'\]"):
        select_profile(found, {"x": (1, 8, 8), "context": (1, 2, 4), "seq_lens": (1,)}, sig)


# --------------------------------------------------------------------------- IO and signature checks


def test_io_differences_name_the_tensor() -> None:
    sig = dit_signature()
    good = {
        "x": ("float16", 3, True),  # any float: the exported model's dtype
        "context": ("float16", 3, True),
        "seq_lens": ("int32", 1, True),
        "mask": ("int32", 2, True),  # int64 declared: int32 in the engine
        "y": ("float16", 3, False),
    }
    assert io_differences(sig, good) == []
    assert dtype_fits("int64", "int64") and not dtype_fits("int32", "int64") and not dtype_fits("bool", "float32")
    bad = dict(good, mask=("float32", 1, True), extra=("float32", 2, True))
    del bad["seq_lens"]
    problems = io_differences(sig, bad)
    assert any("input 'seq_lens' is declared but the graph has no such input" in p for p in problems)
    assert any("graph input 'extra' is not declared" in p for p in problems)
    assert any("input 'mask' has rank 1 in the graph; the signature gives rank 2" in p for p in problems)
    assert any(
        "input 'mask' is float32 in the graph; declared int64 (the graph must take int32)" in p for p in problems
    )
    renamed = dict(good, out=good["y"])
    del renamed["y"]
    assert io_differences(sig, renamed) == ["the graph's outputs are ['out']; the signature's output is 'y'"]


def test_signature_differences_where_the_engine_cares() -> None:
    sig = dit_signature()
    assert signature_differences(sig, sig) == []
    shape_batched = Signature(sig.inputs, sig.output, sig.bucketed, sig.ranges, "shape")
    assert signature_differences(sig, shape_batched) == []  # batching is the server's business
    narrower = Signature(sig.inputs, sig.output, sig.bucketed, {"T": (3, 8)}, "pad")
    assert signature_differences(sig, narrower) == []  # the engine covers what the server admits
    wider = Signature(sig.inputs, sig.output, sig.bucketed, {"T": (2, 20)}, "pad")
    assert signature_differences(sig, wider) == ["axis T: the engine takes [2, 10], the server admits [2, 20]"]
    other = (TensorSpec("x", "float32", ("S", 16)), *sig.inputs[1:])
    assert signature_differences(sig, Signature(other, sig.output, "S", sig.ranges, "pad")) == [
        "input 'x': axes ['S', 8] in the engine, ['S', 16] expected"
    ]


def test_the_reference_models_profiles() -> None:
    """The reference model is one more signature: x (B, S, hidden) and seq_lens (B,), a profile per bucket."""
    from fa3trt.models.reference import ModelConfig, reference_signature

    sig = reference_signature(ModelConfig.preset("tiny"))
    p = profiles(sig, Buckets((256, 1024, 4096)), batch_limits(Buckets((256, 1024, 4096)), 16384))
    assert [q.shapes["x"] for q in p] == [
        ((1, 1, 256), (64, 256, 256), (64, 256, 256)),
        ((1, 257, 256), (16, 1024, 256), (16, 1024, 256)),
        ((1, 1025, 256), (4, 4096, 256), (4, 4096, 256)),
    ]
    assert [q.shapes["seq_lens"] for q in p] == [((1,), (64,), (64,)), ((1,), (16,), (16,)), ((1,), (4,), (4,))]
    assert batch_limits(Buckets((100, 5000)), 1000) == [10, 1]  # never below one sequence


def test_profiles_hold_only_sizes_the_model_accepts() -> None:
    """Latent axes that are multiples of a patch size, with a lower bound: each profile spans the
    accepted sizes of its bucket, opt at the largest."""
    sig = Signature(
        inputs=(TensorSpec("hidden_states", "float32", (4, "H", "W")), TensorSpec("context", "float32", ("T", 32))),
        output=TensorSpec("sample", "float32", (4, "H", "W")),
        bucketed="H",
        ranges={"H": (4, 64), "W": (3, 33), "T": (2, 10)},
        steps={"H": 2, "W": 2},
    )
    p0, p1 = profiles(sig, Buckets((16, 64)), [4, 1])
    assert p0.shapes["hidden_states"] == ((1, 4, 4, 4), (4, 4, 16, 32), (4, 4, 16, 32))
    assert p1.shapes["hidden_states"] == ((1, 4, 18, 4), (1, 4, 64, 32), (1, 4, 64, 32))
    assert p1.shapes["context"] == ((1, 2, 32), (1, 10, 32), (1, 10, 32))
