"""GPU proof: `serve run serve_config.yaml` on a machine with two or more GPUs gives one replica
per GPU, each with its own backend on its own card, both answering; the handle path works from
a second driver process. The seed preset (4096 wide, bf16) with one layer, switched on by the
README's environment override. Numbers are compared with the same model run in this process
(bf16: relative error under 2e-2).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

import fa3trt
from tests.deploy.cluster import URL, post_npy, run, serve_cluster
from tests.utils import gpu, rel_err

pytestmark = gpu


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    env = {"FA3TRT_MODEL_PRESET": "seed", "FA3TRT_MODEL_LAYERS": "1"}
    with serve_cluster(tmp_path_factory.mktemp("gpu-serve"), env, num_cpus=8) as env:
        yield env


def _post(x: np.ndarray) -> requests.Response:
    return post_npy(URL, x, timeout=120)


def test_one_replica_per_gpu_both_serving(cluster: dict[str, str], tmp_path: Path) -> None:
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("seed", layers=1), device="cuda")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(n), 4096)).astype(np.float32) for n in rng.integers(64, 2048, 64)]
    with cf.ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(_post, xs))
    replicas: dict[str, int] = {}
    for x, r in zip(xs, rs):
        assert r.status_code == 200, r.text
        y = torch.from_numpy(np.load(io.BytesIO(r.content)))
        with torch.inference_mode():
            want = model(torch.from_numpy(x).cuda().bfloat16()[None])[0].float().cpu()
        assert rel_err(y, want) < 2e-2
        replicas[r.headers["x-fa3trt-replica"]] = replicas.get(r.headers["x-fa3trt-replica"], 0) + 1
    infos = {}
    for _ in range(40):
        info = requests.get(f"{URL}/v1/info", timeout=30).json()
        infos[info["replica"]] = info
        if len(infos) >= 2:
            break
    print(f"\nrequests per replica: {replicas}")
    for rid, info in infos.items():
        print(
            f"replica {rid}: {info['device_name']} CUDA_VISIBLE_DEVICES={info['cuda_visible_devices']} backend={info['backend']} kernel={info['attention_kernel']}"
        )
    assert len(replicas) == 2, f"requests were answered by {replicas}"
    assert len({i["cuda_visible_devices"] for i in infos.values()}) == 2, infos
    assert all(i["device"].startswith("cuda") for i in infos.values())


def test_handle_from_a_second_driver(cluster: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "h.npz"
    r = run([sys.executable, "examples/handle_client.py", "--hidden", "4096", "--save", str(out)], cluster, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    print(r.stdout)
    model = fa3trt.build_model(fa3trt.ModelConfig.preset("seed", layers=1), device="cuda")
    data = np.load(out, allow_pickle=False)
    for i in range(3):
        with torch.inference_mode():
            want = model(torch.from_numpy(data[f"x{i}"]).cuda().bfloat16()[None])[0].float().cpu()
        assert rel_err(torch.from_numpy(data[f"y{i}"]), want) < 2e-2
