"""Serve your own model, end to end: one `serve run` of a config naming three apps, a diffusers
FLUX transformer, a transformers BERT encoder and a diffusers SD3 transformer with 4-D latents
(the shipped examples/serve_*.yaml, tiny configs), all started on a 2-CPU cluster with the
default replica_cpus, called over HTTP (.npz and JSON), KServe v2 and through the handle from
another Ray job. Answers are compared with the eager, unrouted model built here from the same
config and seed. No mocks.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import requests
import torch
import transformers
import yaml

from tests.deploy.cluster import ROOT, URL, run, serve_cluster

ATOL = 1e-4
APPS = {
    "flux": ROOT / "examples/serve_flux.yaml",
    "bert": ROOT / "examples/serve_bert.yaml",
    "sd3": ROOT / "examples/serve_sd3.yaml",
}


def _args(app: str) -> dict[str, Any]:
    return yaml.safe_load(APPS[app].read_text())["applications"][0]["args"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The three example apps in one `serve run`, at /flux, /bert and /sd3, on 2 CPUs: each CPU
    replica reserves a share of a CPU by default, so every app starts without hand-tuning."""
    tmp = tmp_path_factory.mktemp("serve-models")
    doc = yaml.safe_load(APPS["flux"].read_text())
    doc["applications"] = [
        {**yaml.safe_load(APPS[name].read_text())["applications"][0], "name": name, "route_prefix": f"/{name}"}
        for name in APPS
    ]
    assert all("replica_cpus" not in app["args"] for app in doc["applications"])
    config = tmp / "serve_models.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    with serve_cluster(tmp, num_cpus=2, config=config, prefixes=tuple(f"/{name}" for name in APPS)) as env:
        yield env


def _eager(app: str) -> torch.nn.Module:
    """The model as its package builds it, unrouted (seed 0 as the config's default)."""
    m = _args(app)["model"]
    torch.manual_seed(m.get("seed", 0))
    if m["source"] == "diffusers":
        return getattr(diffusers, m["class"]).from_config(m["config"]).eval()
    cls = getattr(transformers, m["class"])
    return cls(cls.config_class(**m["config"])).eval()


@pytest.fixture(scope="module")
def flux() -> torch.nn.Module:
    return _eager("flux")


@pytest.fixture(scope="module")
def bert() -> torch.nn.Module:
    return _eager("bert")


@pytest.fixture(scope="module")
def sd3() -> torch.nn.Module:
    return _eager("sd3")


