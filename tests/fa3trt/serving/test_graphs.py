"""CUDA graphs in the torch backend (``cuda_graphs=True``), for any model that qualifies. GPU
tests of the reference model need FA3 or the CuTe kernel (lengths on the device); every answer
is checked against the float32 model run on each sequence alone, or the eager unrouted model."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import fa3trt
from fa3trt.attention.kernels.selector import lengths_on_device, select_kernel
from fa3trt.buckets import Buckets
from fa3trt.config import AppArgs
from fa3trt.errors import ConfigError
from fa3trt.models.spec import ReferenceSpec
from fa3trt.requests import check_request
from fa3trt.serving import load_backend
from fa3trt.serving.batch import assemble
from fa3trt.serving.graphs import GraphRunner
from fa3trt.serving.torch_backend import TorchBackend
from tests.utils import gpu, rel_err

ROOT = Path(__file__).resolve().parents[3]


def batch_of(be: TorchBackend, rows: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sequences of the reference model as the replica batches them."""
    reqs = [check_request(be.signature, {"x": r.float().numpy()}, Buckets((4096,))) for r in rows]
    return assemble(be.signature, reqs, be.device, lengths_on_device=be.lengths_on_device).inputs


def test_graph_shapes_round_up_a_little() -> None:
    sig = ReferenceSpec().signature()
    g = GraphRunner(lambda b: b["x"], sig, torch.device("cpu"), seq_step=128)
    assert [g.shape_for(b, 1)[0] for b in range(1, 18)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16, 16, 16, 16, 24]
    assert [g.shape_for(1, s)[1] for s in (1, 128, 129, 2048, 2049)] == [128, 128, 256, 2048, 2176]
    # Fewer than half again as many sequences as the batch holds.
    assert all(b <= g.shape_for(b, 1)[0] < 1.5 * b for b in range(1, 300))
    # batching: shape never pads the bucketed axis: its size is the graph's.
    flux = AppArgs.model_validate(
        yaml.safe_load((ROOT / "examples/serve_flux.yaml").read_text())["applications"][0]["args"]
    )
    g = GraphRunner(lambda b: b["x"], flux.model.signature(), torch.device("cpu"), seq_step=128)
    assert g.shape_for(5, 37) == (6, 37)


