"""The generation app end to end: `serve run examples/generate_flux.yaml` on a 2-CPU cluster,
called over HTTP (JSON, .npz, server-sent steps) and through the handle from another Ray job.
Every answer is compared with diffusers' FluxPipeline run alone on the eager, unrouted
transformer built here from the same config and seed; a deadline the replica cannot meet is a
429 with its estimate, a bad field a 422 naming it, and a client that goes away frees its slot.
No mocks."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
import yaml

from deploy.generation import generation_plan
from deploy.generation_routes import decode_sse_latents
from fa3trt.generation import GenerationArgs
from tests.deploy.cluster import ROOT, URL, run, serve_cluster
from tests.models import (
    CLIP_CONFIG,
    FLUX_GEN_CONFIG,
    FLUX_GEN_VAE_CONFIG,
    T5_CONFIG,
    flux_pipeline_latents,
    tiny_flux_gen,
    tiny_text_encoders,
    tiny_vae,
)

ATOL = 1e-4
CONFIG = ROOT / "examples/generate_flux.yaml"


def test_the_example_is_the_tested_model() -> None:
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    assert args["transformer"]["config"] == {
        k: list(v) if isinstance(v, tuple) else v for k, v in FLUX_GEN_CONFIG.items()
    }
    assert args["vae"]["config"] == FLUX_GEN_VAE_CONFIG
    assert args["text_encoders"]["clip"]["config"] == CLIP_CONFIG and args["text_encoders"]["t5"]["config"] == T5_CONFIG


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with serve_cluster(tmp_path_factory.mktemp("generate"), num_cpus=2, config=CONFIG) as env:
        yield env


@pytest.fixture(scope="module")
def eager() -> torch.nn.Module:
    return tiny_flux_gen()


@pytest.fixture(scope="module")
def vae() -> torch.nn.Module:
    return tiny_vae()


def png_array(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def fields(size: int, steps: int, seed: int, **extra: Any) -> dict[str, Any]:
    rng = np.random.default_rng(1000 + seed)
    return {
        "prompt_embeds": rng.standard_normal((8, 32)).astype(np.float32),
        "pooled_prompt_embeds": rng.standard_normal(32).astype(np.float32),
        "height": size,
        "width": size,
        "steps": steps,
        "seed": seed,
    } | extra


def as_json(f: dict[str, Any]) -> dict[str, Any]:
    return {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in f.items()}


def post(body: dict[str, Any], **kw: Any) -> requests.Response:
    return requests.post(f"{URL}/v1/generate", json=as_json(body), timeout=120, **kw)


def stats() -> dict[str, Any]:
    return dict(requests.get(f"{URL}/v1/stats", timeout=10).json())


def test_json_answers_are_the_pipelines_batched_step_by_step(cluster: dict[str, str], eager: torch.nn.Module) -> None:
    reqs = [fields(128, 6, 1), fields(128, 9, 2), fields(64, 4, 3), fields(128, 5, 4, guidance_scale=6.0)]
    reqs.append(
        fields(128, 4, 5, true_cfg_scale=3.0)
        | {
            "negative_prompt_embeds": np.zeros((8, 32), np.float32),
            "negative_pooled_prompt_embeds": np.zeros(32, np.float32),
        }
    )
    before = stats()
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        answers = list(pool.map(post, reqs))
    for r, a in zip(reqs, answers):
        assert a.status_code == 200, a.text
        body = a.json()
        assert body["steps"] == r["steps"]
        np.testing.assert_allclose(np.asarray(body["latents"]), flux_pipeline_latents(eager, r), atol=ATOL, rtol=0)
    after = stats()
    assert after["finished"] - before["finished"] == len(reqs)
    rows = sum(r["steps"] * (2 if "true_cfg_scale" in r else 1) for r in reqs)
    assert after["rows"] - before["rows"] == rows


def test_npz_in_npz_out(cluster: dict[str, str], eager: torch.nn.Module) -> None:
    f = fields(64, 5, 7, latents=np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32))
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in f.items()})
    r = requests.post(
        f"{URL}/v1/generate", data=buf.getvalue(), headers={"content-type": "application/x-npz"}, timeout=120
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-npz"
    got = np.load(io.BytesIO(r.content), allow_pickle=False)["latents"]
    np.testing.assert_allclose(got, flux_pipeline_latents(eager, f), atol=ATOL, rtol=0)


def sse(r: requests.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    name = ""
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])


def test_server_sent_steps_then_the_latents(cluster: dict[str, str], eager: torch.nn.Module) -> None:
    f = fields(128, 7, 8)
    with post(f | {"stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse(r))
    assert [e for e, _ in events] == ["step"] * 8 + ["done"]
    assert [d["step"] for _, d in events[:-1]] == list(range(8))
    np.testing.assert_allclose(decode_sse_latents(events[-1][1]), flux_pipeline_latents(eager, f), atol=ATOL, rtol=0)


def test_png_from_the_vae_deployment(cluster: dict[str, str], eager: torch.nn.Module, vae: torch.nn.Module) -> None:
    f = fields(128, 4, 12, output="png")
    r = post(f)
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"] == "image/png" and r.headers["x-fa3trt-steps"] == "4"
    got, want = png_array(r.content), flux_pipeline_latents(eager, f, vae=vae)
    assert got.shape == want.shape == (128, 128, 3)
    assert np.abs(got.astype(int) - want).max() <= 1  # float32 rounding at a level's edge at most
    with post(f | {"stream": True}, stream=True) as s:
        events = list(sse(s))
    assert events[-1][0] == "done" and base64.b64decode(events[-1][1]["png"]) == r.content
    assert [e for e, _ in events[:-1]] == ["step"] * 5


@pytest.fixture(scope="module")
def text() -> dict[str, Any]:
    return tiny_text_encoders(str(ROOT / "examples/tokenizers"), max_sequence_length=64)


def test_a_prompt_through_the_text_encoder_deployment(
    cluster: dict[str, str], eager: torch.nn.Module, text: dict[str, Any]
) -> None:
    reqs = [
        {"prompt": "a photo of a cat", "height": 128, "width": 64, "steps": 4, "seed": 5},
        {"prompt": "a red house", "negative_prompt": "a blue sky", "true_cfg_scale": 2.5}
        | {"height": 64, "width": 64, "steps": 3, "seed": 6},
    ]
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        answers = list(pool.map(post, reqs))
    for r, a in zip(reqs, answers):
        assert a.status_code == 200, a.text[:300]
        want = flux_pipeline_latents(eager, r, text=text)
        np.testing.assert_allclose(np.asarray(a.json()["latents"]), want, atol=ATOL, rtol=0)


def images(body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{URL}/v1/images/generations", json=body, timeout=120)


def test_openai_images_api(
    cluster: dict[str, str], eager: torch.nn.Module, vae: torch.nn.Module, text: dict[str, Any]
) -> None:
    body = {"prompt": "a red house", "n": 2, "size": "128x64", "seed": 40, "steps": 3, "model": "any"}
    r = images(body)
    assert r.status_code == 200, r.text[:300]
    data = r.json()["data"]
    assert len(data) == 2 and isinstance(r.json()["created"], int)
    for i, item in enumerate(data):
        fields = {"prompt": "a red house", "width": 128, "height": 64, "steps": 3, "seed": 40 + i}
        want = flux_pipeline_latents(eager, fields, vae=vae, text=text)
        got = png_array(base64.b64decode(item["b64_json"]))
        assert got.shape == want.shape == (64, 128, 3)
        assert np.abs(got.astype(int) - want).max() <= 1


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "a cat", "response_format": "url"}, 400, "response_format 'url' is not offered"),
        ({"prompt": "a cat", "size": "100x128"}, 400, "width = 100 is not a multiple of 16"),
        ({"prompt": "a cat", "size": "big"}, 400, "size 'big' must be WIDTHxHEIGHT"),
        ({"prompt": "a cat", "n": 11}, 400, "n = 11 must be an integer from 1 to 10"),
        ({"prompt": "a cat", "quality": "hd"}, 400, r"parameters \['quality'\] are not supported"),
        ({"size": "64x64"}, 400, "prompt is missing"),
        ({"prompt": "a cat", "steps": 100, "size": "256x256", "deadline_ms": 1}, 429, "cannot be met"),
    ],
)
def test_openai_errors_name_the_parameter(
    cluster: dict[str, str], body: dict[str, Any], status: int, message: str
) -> None:
    r = images(body)
    assert r.status_code == status, r.text[:300]
    error = r.json()["error"]
    assert re.search(message, error["message"]) and error["type"] in ("invalid_request_error", "rate_limit_error")


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"height": 100}, 422, "height = 100 is not a multiple of 16"),
        ({"height": 512, "width": 256}, 422, "is 512 image tokens, past the largest bucket \\(256\\)"),
        ({"prompt_embeds": np.zeros((8, 4))}, 422, r"prompt_embeds has shape \(8, 4\)"),
        ({"steps": 101}, 422, r"steps = 101 is outside \[1, 100\]"),
        ({"prompt": "a cat"}, 422, "send prompt or prompt_embeds, not both"),
        ({"prompt_embeds": None, "prompt": ""}, 422, "prompt must be a non-empty string"),
    ],
)
def test_bad_fields_are_4xx_naming_them(
    cluster: dict[str, str], change: dict[str, Any], status: int, message: str
) -> None:
    r = post(fields(64, 2, 0) | change)
    assert r.status_code == status and r.json()["error"], r.text[:300]
    assert re.search(message, r.json()["error"]), r.json()
    stream = post(fields(64, 2, 0) | change | {"stream": True})  # refused before the stream starts
    assert stream.status_code == status


def test_wrong_content_type_and_body(cluster: dict[str, str]) -> None:
    r = requests.post(f"{URL}/v1/generate", data=b"x", headers={"content-type": "text/plain"}, timeout=10)
    assert r.status_code == 415 and "text/plain" in r.json()["error"]
    r = requests.post(f"{URL}/v1/generate", data=b"[1]", headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 422 and "JSON object of fields" in r.json()["error"]


def test_a_deadline_that_cannot_be_met_is_429_with_the_estimate(
    cluster: dict[str, str], eager: torch.nn.Module
) -> None:
    before = stats()
    r = post(fields(256, 100, 9, deadline_ms=1))
    assert r.status_code == 429, r.text
    assert "deadline_ms 1 cannot be met" in r.json()["error"] and r.json()["estimate_ms"] > 1
    # Given the time it asked for (and a margin for the CPU's noise), the same request is served.
    f = fields(64, 3, 9, deadline_ms=max(2000.0, 20 * r.json()["estimate_ms"]))
    ok = post(f)
    assert ok.status_code == 200, ok.text
    np.testing.assert_allclose(np.asarray(ok.json()["latents"]), flux_pipeline_latents(eager, f), atol=ATOL, rtol=0)
    assert stats()["refused"] - before["refused"] == 1


def test_a_client_that_goes_away_frees_its_slot(cluster: dict[str, str]) -> None:
    before = stats()
    with post(fields(256, 100, 10, stream=True), stream=True) as r:
        events = sse(r)
        assert next(events)[0] == "step" and next(events)[0] == "step"
    deadline = time.time() + 30
    while time.time() < deadline:
        now = stats()
        if now["cancelled"] > before["cancelled"] and now["in_flight"] == 0:
            break
        time.sleep(0.2)
    assert now["cancelled"] - before["cancelled"] == 1 and now["in_flight"] == 0, now
    assert now["passes"] - before["passes"] < 100  # it did not run to its end


HANDLE = """
import sys, numpy as np, ray
from ray import serve
from fa3trt.errors import DeadlineError
ray.init(address="auto", logging_level="ERROR")
h = serve.get_app_handle("fa3trt-generate")
f = dict(np.load(sys.argv[1]))
f = {k: (v.item() if v.ndim == 0 else v) for k, v in f.items()}
out = h.generate.remote(f).result()
png = h.generate.remote(f | {"output": "png"}).result()["png"]
steps = [e["step"] for e in h.options(stream=True).generate_stream.remote(f) if "step" in e]
try:
    h.generate.remote(f | {"steps": 100, "height": 256, "width": 256, "deadline_ms": 1}).result()
    refused = "no"
