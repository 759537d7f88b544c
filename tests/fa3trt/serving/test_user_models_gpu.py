"""A third-party DiT at its real width through the torch serving backend, on a GPU: FLUX.1's
transformer (24 heads of 128, 2 + 4 blocks, bf16; examples/serve_flux_gpu.yaml) loaded from
its source and run under attention routing, against the same model unrouted (diffusers'
processors on PyTorch SDPA)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from fa3trt.config import AppArgs
from fa3trt.models.spec import SourceSpec
from fa3trt.onnx.calls import select_output
from fa3trt.requests import check_request
from fa3trt.serving.batch import assemble
from fa3trt.serving.torch_backend import TorchBackend
from fa3trt.serving.warmup import check_padding

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

CONFIG = Path(__file__).resolve().parents[3] / "examples/serve_flux_gpu.yaml"


@pytest.fixture(scope="module")
def app() -> AppArgs:
    return AppArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])


@pytest.fixture(scope="module")
def backend(app: AppArgs) -> TorchBackend:
    assert isinstance(app.model, SourceSpec)
    return TorchBackend(app.model, "cuda")


@pytest.mark.parametrize("image,text", [(1024, 512), (4096, 512), (4000, 77)])
def test_flux_real_width_routed_matches_unrouted(backend: TorchBackend, app: AppArgs, image: int, text: int) -> None:
    sig = backend.signature
    reqs = [check_request(sig, sig.sample_request(image, seed=i, other=text), app.bucket_set()) for i in range(2)]
    # Two requests of one shape batch together when their positions (unbatched inputs) agree.
    shared = {t.name: reqs[0].tensors[t.name] for t in sig.sent if not t.batched}
    reqs[1] = dataclasses.replace(reqs[1], tensors=reqs[1].tensors | shared)
    batch = assemble(sig, reqs, backend.device).inputs
    before = backend.routing.routed
    got = backend.run(batch).float()
    assert backend.routing.routed - before == 2 + 4, backend.routing.as_dict()  # every block's attention
    assert backend.routing.left == {}, backend.routing.as_dict()
    with torch.inference_mode():
        want = select_output(backend.module(**batch), "sample").float()
    err = float((got - want).norm() / want.norm())
    assert err < 2e-2, err  # bf16: two kernels' rounding, not a different computation


def test_shape_batching_needs_no_padding_check(backend: TorchBackend, app: AppArgs) -> None:
    assert check_padding(backend, app.bucket_set()) == 0.0  # batching: shape
