"""``fa3trt.attention.routing.compile_routed``: routed models under ``torch.compile`` on the CPU (tiny
diffusers and transformers models, random weights). A counting backend records each graph dynamo
hands it: the routed model compiles to no more graphs than the unrouted one, every routed call
is one ``attn::custom_attn`` node in them, the report counts each call as eager routing does,
and the compiled routed model equals the eager unrouted one.

Graphs are counted with the ``eager`` backend (dynamo's graphs, run as they are); one test runs
them through ``aot_eager`` and inductor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from fa3trt.attention.compiled import CompiledRouted, compile_routed
from fa3trt.attention.kernels.math import Math
from fa3trt.attention.routing import route_attention
from tests.models import flux_inputs, tiny_bert, tiny_flux
from tests.utils import gpu

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SDPA = torch._C._nn.scaled_dot_product_attention
"""``torch.nn.functional.scaled_dot_product_attention`` as dynamo's graphs name it."""
OP = torch.ops.attn.custom_attn.default
PROMISE_UNKNOWN = "attn_mask (B,1,S,S) bool while tracing (values unknown)"


def nodes(counter: CompileCounterWithBackend, target: Any) -> int:
    return sum(n.target is target for g in counter.graphs for n in g.graph.nodes)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each case compiles from nothing: no graph of another case is reused or counted."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def unrouted(model: torch.nn.Module, inputs: dict[str, Any], grad: bool = False) -> CompileCounterWithBackend:
    """The unrouted model's graphs under torch.compile: what the routed one is held to."""
    counter = CompileCounterWithBackend("eager")
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=counter)(**inputs)
    torch._dynamo.reset()
    return counter


def routed(model: torch.nn.Module, **kwargs: Any) -> tuple[CompiledRouted, CompileCounterWithBackend]:
    counter = CompileCounterWithBackend("eager")
    return compile_routed(model, backend=counter, **kwargs), counter


# --------------------------------------------------------------------------- diffusers
@pytest.fixture(scope="module")
def flux() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    return tiny_flux(), flux_inputs()


def test_flux_compiles_to_one_graph_with_one_op_node_per_call(
    flux: tuple[torch.nn.Module, dict[str, torch.Tensor]],
) -> None:
    model, inputs = flux
    before = unrouted(model, inputs)
    assert before.frame_count == 1 and nodes(before, SDPA) == 4  # 2 joint + 2 single blocks
    compiled, counter = routed(model)
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
        got = compiled(**inputs, return_dict=False)[0]
        close(got, expected)
        assert counter.frame_count <= before.frame_count
        assert nodes(counter, OP) == nodes(before, SDPA) and nodes(counter, SDPA) == 0
        assert compiled.last_report is not None
        assert compiled.last_report.as_dict() == {"method": "sdpa", "routed": 4, "routed_with": {}, "left": {}}
        # Again, and with other values: the same graph (no recompile), the same counts per call.
        inputs2 = {k: torch.randn_like(v) if k.endswith("states") else v for k, v in inputs.items()}
        close(compiled(**inputs2, return_dict=False)[0], model(**inputs2, return_dict=False)[0])
    assert counter.frame_count <= before.frame_count
    assert compiled.last_report.routed == 4 and compiled.report.routed == 8 and not compiled.report.left