def test_cuda_graphs_need_a_gpu() -> None:
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device.*runs on cpu"):
        TorchBackend(ReferenceSpec(), device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device"):
        load_backend("torch", ReferenceSpec(), device="cpu", cuda_graphs=True)
    eager = load_backend("torch", ReferenceSpec(), device="cpu")
    assert eager.describe()["cuda_graphs"] is None and [eager.batch_rows(b) for b in (1, 5, 7)] == [1, 5, 7]


def _side_by_side(loop: Callable[[int], None], n: int) -> None:
    """``loop(0)`` ... ``loop(n - 1)`` on threads of their own, all at once; each must finish."""
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a replay never finished"


@pytest.fixture(scope="module")
def graphed() -> tuple[TorchBackend, torch.nn.Module]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not lengths_on_device(select_kernel("cuda"), torch.bfloat16, 64):
        pytest.skip("needs FA3 or FlashAttention's CuTe kernel (sm90, pip extra hopper)")
    be = TorchBackend(ReferenceSpec(preset="tiny", dtype="bfloat16"), device="cuda", cuda_graphs=True)
    return be, fa3trt.build_model(fa3trt.ModelConfig.preset("tiny"))


@gpu
def test_graphed_batches_match_each_sequence_alone(graphed: tuple[TorchBackend, torch.nn.Module]) -> None:
    be, ref = graphed
    assert be.graphs is not None
    g = torch.Generator().manual_seed(0)
    for lengths in [(100, 37, 1), (120, 120, 120), (5, 90, 64, 3, 128), (300,), (1, 7)]:
        rows = [torch.randn(n, 256, generator=g) for n in lengths]
        y = be.run(batch_of(be, rows)).float().cpu()
        assert y.shape == (len(rows), max(lengths), 256)
        for i, r in enumerate(rows):
            assert rel_err(y[i, : len(r)], ref(r[None])[0]) < 3e-2, (lengths, i)
            assert not y[i, len(r) :].any()
    # (3, 100) and (3, 120) share one graph; (5, ...) ran in a (6, 128) graph, (1, 300) in (1, 384), (2, 7) in (2, 128).
    assert len(be.graphs) == 4 and be.describe()["cuda_graphs"]["captured"] == 4
    assert [be.batch_rows(b) for b in (1, 3, 5, 7)] == [1, 3, 6, 8]  # what a batch costs: its graph's rows


@gpu
def test_a_replay_never_waits_on_the_gpu_and_answers_are_its_own(graphed: tuple[TorchBackend, torch.nn.Module]) -> None:
    be, _ = graphed
    lens = torch.tensor([60, 31], dtype=torch.int32, device="cuda")
    a = {"x": torch.randn(2, 60, 256, device="cuda", dtype=torch.bfloat16), "seq_lens": lens}
    b = {"x": torch.randn(2, 60, 256, device="cuda", dtype=torch.bfloat16), "seq_lens": lens}
    be.run(a)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ya = be.run(a)
        yb = be.run(b)  # same graph: must not overwrite ya
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.inference_mode():
        eager = be.module(a["x"], lens)
    assert rel_err(ya.float(), eager.float()) < 1e-2 and rel_err(yb.float(), ya.float()) > 0.5


@gpu
def test_each_stream_has_its_own_graphs(graphed: tuple[TorchBackend, torch.nn.Module]) -> None:
    be, _ = graphed
    assert be.graphs is not None
    x = {
        "x": torch.randn(1, 200, 256, device="cuda", dtype=torch.bfloat16),
        "seq_lens": torch.tensor([200], dtype=torch.int32),
    }
    torch.cuda.synchronize()  # x is written on the default stream, read on the others
    before = len(be.graphs)
    ys = []
    for stream in (torch.cuda.Stream(), torch.cuda.Stream()):
        with torch.cuda.stream(stream):
            ys.append(be.run(x))
        stream.synchronize()
    assert len(be.graphs) == before + 2 and rel_err(ys[0].float(), ys[1].float()) < 1e-3


@gpu
def test_buckets_replay_side_by_side_from_threads(graphed: tuple[TorchBackend, torch.nn.Module]) -> None:
    """As a replica's buckets do: three threads, a stream each, replaying at once. Each stream's
    graphs are captured on a capture stream of its own (so no two buckets' graphs share a
    cuBLAS workspace), and every answer matches the model run alone."""
    be, ref = graphed
    assert be.graphs is not None
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randn(n, 256, generator=gen) for n in (90, 250, 400)]
    want = [ref(r[None])[0] for r in rows]
    xs = [
        {"x": r[None].to("cuda", torch.bfloat16), "seq_lens": torch.tensor([len(r)], dtype=torch.int32)} for r in rows
    ]
    streams = [torch.cuda.Stream() for _ in rows]
    torch.cuda.synchronize()  # xs are written on the default stream, read on the others
    errors: list[tuple[int, float]] = []

    def loop(i: int) -> None:
        with torch.cuda.stream(streams[i]):
            for _ in range(40):
                y = be.run(xs[i])
                err = rel_err(y[0].float().cpu(), want[i])
                if err > 3e-2:
                    errors.append((i, err))

    _side_by_side(loop, len(rows))
    assert not errors
    capture = {be.graphs._streams[s.cuda_stream].capture.cuda_stream for s in streams}  # type: ignore[union-attr]
    assert len(capture) == len(streams) and not capture & {s.cuda_stream for s in streams}


@gpu
def test_shapes_past_the_buffer_budget_run_eagerly(graphed: tuple[TorchBackend, torch.nn.Module]) -> None:
    be, ref = graphed
    assert be.graphs is not None
    budget, be.graphs.max_bytes = be.graphs.max_bytes, be.graphs.static_bytes  # no room for another graph
    try:
        before = len(be.graphs)
        r = torch.randn(700, 256)
        y = be.run({"x": r[None].to("cuda", torch.bfloat16), "seq_lens": torch.tensor([700], dtype=torch.int32)})
        assert len(be.graphs) == before and rel_err(y[0].float().cpu(), ref(r[None])[0]) < 3e-2
    finally:
        be.graphs.max_bytes = budget


