"""A FLUX-width generation on a GPU (examples/generate_flux_gpu.yaml: 24 heads of 128, 2 + 4
blocks, bf16), batched step by step with requests of another size and other step counts, against
diffusers' FluxPipeline run alone on the same transformer unrouted (PyTorch SDPA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bench.generation import make_fields
from fa3trt.generation import FluxFamily, GenerationArgs, StepEngine, parse_request
from fa3trt.generation.requests import GenerateRequest
from fa3trt.serving import load_backend
from tests.models import flux_pipeline_latents

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

CONFIG = Path(__file__).resolve().parents[3] / "examples/generate_flux_gpu.yaml"


def _engine() -> tuple[GenerationArgs, FluxFamily, StepEngine]:
    """The FLUX-width config's transformer on this GPU, under the torch backend, in a loop."""
    args = GenerationArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])
    family = FluxFamily(args)
    backend = load_backend("torch", family.spec(), device="cuda")
    return args, family, StepEngine(family, backend, args.bucket_set(), args.max_batch_rows)


def test_flux_width_generation_batched_matches_the_pipeline_alone() -> None:
    args, family, eng = _engine()
    limits = family.limits()
    reqs = [
        make_fields(limits, 512, 8, 1, 128),
        make_fields(limits, 512, 6, 2, 128),
        make_fields(limits, 768, 5, 3, 128),
    ]
    gens = [eng.new(parse_request(r, limits)) for r in reqs]
    eng.admit(gens[0])
    eng.step(eng.pick())
    for g in gens[1:]:
        eng.admit(g)
    while len(eng):
        eng.step(eng.pick())
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(args.transformer.seed)  # as diffusers builds it from the config, unrouted
    eager = diffusers.FluxTransformer2DModel.from_config(args.transformer.config).eval().to("cuda", torch.bfloat16)
    for g, r in zip(gens, reqs):
        want = flux_pipeline_latents(eager, r)
        got = g.latents[0].float().cpu().numpy()
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert err < 5e-2, (r["height"], r["steps"], err)  # bf16: two attention kernels' rounding over the steps


def test_preparing_a_request_and_a_pass_never_waits_for_the_device() -> None:
    """A request's start (noise, prompt rows, timesteps) and a pass's inputs are queued through
    page-locked memory: with a pass in flight, neither synchronizes with the device (a copy from
    pageable memory would, and the device would idle while the host prepares the next pass)."""
    _, family, eng = _engine()
    limits = family.limits()

    def request(seed: int) -> GenerateRequest:
        return parse_request(make_fields(limits, 512, 4, seed, 64), limits)

    eng.admit(eng.new(request(0)))
    eng.step(eng.pick())  # the first pass of this shape compiles and allocates outside the check
    torch.cuda.synchronize()
    eng.step(eng.pick())  # queued: the device runs it meanwhile
    torch.cuda.set_sync_debug_mode("error")
    try:
        gen = eng.new(request(1))
        family.inputs([*eng.pick(), gen])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