def sd3_request(h: int, w: int, t: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((4, h, w)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((t, 32)).astype(np.float32),
        "pooled_projections": rng.standard_normal(32).astype(np.float32),
        "timestep": np.float32(rng.uniform(0, 1000)),
    }


def sd3_expect(model: torch.nn.Module, req: dict[str, np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        return model(**{k: torch.from_numpy(np.asarray(v))[None] for k, v in req.items()}).sample[0].numpy()


def flux_request(s: int, t: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((s, 8)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((t, 32)).astype(np.float32),
        "pooled_projections": rng.standard_normal(32).astype(np.float32),
        "timestep": np.float32(rng.uniform()),
        # Positions of the image tokens: the same for every request of one size, so those batch together.
        "img_ids": np.stack([np.zeros(s), np.arange(s) // 4, np.arange(s) % 4], axis=1).astype(np.float32),
        "txt_ids": np.zeros((t, 3), np.float32),
    }


def flux_expect(model: torch.nn.Module, req: dict[str, np.ndarray]) -> np.ndarray:
    batched = {"img_ids", "txt_ids"}
    x = {
        k: torch.from_numpy(np.asarray(v)) if k in batched else torch.from_numpy(np.asarray(v))[None]
        for k, v in req.items()
    }
    with torch.inference_mode():
        return model(**x).sample[0].numpy()


def bert_expect(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        t = torch.from_numpy(ids)[None]
        return model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0].numpy()


def post_npz(app: str, inputs: dict[str, np.ndarray]) -> requests.Response:
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    return requests.post(
        f"{URL}/{app}/v1/infer", data=buf.getvalue(), headers={"content-type": "application/x-npz"}, timeout=120
    )


def post_json(app: str, inputs: dict[str, Any]) -> requests.Response:
    body = {"inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()}}
    return requests.post(f"{URL}/{app}/v1/infer", json=body, timeout=120)


def _npz(r: requests.Response) -> dict[str, np.ndarray]:
    assert r.status_code == 200, r.text
    with np.load(io.BytesIO(r.content), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_info_lists_the_inputs(cluster: dict[str, str]) -> None:
    info = requests.get(f"{URL}/flux/v1/info", timeout=30).json()
    sig = info["signature"]
    assert [(t["name"], t["axes"], t["batched"]) for t in sig["inputs"]][:2] == [
        ("hidden_states", ["S", 8], True),
        ("encoder_hidden_states", ["T", 32], True),
    ]
    assert sig["bucketed"] == "S" and sig["ranges"] == {"T": [1, 64]} and sig["batching"] == "shape"
    assert sig["output"]["name"] == "sample"
    # Every attention call of the model was routed while warming up (FLUX: 2 + 2 blocks).
    assert info["routing"]["routed"] > 0 and info["routing"]["left"] == {}, info["routing"]
    bert = requests.get(f"{URL}/bert/v1/info", timeout=30).json()
    assert [t["name"] for t in bert["signature"]["inputs"]] == ["input_ids", "attention_mask"]
    assert bert["signature"]["inputs"][1]["fill"] == "mask"
    assert bert["routing"]["routed_with"].get("key lengths", 0) > 0, bert["routing"]


def test_flux_http_npz_and_json_grouped_by_shape(cluster: dict[str, str], flux: torch.nn.Module) -> None:
    # Equal shapes (batched together), another image size, another text length.
    reqs = [flux_request(16, 8, i) for i in range(3)] + [flux_request(40, 8, 3), flux_request(16, 5, 4)]
    with cf.ThreadPoolExecutor(8) as pool:
        npz = list(pool.map(lambda r: post_npz("flux", r), reqs))
        js = list(pool.map(lambda r: post_json("flux", r), reqs[:2]))
    for req, r in zip(reqs, npz):
        y = _npz(r)["sample"]
        assert y.shape == req["hidden_states"].shape and y.dtype == np.float32
        np.testing.assert_allclose(y, flux_expect(flux, req), atol=ATOL)
    for req, r in zip(reqs, js):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["outputs"]["sample"]), flux_expect(flux, req), atol=ATOL)


def test_bert_lengths_batched_with_padding(cluster: dict[str, str], bert: torch.nn.Module) -> None:
    before = requests.get(f"{URL}/bert/v1/stats", timeout=30).json()["buckets"]["64"]
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, 64, int(n)) for n in rng.integers(3, 64, 24)]
    with cf.ThreadPoolExecutor(24) as pool:
        rs = list(pool.map(lambda x: post_npz("bert", {"input_ids": x}), ids))
    for x, r in zip(ids, rs):
        y = _npz(r)["last_hidden_state"]
        assert y.shape == (len(x), 32)
        # Row for row what the sequence gives alone: its padding in the batch changed nothing.
        np.testing.assert_allclose(y, bert_expect(bert, x), atol=ATOL)
    after = requests.get(f"{URL}/bert/v1/stats", timeout=30).json()["buckets"]["64"]
    assert after["requests"] - before["requests"] == 24
    assert after["max_batch"] > 1, after  # lengths differ, yet they shared batches
    assert after["computed_tokens"] - before["computed_tokens"] > after["tokens"] - before["tokens"]  # padded
    r = post_json("bert", {"input_ids": ids[0].tolist()})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(
        np.asarray(r.json()["outputs"]["last_hidden_state"]), bert_expect(bert, ids[0]), atol=ATOL
    )


BAD = [
    ("sd3", {**sd3_request(8, 8, 8, 0), "hidden_states": np.zeros((4, 9, 8), np.float32)}, "H=9"),
    ("bert", {"input_ids": np.arange(5), "token_type_ids": np.zeros(5, np.int64)}, "token_type_ids"),
    ("bert", {}, "input_ids"),
    ("bert", {"input_ids": np.zeros((2, 5), np.int64)}, "input_ids"),
    ("bert", {"input_ids": np.full(5, 0.5)}, "input_ids"),
    ("bert", {"input_ids": np.zeros(600, np.int64)}, "input_ids"),
    (
        "flux",
        {**flux_request(16, 8, 0), "encoder_hidden_states": np.zeros((80, 32), np.float32)},
        "encoder_hidden_states",
    ),
    ("flux", {**flux_request(16, 8, 0), "pooled_projections": np.zeros(31, np.float32)}, "pooled_projections"),
    ("flux", {**flux_request(16, 8, 0), "img_ids": np.zeros((17, 3), np.float32)}, "img_ids"),
    ("flux", {**flux_request(16, 8, 0), "hidden_states": np.full((16, 8), np.nan, np.float32)}, "hidden_states"),
]


def test_bad_inputs_are_4xx_naming_the_input(cluster: dict[str, str], bert: torch.nn.Module) -> None:
    rng = np.random.default_rng(9)
    good = [rng.integers(0, 64, int(n)) for n in (9, 30, 50)]
    with cf.ThreadPoolExecutor(16) as pool:
        bad = [pool.submit(post_npz, app, inputs) for app, inputs, _ in BAD]
        ok = [pool.submit(post_npz, "bert", {"input_ids": x}) for x in good]
        for f, (app, _, name) in zip(bad, BAD):
            r = f.result()
            assert 400 <= r.status_code < 500, (app, name, r.status_code, r.text)
            assert name in r.json()["error"], r.json()
        for f, x in zip(ok, good):
            np.testing.assert_allclose(_npz(f.result())["last_hidden_state"], bert_expect(bert, x), atol=ATOL)
    r = requests.post(
        f"{URL}/bert/v1/infer", data=b"not a zip", headers={"content-type": "application/x-npz"}, timeout=30
    )
    assert r.status_code == 400 and "npz" in r.json()["error"]
    r = requests.post(f"{URL}/bert/v1/infer", json={"inputs": {"input_ids": [[1, 2], [3]]}}, timeout=30)
    assert r.status_code == 422 and "input_ids" in r.json()["error"]


@pytest.mark.parametrize("app, lengths", [("bert", "7,30,60"), ("flux", "16,16,40"), ("sd3", "8,16,16")])
def test_handle_from_another_ray_job(
    cluster: dict[str, str],
    app: str,
    lengths: str,
    flux: torch.nn.Module,
    bert: torch.nn.Module,
    sd3: torch.nn.Module,
    tmp_path: Path,
) -> None:
    out = tmp_path / "handle.npz"
    cmd = [sys.executable, "examples/handle_client.py", "--app", app, "--lengths", lengths, "--save", str(out)]
    r = run(cmd, cluster, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    models = {"flux": flux, "bert": bert, "sd3": sd3}
    with np.load(out, allow_pickle=False) as data:
        for i in range(3):
            req = {k.split("_", 1)[1]: data[k] for k in data.files if k.startswith(f"in{i}_")}
            (got,) = [data[k] for k in data.files if k.startswith(f"out{i}_")]
            np.testing.assert_allclose(got, _expect(app, models, req), atol=ATOL)


def test_sd3_latents_over_http(cluster: dict[str, str], sd3: torch.nn.Module) -> None:
    """A DiT with 4-D latents through the one pipeline: equal shapes batched, other sizes apart,
    over .npz and JSON, each answer the eager unrouted model's."""
    reqs = [sd3_request(16, 12, 8, i) for i in range(3)] + [sd3_request(32, 8, 8, 3), sd3_request(6, 64, 3, 4)]
    with cf.ThreadPoolExecutor(8) as pool:
        npz = list(pool.map(lambda r: post_npz("sd3", r), reqs))
        js = list(pool.map(lambda r: post_json("sd3", r), reqs[3:]))
    for req, r in zip(reqs, npz):
        y = _npz(r)["sample"]
        assert y.shape == req["hidden_states"].shape
        np.testing.assert_allclose(y, sd3_expect(sd3, req), atol=ATOL)
    for req, r in zip(reqs[3:], js):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.asarray(r.json()["outputs"]["sample"]), sd3_expect(sd3, req), atol=ATOL)


@pytest.mark.parametrize(
    "h, w, message",
    [
        (7, 8, "input 'hidden_states' has axis H=7, which is not a multiple of 2"),
        (8, 9, "input 'hidden_states' has axis W=9, which is not a multiple of 2"),
        (2, 8, "input 'hidden_states' has axis H=2; this model takes at least 4 along H"),
        (8, 2, "input 'hidden_states' has axis W=2, outside this model's range [4, 64]"),
    ],
)
def test_latent_sizes_the_model_cannot_take_are_422_naming_the_axis(
    cluster: dict[str, str], h: int, w: int, message: str
) -> None:
    r = post_npz("sd3", sd3_request(h, w, 8, 0))
    assert r.status_code == 422 and message in r.json()["error"], r.text


def _rows(app: str) -> list[dict[str, np.ndarray]]:
    """Two requests of one shape for ``app``, as the protocol's batch axis carries them."""
    if app == "flux":
        return [flux_request(16, 8, i) for i in range(2)]
    if app == "bert":
        rng = np.random.default_rng(11)
        return [{"input_ids": rng.integers(0, 64, 20)} for _ in range(2)]
    return [sd3_request(16, 12, 8, i) for i in range(2)]


def _expect(app: str, models: dict[str, torch.nn.Module], req: dict[str, np.ndarray]) -> np.ndarray:
    if app == "flux":
        return flux_expect(models[app], req)
    if app == "bert":
        return bert_expect(models[app], req["input_ids"])
    return sd3_expect(models[app], req)


@pytest.mark.parametrize("app", list(APPS))
def test_kserve_v2_of_every_model(
    cluster: dict[str, str], app: str, flux: torch.nn.Module, bert: torch.nn.Module, sd3: torch.nn.Module
) -> None:
    """The unmodified tritonclient against each app's own routes (under its prefix): every
    declared input a protocol input, a row per request, each answer the eager unrouted model's."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:8000/{app}")
    meta = client.get_model_metadata(app)
    rows = _rows(app)
    inputs = []
    for spec in meta["inputs"]:
        x = np.stack([np.asarray(r[spec["name"]]) for r in rows])
        x = x.astype(np.int64 if spec["datatype"].startswith("INT") else np.float32)
        inp = httpclient.InferInput(spec["name"], list(x.shape), spec["datatype"])
        inp.set_data_from_numpy(x, binary_data=True)
        inputs.append(inp)
    out = client.infer(app, inputs).as_numpy(meta["outputs"][0]["name"])
    models = {"flux": flux, "bert": bert, "sd3": sd3}
    for i, r in enumerate(rows):
        np.testing.assert_allclose(out[i], _expect(app, models, r), atol=ATOL)
