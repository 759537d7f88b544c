"""build_jobs on a real local Ray cluster (2 CPUs) whose node declares two GPU types, as Ray labels
GPU nodes. Torch backend (no GPUs): each item verifies its spec's ONNX export (made once per
spec) in ONNX Runtime against the eager model; the reference model and a user's go alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from itertools import combinations
from pathlib import Path

import pytest
import ray

from build_jobs import BuildResult, build_all, compute_plan
from build_jobs.plan import RECORD_KIND
from fa3trt.config import load_serve_config
from fa3trt.errors import ArtifactCorruptError
from fa3trt.store import ArtifactStore
from tests.build_jobs.helpers import app, garbage_weights, overlaps, write_config

REPO = Path(__file__).resolve().parents[2]
TYPES = {"accelerator_type:H100": 1.0, "accelerator_type:A100": 1.0}


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    if ray.is_initialized():
        ray.shutdown()
    # address="local": a fresh cluster even if another one runs on this machine.
    ray.init(address="local", num_cpus=2, resources=TYPES, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("build_jobs")


@pytest.fixture(scope="module")
def config(workdir: Path) -> Path:
    # Spec b is bfloat16: its items also export a float32 copy to verify, which keeps them
    # running long enough that overlapping time stamps mean concurrency, not luck.
    store = workdir / "store"
    return write_config(workdir / "serve.yaml", [app("a", store), app("b", store, dtype="bfloat16", seed=1)])


@pytest.fixture(scope="module")
def first_build(cluster: None, config: Path) -> list[BuildResult]:
    return build_all(config, progress=False)


def test_plan_from_a_serve_config_on_the_cluster(cluster: None, config: Path) -> None:
    specs = load_serve_config(config)
    plan = compute_plan(specs, ray.cluster_resources())
    assert [(i.app, i.gpu_type, i.backend, i.num_gpus) for i in plan] == [
        ("a", "A100", "torch", 0),
        ("a", "H100", "torch", 0),
        ("b", "A100", "torch", 0),
        ("b", "H100", "torch", 0),
    ]
    assert plan[3].task_options()["resources"] == {"accelerator_type:H100": 0.001}


def test_items_run_concurrently_and_land_in_the_store(first_build: list[BuildResult], config: Path) -> None:
    results = first_build
    assert [(r.spec, r.gpu_type, r.status) for r in results] == [
        ("a", "A100", "ok"),
        ("a", "H100", "ok"),
        ("b", "A100", "ok"),
        ("b", "H100", "ok"),
    ], [r.error for r in results]
    windows = [(r.start, r.end) for r in results]
    assert all(s is not None and e is not None and s < e for s, e in windows)
    assert any(overlaps(a, b) for a, b in combinations(windows, 2)), windows  # type: ignore[arg-type]
    store = ArtifactStore(load_serve_config(config)[0][1].store)
    for r in results:
        assert r.artifact_kind == "onnx" and r.key.startswith("onnx-") and r.size and r.size > 0
        assert r.node_id and r.seconds is not None and r.seconds > 0
        record = store.get(RECORD_KIND, r.item_key)[1]
        assert record["gpu_type"] == r.gpu_type and record["onnx_max_abs_error"] <= 1e-4
        meta = store.metadata("onnx", r.key)
        assert meta["plugin_nodes"] == 1 and meta["inputs"]["x"]["shape"] == ["B", "S", 256]
    # One ONNX per spec, exported once and shared by both GPU types (b's float32 check stays local).
    assert len(store.list("onnx")) == 2
    assert len({r.key for r in results}) == 2


def test_second_run_skips_everything(first_build: list[BuildResult], config: Path) -> None:
    again = build_all(config, progress=False)
    assert [r.status for r in again] == ["skipped"] * 4
    assert [r.key for r in again] == [r.key for r in first_build]


def test_dry_run_builds_nothing(cluster: None, workdir: Path) -> None:
    store = workdir / "dry-store"
    cfg = write_config(workdir / "dry.yaml", [app("d", store, seed=5)])
    results = build_all(cfg, dry_run=True, progress=False)
    assert [(r.gpu_type, r.status) for r in results] == [("A100", "planned"), ("H100", "planned")]
    assert not store.exists() or not any(store.rglob("*.json"))


def test_two_tasks_write_one_key_concurrently(cluster: None, workdir: Path) -> None:
    root = str(workdir / "race")

    @ray.remote(num_cpus=1)
    def writer(w: int) -> list[int]:
        store = ArtifactStore(root)
        sizes = []
        for i in range(30):
            data = bytes([w]) * (50_000 + 1000 * i + w)
            store.put("engines", "same-key", data, {"writer": w, "round": i})
            sizes.append(len(data))
        return sizes

    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        store = ArtifactStore(root)
        while not stop.is_set():
            if store.has("engines", "same-key"):
                try:
                    data, meta = store.get("engines", "same-key")
                    assert data == bytes([meta["writer"]]) * len(data)
                except BaseException as e:  # noqa: BLE001 - reported by the assert below
                    errors.append(e)
                    return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        ray.get([writer.remote(1), writer.remote(2)])
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
    data, meta = ArtifactStore(root).get("engines", "same-key")
    assert meta["round"] == 29 and data == bytes([meta["writer"]]) * (50_000 + 29_000 + meta["writer"])


def test_failing_item_is_reported_while_others_succeed(cluster: None, workdir: Path) -> None:
    store = workdir / "fail-store"
    bad = garbage_weights(workdir / "not-safetensors.safetensors")
    cfg = write_config(workdir / "fail.yaml", [app("good", store, seed=2), app("bad", store, weights=str(bad))])
    results = build_all(cfg, progress=False, max_retries=1)
    status = {(r.spec, r.gpu_type): r for r in results}
    assert {k: r.status for k, r in status.items()} == {
        ("good", "A100"): "ok",
        ("good", "H100"): "ok",
        ("bad", "A100"): "failed",
        ("bad", "H100"): "failed",
    }
    for gpu in ("A100", "H100"):
        err = status[("bad", gpu)].error or ""
        assert "ONNX export of 'bad' failed" in err and "SafetensorError" in err, err
    assert not ArtifactStore(store).has(RECORD_KIND, status[("bad", "H100")].item_key)


def test_corrupt_entry_is_detected_and_force_rebuilds(first_build: list[BuildResult], config: Path) -> None:
    specs = load_serve_config(config)
    store = ArtifactStore(specs[0][1].store)
    r = first_build[0]
    blob = Path(store.root) / "onnx" / store.metadata("onnx", r.key)["blob"]
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    blob.write_bytes(bytes(raw))
    with pytest.raises(ArtifactCorruptError, match=rf"onnx/{r.key} .* fails its checksum .* --force"):
        store.get("onnx", r.key)
    before = store.metadata(RECORD_KIND, r.item_key)["stored_at"]
    rebuilt = build_all(specs[:1], force=True, progress=False)
    assert [x.status for x in rebuilt] == ["ok", "ok"]
    assert store.get("onnx", r.key)[1]["stored_at"] > before
    assert store.metadata(RECORD_KIND, r.item_key)["stored_at"] > before


def test_cli_end_to_end(cluster: None, workdir: Path) -> None:
    """``python -m build_jobs`` in a subprocess, connected to this module's cluster by address."""
    store = workdir / "cli-store"
    bad = garbage_weights(workdir / "cli-bad.safetensors")
    cfg = write_config(
        workdir / "cli.yaml", [app("good", "./unused", seed=4), app("bad", "./unused", weights=str(bad))]
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    address = ray.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "build_jobs",
        "--config",
        str(cfg),
        "--store",
        str(store),
        "--address",
        address,
        "--retries",
        "0",
        "--no-progress",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    if out.returncode == 2 and "could not start or connect to Ray" in out.stderr:
        # A loaded 2-core CI machine can miss Ray's connect deadline once; that is not what we test.
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "plan: 4 items, 4 to build" in out.stdout, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("key "))
    for col in ("gpu type", "build time", "size", "status"):
        assert col in header
    good = [line for line in lines if line.startswith("onnx-") and " good " in line]
    assert len(good) == 2 and all(" ok" in line and ("KiB" in line or "MiB" in line) for line in good), out.stdout
    assert sum(" bad " in line and "failed" in line for line in lines) == 2, out.stdout
    assert "FAILED bad on H100" in out.stderr and "SafetensorError" in out.stderr
    # A dry run of the same config: the good items are in the store now; nothing is built; exit 0.
    dry = subprocess.run(cmd + ["--dry-run"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "2 skipped, 2 planned" in dry.stdout
    assert not (REPO / "unused").exists()


def _kill_worker_running(task_name: str, timeout: float = 120) -> int:
    """SIGKILL the Ray worker process while it runs ``task_name`` (Ray titles it ``ray::NAME``)."""
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{task_name}"):
                os.kill(int(pid), signal.SIGKILL)
                return int(pid)
        time.sleep(0.02)
    raise TimeoutError(f"no worker ran {task_name} within {timeout}s")


def _build_in_thread(cfg: Path, max_retries: int) -> tuple[threading.Thread, list[list[BuildResult]]]:
    out: list[list[BuildResult]] = []
    t = threading.Thread(target=lambda: out.append(build_all(cfg, progress=False, max_retries=max_retries)))
    t.start()
    return t, out


@pytest.mark.parametrize("retries", [1, 0])
def test_worker_killed_mid_build_is_retried_or_reported(cluster: None, workdir: Path, retries: int) -> None:
    """A build worker that dies (SIGKILL, as on a node failure or the OOM killer) is retried up to
    ``max_retries`` times; past that the item is reported failed, and the store shows nothing of it."""
    store = workdir / f"kill-store-{retries}"
    cfg = write_config(workdir / f"kill-{retries}.yaml", [app("dies", store, dtype="bfloat16", seed=10 + retries)])
    ray.get(ray.remote(lambda: None).options(resources={"accelerator_type:H100": 0.001}).remote())  # a warm worker pool
    thread, out = _build_in_thread(cfg, retries)
    killed = _kill_worker_running("build:dies@H100")
    thread.join(300)
    assert out, "build_all did not return"
    results = {r.gpu_type: r for r in out[0]}
    assert results["A100"].status == "ok"
    dead = results["H100"]
    st = ArtifactStore(store)
    if retries:
        assert dead.status == "ok", dead.error
        assert dead.pid != killed  # it ran again, in another worker
        assert st.get(RECORD_KIND, dead.item_key)[1]["pid"] == dead.pid
    else:
        assert dead.status == "failed"
        assert "dies@H100" in (dead.error or "") and "died" in (dead.error or "").lower(), dead.error
        assert not st.has(RECORD_KIND, dead.item_key)
    for kind in ("onnx", "artifacts", RECORD_KIND):  # whatever is visible is whole
        for entry in st.list(kind):
            st.get(kind, entry["key"])


def test_a_users_model_is_planned_exported_and_verified(cluster: None, workdir: Path) -> None:
    """The example configs (diffusers FLUX, transformers BERT): the dry run plans them; a build
    exports FLUX with its attention routed and checks it in ONNX Runtime against the eager model."""
    import yaml

    specs = []
    for name in ("flux", "bert"):
        doc = yaml.safe_load((REPO / f"examples/serve_{name}.yaml").read_text())
        doc["applications"][0].update(name=name)
        doc["applications"][0]["args"]["store"] = str(workdir / "user-store")
        specs.append(doc["applications"][0])
    cfg = workdir / "user.yaml"
    cfg.write_text(yaml.safe_dump({"applications": specs}, sort_keys=False))
    planned = build_all(cfg, dry_run=True, progress=False)
    assert sorted((r.spec, r.status) for r in planned) == [(a, "planned") for a in ("bert", "bert", "flux", "flux")]
    plan = compute_plan(load_serve_config(cfg), ray.cluster_resources())
    assert len({i.onnx_key for i in plan}) == 2 and len({i.item_key for i in plan}) == 4
    assert plan[0].model.describe() == "diffusers FluxTransformer2DModel float32"

    flux = [s for s in specs if s["name"] == "flux"]
    only = workdir / "flux.yaml"
    only.write_text(yaml.safe_dump({"applications": flux}, sort_keys=False))
    results = build_all(only, progress=False)
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    store = ArtifactStore(workdir / "user-store")
    record = store.metadata(RECORD_KIND, results[0].item_key)
    assert record["artifact_kind"] == "onnx" and record["onnx_max_abs_error"] < 1e-4, record
    meta = store.metadata("onnx", record["artifact_key"])
    # One node per attention call of its 2 + 2 blocks; the image tokens' axis named as configured.
    assert meta["plugin_nodes"] == 4 and meta["inputs"]["hidden_states"]["shape"] == ["B", "S", 8], meta
    assert meta["inputs"]["img_ids"]["shape"] == ["S", 3] and meta["output"]["name"] == "sample", meta
    # A second run finds both in the store.
    assert [r.status for r in build_all(only, progress=False)] == ["skipped", "skipped"]
