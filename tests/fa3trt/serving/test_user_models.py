"""A user's model through the one serving path on the CPU: the signature's checks and batches,
and the start-up proof that ``batching: pad`` is exact (tiny transformers BERT, random weights)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from fa3trt.buckets import Buckets
from fa3trt.config import AppArgs
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.models.spec import SourceSpec
from fa3trt.requests import check_request
from fa3trt.serving import load_backend
from fa3trt.serving.batch import assemble, split
from fa3trt.serving.torch_backend import TorchBackend
from fa3trt.serving.warmup import check_padding
from tests.models import BERT_CONFIG

BUCKETS = Buckets((16, 64))


def bert_spec(mask: bool) -> SourceSpec:
    inputs: dict[str, Any] = {"input_ids": {"axes": ["S"], "dtype": "int64"}}
    if mask:
        inputs["attention_mask"] = {"axes": ["S"], "dtype": "int64", "fill": "mask"}
    args = AppArgs.model_validate(
        {
            "model": {
                "source": "transformers",
                "class": "BertModel",
                "config": {**BERT_CONFIG, "max_position_embeddings": 64},
                "inputs": inputs,
                "output": {"name": "h", "select": "last_hidden_state", "axes": ["S", 32]},
                "bucketed_axis": "S",
                "batching": "pad",
            },
            "buckets": list(BUCKETS.edges),
        }
    )
    assert isinstance(args.model, SourceSpec)
    return args.model


def test_the_identity_backend_is_refused_where_no_input_is_shaped_as_the_output() -> None:
    # It answers with the request's input: token ids are not the hidden states it returns.
    with pytest.raises(
        ConfigError, match="backend 'identity' answers each request with its input.*'torch', 'tensorrt' or 'auto'"
    ):
        load_backend("identity", bert_spec(mask=True), buckets=BUCKETS)


def test_padding_is_proved_exact_with_a_mask_and_refused_without() -> None:
    backend = TorchBackend(bert_spec(mask=True), "cpu")
    assert check_padding(backend, BUCKETS) < 1e-5
    # Without the mask, the padding tokens are attended to: the answer changes, and the replica refuses to start.
    leaky = TorchBackend(bert_spec(mask=False), "cpu")
    with pytest.raises(ConfigError, match="batching: pad is not exact for this model.*use batching: shape"):
        check_padding(leaky, BUCKETS)


def test_a_padded_batch_answers_each_request_as_alone() -> None:
    """Against the eager unrouted model run on each sequence alone."""
    spec = bert_spec(mask=True)
    backend = TorchBackend(spec, "cpu")
    sig = backend.signature
    rng = np.random.default_rng(0)
    reqs = [check_request(sig, {"input_ids": rng.integers(0, 64, n)}, BUCKETS) for n in (5, 16, 9)]
    assert [r.bucket for r in reqs] == [0, 0, 0] and [r.length for r in reqs] == [5, 16, 9]
    batch = assemble(sig, reqs, backend.device).inputs
    assert batch["attention_mask"].tolist()[0] == [1] * 5 + [0] * 11 and batch["input_ids"].shape == (3, 16)
    answers = split(sig, backend.run(batch), reqs)
    for r, a in zip(reqs, answers):
        ids = torch.from_numpy(r.tensors["input_ids"])[None]
        with torch.inference_mode():
            want = backend.module(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        assert a.shape == (r.length, 32)
        np.testing.assert_allclose(a, want.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"input_ids": np.arange(3), "attention_mask": np.ones(3)}, "unexpected ['attention_mask']"),
        ({}, "missing ['input_ids']"),
        ({"input_ids": np.zeros((2, 3), np.int64)}, "'input_ids' has shape (2, 3) (rank 2); it must have rank 1"),
        ({"input_ids": np.full(3, 0.5)}, "'input_ids' has dtype float64; send integers (int64)"),
        (
            {"input_ids": np.zeros(65, np.int64)},
            "input 'input_ids', axis S: sequence length 65 exceeds the largest bucket (64)",
        ),
        ({"input_ids": [2**40]}, None),
        ("ids", "a request is a mapping of input name -> array"),
    ],
)
def test_bad_requests_name_the_input(request_: Any, message: str | None) -> None:
    sig = bert_spec(mask=True).signature()
    if message is None:  # 2**40 fits int64: accepted
        assert check_request(sig, request_, BUCKETS).tensors["input_ids"].dtype == np.int64
        return
    with pytest.raises(InvalidInputError) as e:
        check_request(sig, request_, BUCKETS)
    assert message in str(e.value)


def test_compile_serves_a_routed_model_with_the_eager_models_answers() -> None:
    """``compile: true``: the model under torch.compile, its routed attention one op node in the
    graph (tests/fa3trt/attention/test_routing_compile.py counts them); the answers are the eager
    unrouted model's, padded batch or not."""
    spec = bert_spec(mask=True)
    compiled = TorchBackend(spec, "cpu", compile=True)
    eager = TorchBackend(spec, "cpu")
    sig = compiled.signature
    rng = np.random.default_rng(3)
    for lengths in ((7, 16, 3), (12,)):
        reqs = [check_request(sig, {"input_ids": rng.integers(0, 64, n)}, BUCKETS) for n in lengths]
        batch = assemble(sig, reqs, compiled.device).inputs
        for got, r in zip(split(sig, compiled.run(batch), reqs), reqs):
            ids = torch.from_numpy(r.tensors["input_ids"])[None]
            with torch.inference_mode():
                want = eager.module(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    assert compiled.describe()["compile"] and compiled.routing.routed > 0 and compiled.routing.left == {}
