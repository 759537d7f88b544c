"""The plan as a plain function of (specs, cluster resources, store): no Ray tasks started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from build_jobs.plan import ACCELERATOR_FRACTION, RECORD_KIND, compute_plan, gpu_types
from fa3trt.config import load_serve_config
from fa3trt.errors import ConfigError
from fa3trt.store import ArtifactStore
from tests.build_jobs.helpers import app, write_config

GPU_CLUSTER = {"CPU": 64.0, "GPU": 4.0, "accelerator_type:H100": 2.0, "accelerator_type:A100": 2.0, "memory": 1e11}
CPU_CLUSTER = {"CPU": 8.0, "memory": 1e10}


@pytest.fixture
def specs(tmp_path: Path) -> list:
    cfg = write_config(tmp_path / "serve.yaml", [app("a", tmp_path / "s"), app("b", tmp_path / "s", seed=3)])
    return load_serve_config(cfg)


def test_gpu_types_from_cluster_resources() -> None:
    assert gpu_types(GPU_CLUSTER) == ["A100", "H100"]
    assert gpu_types(CPU_CLUSTER) == []
    assert gpu_types({"accelerator_type:": 1.0, "accelerator_type:L4": 0.0}) == []


def test_one_item_per_spec_and_gpu_type(specs: list) -> None:
    plan = compute_plan(specs, GPU_CLUSTER, trt_available=True)
    assert [(i.app, i.gpu_type, i.backend) for i in plan] == [
        ("a", "A100", "tensorrt"),
        ("a", "H100", "tensorrt"),
        ("b", "A100", "tensorrt"),
        ("b", "H100", "tensorrt"),
    ]
    assert len({i.item_key for i in plan}) == 4 and all(i.action == "build" for i in plan)
    assert plan[0].onnx_key == plan[1].onnx_key != plan[2].onnx_key  # one export per spec
    opts = plan[1].task_options(max_retries=3)
    assert opts["num_gpus"] == 1 and opts["resources"] == {"accelerator_type:H100": ACCELERATOR_FRACTION}
    assert opts["max_retries"] == 3 and opts["retry_exceptions"] is True
    # auto without TensorRT on the driver builds torch artifacts, still one GPU per item
    torch_plan = compute_plan(specs, GPU_CLUSTER, trt_available=False)
    assert {i.backend for i in torch_plan} == {"torch"} and all(i.num_gpus == 1 for i in torch_plan)


def test_cpu_cluster_gets_one_torch_item_per_spec(specs: list) -> None:
    plan = compute_plan(specs, CPU_CLUSTER, trt_available=True)
    assert [(i.app, i.gpu_type, i.backend, i.num_gpus) for i in plan] == [
        ("a", None, "torch", 0),
        ("b", None, "torch", 0),
    ]
    assert plan[0].task_options()["resources"] == {}
    with pytest.raises(ConfigError, match=r"backend 'tensorrt' needs GPUs .* use --backend torch"):
        compute_plan(specs, CPU_CLUSTER, backend="tensorrt")


def test_store_override_and_absolute_paths(specs: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    plan = compute_plan(specs, CPU_CLUSTER, "rel-store")
    assert {i.store for i in plan} == {str(tmp_path / "rel-store")}
    assert {i.store for i in compute_plan(specs, CPU_CLUSTER)} == {str(tmp_path / "s")}


def test_duplicate_specs_are_built_once(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "serve.yaml", [app("a", tmp_path), app("a2", tmp_path)])
    plan = compute_plan(load_serve_config(cfg), CPU_CLUSTER)
    assert [i.action for i in plan] == ["build", "skip"] and "same build as app 'a'" in plan[1].reason


def test_items_in_the_store_are_skipped_unless_forced(specs: list, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    first = compute_plan(specs, GPU_CLUSTER, trt_available=True)
    done = first[1]
    # A record without its artifact does not count as built.
    record = {"artifact_kind": "engines", "artifact_key": "engine-x", "seconds": 1.0}
    store.put(RECORD_KIND, done.item_key, json.dumps(record).encode(), record)
    again = compute_plan(specs, GPU_CLUSTER, trt_available=True)
    assert again[1].action == "build" and "missing" in again[1].reason
    store.put("engines", "engine-x", b"engine")
    again = compute_plan(specs, GPU_CLUSTER, trt_available=True)
    assert [i.action for i in again] == ["build", "skip", "build", "build"]
    assert again[1].existing is not None and again[1].existing["artifact_key"] == "engine-x"
    forced = compute_plan(specs, GPU_CLUSTER, trt_available=True, force=True)
    assert all(i.action == "build" for i in forced)
    # The key follows what changes the engine: other buckets, another item.
    other = compute_plan(specs, GPU_CLUSTER, trt_available=True, backend="torch")
    assert {i.item_key for i in other}.isdisjoint({i.item_key for i in first})
