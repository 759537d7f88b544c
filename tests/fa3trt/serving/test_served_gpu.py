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

from fa3trt.config import AppArgs, SourceSpec
from fa3trt.onnx.calls import select_output
from fa3trt.serving.served import ModuleBackend, check_padding

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

CONFIG = Path(__file__).resolve().parents[2] / "examples/serve_flux_gpu.yaml"


@pytest.fixture(scope="module")
def app() -> AppArgs:
    return AppArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])


@pytest.fixture(scope="module")
def backend(app: AppArgs) -> ModuleBackend:
    assert isinstance(app.model, SourceSpec)
    return ModuleBackend(app.model, "cuda")


@pytest.mark.parametrize("image,text", [(1024, 512), (4096, 512), (4000, 77)])
def test_flux_real_width_routed_matches_unrouted(backend: ModuleBackend, app: AppArgs, image: int, text: int) -> None:
    sig = backend.signature
    reqs = [sig.check(sig.sample_request(image, seed=i, other=text), app.bucket_set()) for i in range(2)]
    # Two requests of one shape batch together when their positions (unbatched inputs) agree.
    shared = {t.name: reqs[0].tensors[t.name] for t in sig.sent if not t.batched}
    reqs[1] = dataclasses.replace(reqs[1], tensors=reqs[1].tensors | shared)
    batch = sig.assemble(reqs, backend.device)
    before = backend.routing.routed
    got = backend.run(batch).float()
    assert backend.routing.routed - before == 2 + 4, backend.routing.as_dict()  # every block's attention
    assert backend.routing.left == {}, backend.routing.as_dict()
    with torch.inference_mode():
        want = select_output(backend.module(**batch), "sample").float()
    err = float((got - want).norm() / want.norm())
    assert err < 2e-2, err  # bf16: two kernels' rounding, not a different computation


def test_shape_batching_needs_no_padding_check(backend: ModuleBackend, app: AppArgs) -> None:
    assert check_padding(backend, app.bucket_set(), torch.bfloat16) == 0.0  # batching: shape