def test_each_routed_call_runs_the_kernel_once(
    flux: tuple[torch.nn.Module, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU kernel calls PyTorch's SDPA; in a compiled graph no router frame is around the op,
    # so that call must not reach the router (it was routed again: the op ran twice per call).
    model, inputs = flux
    forward = Math.forward
    runs: list[int] = []

    def counted(cls: type[Math], *args: Any, **kwargs: Any) -> torch.Tensor:
        runs.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(Math, "forward", classmethod(counted))
    compiled, _ = routed(model)
    with torch.no_grad():
        compiled(**inputs)
        runs.clear()
        compiled(**inputs)
    assert len(runs) == 4


def test_route_attention_alone_routes_inside_torch_compile(
    flux: tuple[torch.nn.Module, dict[str, torch.Tensor]],
) -> None:
    # torch.compile under an open router routes too (no tracing() needed); the report is right.
    model, inputs = flux
    counter = CompileCounterWithBackend("eager")
    with torch.no_grad(), route_attention(model) as report:
        torch.compile(model, backend=counter)(**inputs)
    assert counter.frame_count == 1 and nodes(counter, OP) == 4 and nodes(counter, SDPA) == 0
    assert report.routed == 4 and not report.left


def test_inputs_that_need_grad_are_left_alone_under_compile(
    flux: tuple[torch.nn.Module, dict[str, torch.Tensor]],
) -> None:
    # A compiled graph keeps autograd, and the op has no backward: as eagerly, left alone.
    model, inputs = flux
    before = unrouted(model, inputs, grad=True)
    compiled, counter = routed(model)
    compiled(**inputs)
    assert counter.frame_count <= before.frame_count and nodes(counter, OP) == 0 and nodes(counter, SDPA) == 4
    assert compiled.last_report is not None
    assert compiled.last_report.left == {"inputs require grad (the op has no backward)": 4}


class Split(torch.nn.Module):
    """Two attention calls with a graph break between them: both graphs hold one op node."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch._dynamo.graph_break()
        return torch.nn.functional.scaled_dot_product_attention(self.proj(x), x, x, is_causal=True)


def test_calls_on_both_sides_of_a_graph_break_are_counted() -> None:
    model, q = Split().eval(), torch.randn(2, 2, 6, 16)
    before = unrouted(model, {"q": q})
    assert before.frame_count == 2
    compiled, counter = routed(model)
    with torch.no_grad():
        close(compiled(q=q), model(q))
        compiled(q=q)
    assert counter.frame_count == 2 and nodes(counter, OP) == 2 and nodes(counter, SDPA) == 0
    assert compiled.report.as_dict() == {"method": "sdpa", "routed": 4, "routed_with": {"causal": 2}, "left": {}}


# --------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return tiny_bert()


def padded_batch(lengths: tuple[int, ...] = (10, 6, 3)) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_bert_promised_padding_masks_become_key_lengths_in_the_graph(bert: torch.nn.Module) -> None:
    # A compiled graph cannot read the mask; under the promise its kept keys are counted in the
    # graph and the op gets them as key lengths. Padded rows equal the unrouted model's too.
    inputs = padded_batch()
    before = unrouted(bert, inputs)
    assert nodes(before, SDPA) == 2
    compiled, counter = routed(bert, key_padding_masks=True)
    with torch.no_grad():
        close(compiled(**inputs).last_hidden_state, bert(**inputs).last_hidden_state)
    assert counter.frame_count <= before.frame_count
    assert nodes(counter, OP) == nodes(before, SDPA) and nodes(counter, SDPA) == 0
    assert compiled.report.as_dict() == {
        "method": "transformers+sdpa",
        "routed": 2,
        "routed_with": {"key lengths": 2},
        "left": {},
    }


def test_bert_masks_stay_masks_without_the_promise(bert: torch.nn.Module) -> None:
    inputs = padded_batch()
    before = unrouted(bert, inputs)
    compiled, counter = routed(bert)
    with torch.no_grad():
        close(compiled(**inputs).last_hidden_state, bert(**inputs).last_hidden_state)
    assert counter.frame_count <= before.frame_count
    assert nodes(counter, OP) == 0 and nodes(counter, SDPA) == nodes(before, SDPA) == 2
    assert compiled.report.routed == 0 and compiled.report.left == {PROMISE_UNKNOWN: 2}


def test_bert_with_dynamic_shapes_takes_other_lengths_without_recompiling(bert: torch.nn.Module) -> None:
    # dynamic=True: batch, length and the scale are symbolic; one graph serves every batch.
    compiled, counter = routed(bert, key_padding_masks=True, dynamic=True)
    with torch.no_grad():
        for lengths in ((10, 6, 3), (7, 7), (12, 1, 5, 9)):
            inputs = padded_batch(lengths)
            close(compiled(**inputs).last_hidden_state, bert(**inputs).last_hidden_state)
            assert compiled.last_report is not None and compiled.last_report.routed_with == {"key lengths": 2}
    assert counter.frame_count == 1 and nodes(counter, OP) == 2


def test_arguments_are_checked_before_compiling(bert: torch.nn.Module) -> None:
    from fa3trt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"compile_routed: method must be one of .*got 'flash'"):
        compile_routed(bert, "flash")
    with pytest.raises(ConfigError, match="compile_routed: key_padding_masks must be True or False"):
        compile_routed(bert, key_padding_masks=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="compile_routed: method='transformers' needs a transformers"):
        compile_routed(torch.nn.Identity(), "transformers")


# --------------------------------------------------------------------------- AOTAutograd and inductor
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_flux_through_a_compiling_backend(backend: str) -> None:
    # The op node through AOTAutograd's functionalization, and lowered by inductor (one joint and
    # one single block: inductor compiles on 2 CPU cores in about 35 s from a cold cache).
    model, inputs = tiny_flux(1, 1), flux_inputs()
    counter = CompileCounterWithBackend(backend)
    compiled: Callable[..., Any] = compile_routed(model, backend=counter)
    with torch.no_grad():
        close(compiled(**inputs, return_dict=False)[0], model(**inputs, return_dict=False)[0])
    assert counter.frame_count == 1 and nodes(counter, OP) == 2


@gpu
@pytest.mark.parametrize("plain_first", [False, True])
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_routing_on_cuda_routes_every_call(backend: str, plain_first: bool) -> None:
    # On the GPU, in bf16, alone and in the user's order (bench.serve_model's too): the model
    # compiled plainly first, then routed. The routed graphs hold the op (not the plain ones
    # reused) and count every call; the plain compiled model still answers right outside a router.
    from torch._dynamo.utils import counters

    model = tiny_flux().to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in flux_inputs().items()}
    with torch.inference_mode():
        expected = model(**inputs, return_dict=False)[0]
        plain = torch.compile(model, backend=backend)
        if plain_first:
            plain(**inputs)
        compiled, counter = routed(model) if backend == "eager" else (compile_routed(model, backend=backend), None)
        for _ in range(2):
            got = compiled(**inputs, return_dict=False)[0]
            assert compiled.last_report is not None
            seen = compiled.last_report.as_dict()
            why = f"{seen}; dynamo {dict(counters['stats'])}, breaks {dict(counters['graph_break'])}"
            assert seen == {"method": "sdpa", "routed": 4, "routed_with": {}, "left": {}}, why
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        if counter is not None:
            assert nodes(counter, OP) == 4 and nodes(counter, SDPA) == 0, (nodes(counter, OP), nodes(counter, SDPA))
        torch.testing.assert_close(plain(**inputs, return_dict=False)[0], expected, rtol=2e-2, atol=2e-2)
