"""The generation app with an SD3-style transformer end to end: `serve run
examples/generate_sd3.yaml` on a 2-CPU cluster, called over HTTP (JSON, .npz, PNG, prompts through the text encoders'
deployment, OpenAI's Images API) and by the example client. Every answer is compared with diffusers' StableDiffusion3Pipeline run alone on the
eager, unrouted transformer built here from the same config and seed. No mocks."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from tests.deploy.cluster import ROOT, URL, run, serve_cluster
from tests.models import (
    SD3_CLIP_2_CONFIG,
    SD3_CLIP_CONFIG,
    SD3_GEN_CONFIG,
    SD3_SCHEDULER,
    SD3_VAE_CONFIG,
    T5_CONFIG,
    sd3_fields,
    sd3_pipeline_latents,
    tiny_sd3_text_encoders,
    tiny_sd3_vae,
)

pytest.importorskip("diffusers")

ATOL = 1e-4
CONFIG = ROOT / "examples/generate_sd3.yaml"


def test_the_example_is_the_tested_model() -> None:
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    assert args["transformer"]["config"] == SD3_GEN_CONFIG
    assert args["vae"]["config"] == SD3_VAE_CONFIG and args["scheduler"]["config"] == SD3_SCHEDULER
    text = args["text_encoders"]
    assert text["clip"]["config"] == SD3_CLIP_CONFIG and text["clip_2"]["config"] == SD3_CLIP_2_CONFIG
    assert text["t5"]["config"] == T5_CONFIG


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with serve_cluster(tmp_path_factory.mktemp("generate_sd3"), num_cpus=2, config=CONFIG) as env:
        yield env


fields = sd3_fields


def post(body: dict[str, Any]) -> requests.Response:
    doc = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}
    return requests.post(f"{URL}/v1/generate", json=doc, timeout=120)


def test_json_answers_are_the_pipelines_batched_step_by_step(cluster: dict[str, str]) -> None:
    reqs = [fields(64, 64, 5, 1), fields(64, 64, 7, 2), fields(64, 64, 4, 3, guided=False), fields(32, 96, 4, 4)]
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        answers = list(pool.map(post, reqs))
    for r, a in zip(reqs, answers):
        assert a.status_code == 200, a.text
        latents = np.asarray(a.json()["latents"])
        assert latents.shape == (4, r["height"] // 8, r["width"] // 8)
        np.testing.assert_allclose(latents, sd3_pipeline_latents(r), atol=ATOL, rtol=0)


def test_npz_latents_in_and_png_out(cluster: dict[str, str]) -> None:
    from PIL import Image

    f = fields(32, 64, 3, 5, latents=np.random.default_rng(4).standard_normal((4, 4, 8)).astype(np.float32))
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in f.items()})
    r = requests.post(
        f"{URL}/v1/generate", data=buf.getvalue(), headers={"content-type": "application/x-npz"}, timeout=120
    )
    assert r.status_code == 200, r.text[:300]
    got = np.load(io.BytesIO(r.content))["latents"]
    np.testing.assert_allclose(got, sd3_pipeline_latents(f), atol=ATOL, rtol=0)
    png = post(f | {"output": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png", png.text[:300]
    image = np.asarray(Image.open(io.BytesIO(png.content)))
    assert np.abs(image.astype(int) - sd3_pipeline_latents(f, vae=tiny_sd3_vae())).max() <= 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"guidance_scale": 5.0, "negative_prompt_embeds": None}, "guidance_scale = 5 guides with a negative prompt"),
        ({"height": 24}, "height = 24 is not a multiple of 16"),
        ({"latents": np.zeros((8, 4), np.float32)}, "latents has shape \\(8, 4\\)"),
    ],
)
def test_bad_fields_are_422_naming_them(cluster: dict[str, str], change: dict[str, Any], message: str) -> None:
    f = {k: v for k, v in (fields(32, 64, 2, 0) | change).items() if v is not None}
    if "negative_prompt_embeds" not in f:
        f.pop("negative_pooled_prompt_embeds")
    r = post(f)
    assert r.status_code == 422 and message.split("\\")[0] in r.json()["error"], r.text[:300]


def test_the_example_client(cluster: dict[str, str], tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "examples/generate_client.py",
        "--size",
        "64",
        "--steps",
        "3",
        "--save",
        str(tmp_path / "l.npy"),
    ]
    out = run(cmd, cluster)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 3/3" in out.stdout and "latents (4, 8, 8) float32" in out.stdout


def test_prompts_through_the_text_encoders_and_openai_images(cluster: dict[str, str]) -> None:
    from PIL import Image

    text = tiny_sd3_text_encoders(str(ROOT / "examples/tokenizers"), 64 - 16)
    reqs = [
        {"prompt": "a red house", "negative_prompt": "blurry", "height": 64, "width": 64, "steps": 3, "seed": 1},
        {"prompt": "a cat", "height": 64, "width": 64, "steps": 3, "seed": 2},  # an empty negative prompt
    ]
    with cf.ThreadPoolExecutor(len(reqs)) as pool:
        answers = list(pool.map(post, reqs))
    for r, a in zip(reqs, answers):
        assert a.status_code == 200, a.text[:300]
        np.testing.assert_allclose(
            np.asarray(a.json()["latents"]), sd3_pipeline_latents(r, text=text), atol=ATOL, rtol=0
        )
    body = {"prompt": "a red house", "size": "64x32", "steps": 3, "seed": 4}
    r = requests.post(f"{URL}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == 200, r.text[:300]
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))))
    want = sd3_pipeline_latents({**body, "width": 64, "height": 32}, vae=tiny_sd3_vae(), text=text)
    assert image.shape == (32, 64, 3) and np.abs(image.astype(int) - want).max() <= 1
