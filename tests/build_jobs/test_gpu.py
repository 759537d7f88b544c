"""GPU proof: two build items run at once on two different GPUs, the plugin registered in each.

Run on a 2-GPU machine: ``python3 -m pytest -q -m gpu tests/build_jobs/test_gpu.py -s``.
Works with either backend: TensorRT where it imports on the driver (engines, plugin registered
in each worker), else torch (each item still takes ``num_gpus=1``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from build_jobs import build_all
from fa3trt import tensorrt_available
from fa3trt.config import load_serve_config
from tests.build_jobs.helpers import app, overlaps, write_config
from tests.utils import gpu


@pytest.fixture(scope="module")
def gpu_cluster() -> Iterator[dict[str, float]]:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    if ray.is_initialized():
        ray.shutdown()
    # Ray detects the GPUs and labels the node accelerator_type:<T> itself.
    ray.init(address="local", include_dashboard=False)
    yield ray.cluster_resources()
    ray.shutdown()


@gpu
def test_two_items_build_on_two_gpus_at_once(gpu_cluster: dict[str, float], tmp_path: Path) -> None:
    types = [k.split(":", 1)[1] for k in gpu_cluster if k.startswith("accelerator_type:")]
    assert gpu_cluster.get("GPU", 0) >= 2 and len(types) == 1, gpu_cluster
    # Two specs (one GPU type): two items. bfloat16 makes each item long enough to overlap
    # (TensorRT: an engine build; torch: the float32 verification export).
    cfg = write_config(
        tmp_path / "serve.yaml",
        [
            app("one", tmp_path / "store", dtype="bfloat16", seed=0),
            app("two", tmp_path / "store", dtype="bfloat16", seed=1),
        ],
    )
    backend = "tensorrt" if tensorrt_available() else "torch"
    results = build_all(load_serve_config(cfg), backend=backend, progress=False)
    for r in results:
        print(
            f"{r.spec}: {r.status} backend={r.backend} gpu_type={r.gpu_type} CUDA_VISIBLE_DEVICES={r.cuda_visible_devices} "
            f"ray_gpu_ids={r.gpu_ids} device={r.details.get('device_name')} uuid={r.details.get('device_uuid')} "
            f"window=({r.start}, {r.end}) plugin_registered={r.plugin_registered} key={r.key} error={r.error}"
        )
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    a, b = results
    assert a.gpu_type == b.gpu_type == types[0]
    assert len(a.gpu_ids) == len(b.gpu_ids) == 1 and a.gpu_ids != b.gpu_ids
    assert a.cuda_visible_devices != b.cuda_visible_devices
    assert a.details.get("device_uuid") != b.details.get("device_uuid")
    assert overlaps((a.start, a.end), (b.start, b.end)), (a.start, a.end, b.start, b.end)  # type: ignore[arg-type]
    assert all(r.plugin_registered == (backend == "tensorrt") for r in results)
    # Each worker logged its registration (or its torch build) with its CUDA_VISIBLE_DEVICES.
    logs_dir = ray._private.worker.global_worker.node.get_logs_dir_path()
    lines = [
        line
        for p in glob.glob(os.path.join(logs_dir, "worker-*.err"))
        for line in Path(p).read_text(errors="replace").splitlines()
    ]
    phrase = "registered the attention plugin" if backend == "tensorrt" else "building torch artifacts"
    for r in results:
        mine = [ln for ln in lines if phrase in ln and f"worker pid {r.pid} " in ln]
        assert any(f"CUDA_VISIBLE_DEVICES={r.cuda_visible_devices}," in ln for ln in mine), (r.pid, mine[:3])
        print("worker log:", mine[0])