@gpu
def test_graphs_one_thread_captured_replay_side_by_side_at_seed_width() -> None:
    """A Serve replica's pattern at the seed width. Its batches run on a thread pool whose
    threads are not tied to buckets, so one thread (one cuBLAS handle) may capture several
    buckets' graphs, which their buckets then replay at once from other threads. At this width
    cuBLAS runs GEMMs that use its workspace: graphs captured on one shared stream would share it,
    and replays would race on it (the likely cause of a replica's GPU hanging under Serve before
    each bucket stream had a capture stream of its own). Every answer, queued four at a time, is
    checked against the float32 model run on each sequence alone."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not lengths_on_device(select_kernel("cuda"), torch.bfloat16, 128):
        pytest.skip("needs FA3 or FlashAttention's CuTe kernel (sm90, pip extra hopper)")
    be = TorchBackend(ReferenceSpec(preset="seed", layers=1), device="cuda", cuda_graphs=True)
    assert be.graphs is not None
    ref = fa3trt.build_model(fa3trt.ModelConfig.preset("seed", layers=1, dtype="float32"), device="cuda")
    gen = torch.Generator().manual_seed(2)
    batches = [[torch.randn(n, 4096, generator=gen) for n in lens] for lens in ((96,), (200, 150), (64, 10, 128, 33))]
    with torch.no_grad():
        want = [[ref(r[None].cuda())[0] for r in rows] for rows in batches]
    inputs = [batch_of(be, rows) for rows in batches]
    streams = [torch.cuda.Stream() for _ in batches]
    torch.cuda.synchronize()  # the inputs are written on the default stream, read on the others
    for stream, batch in zip(streams, inputs):  # this one thread captures every stream's graph
        with torch.cuda.stream(stream):
            be.run(batch)
    torch.cuda.synchronize()
    errors: list[tuple[int, int, float]] = []

    def loop(i: int) -> None:
        with torch.cuda.stream(streams[i]):
            for _ in range(50):
                for y in [be.run(inputs[i]) for _ in range(4)]:
                    for j, w in enumerate(want[i]):
                        err = rel_err(y[j, : len(w)].float(), w)
                        if err > 3e-2:
                            errors.append((i, j, err))

    _side_by_side(loop, len(batches))
    assert len(be.graphs) == len(batches) and not errors, errors[:5]


@gpu
def test_a_users_model_runs_as_cuda_graphs_where_it_qualifies() -> None:
    """The tiny FLUX of examples/serve_flux.yaml (batching: shape) under cuda_graphs: batches
    rounded up to a graph's rows give the eager unrouted model's answers."""
    from fa3trt.models.sources import load_source
    from fa3trt.onnx.calls import select_output

    app = AppArgs.model_validate(
        yaml.safe_load((ROOT / "examples/serve_flux.yaml").read_text())["applications"][0]["args"]
    )
    be = TorchBackend(app.model, device="cuda", cuda_graphs=True)
    eager = load_source(app.model).module.to("cuda")
    sig = be.signature
    for n, rows in ((16, 3), (40, 1), (16, 3)):
        reqs = [check_request(sig, sig.sample_request(n, seed=i, other=8), app.bucket_set()) for i in range(rows)]
        for r in reqs[1:]:  # one shape: one copy of the unbatched positions
            r.tensors.update({t.name: reqs[0].tensors[t.name] for t in sig.sent if not t.batched})
        batch = assemble(sig, reqs, be.device).inputs
        with torch.inference_mode():
            want = select_output(eager(**batch), "sample")
        assert rel_err(be.run(batch).float(), want.float()) < 1e-4
    assert be.graphs is not None and len(be.graphs) == 2  # (3 -> 3 rows, 16) and (1, 40); the repeat replays


class HostSync(torch.nn.Module):
    """A forward that waits on the host: no CUDA graph can hold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float(x.abs().max().item() > 0)


def host_sync() -> torch.nn.Module:
    return HostSync()


@gpu
def test_a_model_that_waits_on_the_host_is_refused_naming_why() -> None:
    from fa3trt.models.spec import SourceSpec

    spec = SourceSpec.model_validate(
        {
            "source": "python",
            "factory": "tests.fa3trt.serving.test_graphs:host_sync",
            "routing": "off",
            "inputs": {"x": {"axes": ["S", 4]}},
            "output": {"axes": ["S", 4]},
            "bucketed_axis": "S",
        }
    )
    be = TorchBackend(spec, device="cuda", cuda_graphs=True)
    x = {"x": torch.ones(2, 8, 4, device="cuda")}
    with pytest.raises(
        ConfigError, match="cuda_graphs: this model cannot run as a CUDA graph .*Set cuda_graphs to false"
    ):
        be.run(x)
    np.testing.assert_array_equal(TorchBackend(spec, device="cuda").run(x).cpu().numpy(), np.ones((2, 8, 4)))