except DeadlineError as e:
    refused = f"{e.status} {e.estimate_s > 0}"
np.savez(sys.argv[2], latents=out["latents"], steps=np.array(steps), refused=np.array(refused),
         png=np.frombuffer(png, np.uint8))
"""


def test_the_handle_from_another_ray_job(
    cluster: dict[str, str], eager: torch.nn.Module, vae: torch.nn.Module, tmp_path: Path
) -> None:
    f = fields(128, 4, 11)
    np.savez(tmp_path / "in.npz", **{k: np.asarray(v) for k, v in f.items()})
    out = run([sys.executable, "-c", HANDLE, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")], cluster, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(got["latents"], flux_pipeline_latents(eager, f), atol=ATOL, rtol=0)
    assert got["steps"].tolist() == [0, 1, 2, 3, 4]
    assert str(got["refused"]) == "429 True"
    image = png_array(got["png"].tobytes())
    assert np.abs(image.astype(int) - flux_pipeline_latents(eager, f, vae=vae)).max() <= 1


def test_the_example_client(cluster: dict[str, str], eager: torch.nn.Module, tmp_path: Path) -> None:
    out = run(
        [
            sys.executable,
            "examples/generate_client.py",
            "--steps",
            "3",
            "--seed",
            "2",
            "--save",
            str(tmp_path / "l.npy"),
        ],
        cluster,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 3/3" in out.stdout and "latents (64, 8) float32" in out.stdout
    png = tmp_path / "image.png"
    cmd = ["examples/generate_client.py", "--prompt", "a red house", "--output", "png", "--save", str(png)]
    out = run([sys.executable, *cmd], cluster)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "png of" in out.stdout and png_array(png.read_bytes()).shape == (128, 128, 3)


def test_the_plan_puts_the_vae_and_text_encoders_beside_each_transformer_replica() -> None:
    args = GenerationArgs.model_validate(yaml.safe_load(CONFIG.read_text())["applications"][0]["args"])
    plan = generation_plan(args, cluster_gpus=4, cluster_cpus=64)
    assert [plan[k]["num_replicas"] for k in ("generate", "vae", "text")] == [4, 4, 4] and plan["threads"] is None
    gpus = {k: plan[k]["ray_actor_options"]["num_gpus"] for k in ("generate", "vae", "text")}
    assert gpus == {"generate": 0.5, "vae": 0.25, "text": 0.25}
    plan = generation_plan(args, cluster_gpus=0, cluster_cpus=6)
    assert "num_gpus" not in plan["generate"]["ray_actor_options"] and plan["threads"] == 2  # 3 processes, 6 CPUs
    bare = generation_plan(
        args.model_copy(update={"vae": None, "text_encoders": None}), cluster_gpus=2, cluster_cpus=32
    )
    assert set(bare) == {"generate", "threads"} and bare["generate"]["ray_actor_options"]["num_gpus"] == 1
