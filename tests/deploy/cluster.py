"""Real Ray for end-to-end tests: a local cluster with `serve run serve_config.yaml` on it, or
the app deployed on an in-process Ray."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[2]
URL = "http://127.0.0.1:8000"


def post_npy(url: str, x: np.ndarray, timeout: float = 60) -> requests.Response:
    """POST one sequence as a .npy body to ``url``/v1/infer."""
    buf = io.BytesIO()
    np.save(buf, x)
    return requests.post(
        f"{url}/v1/infer", data=buf.getvalue(), headers={"content-type": "application/x-npy"}, timeout=timeout
    )


def run(cmd: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def wait_ready(proc: subprocess.Popen[str], timeout: float = 300, prefixes: tuple[str, ...] = ("",)) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with {proc.returncode}")
        try:
            if all(requests.get(f"{URL}{p}/v1/info", timeout=5).status_code == 200 for p in prefixes):
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError("the app did not become ready")


@contextmanager
def serve_cluster(
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    num_cpus: int = 2,
    config: str | Path = "serve_config.yaml",
    prefixes: tuple[str, ...] = ("",),
) -> Iterator[dict[str, str]]:
    """`ray start --head`, then `serve run <config>` (default the shipped serve_config.yaml)
    until every route prefix in ``prefixes`` answers ``/v1/info``; yields the env for client
    processes."""
    ray_bin = shutil.which("ray") or "ray"
    serve_bin = shutil.which("serve") or "serve"
    # Token authentication, with a token of this cluster's own in the environment of every
    # process started here (`ray start`, `serve run`, client drivers): nothing is read from or
    # written to ~/.ray, so a fresh machine needs no `ray get-auth-token --generate` first.
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        **(extra_env or {}),
    )
    out = run(
        [
            ray_bin,
            "start",
            "--head",
            f"--num-cpus={num_cpus}",
            "--port=6379",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
        ],
        env,
    )
    assert out.returncode == 0, out.stderr
    env["RAY_ADDRESS"] = "auto"
    with open(log_dir / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [serve_bin, "run", str(config)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        try:
            try:
                wait_ready(proc, prefixes=prefixes)
            except Exception as e:
                log.flush()
                tail = (log_dir / "serve.log").read_text(errors="replace")[-6000:]
                raise RuntimeError(f"{e}; serve run log tail:\n{tail}") from e
            yield env
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            run([ray_bin, "stop", "--force"], env)


@contextmanager
def local_app(args: dict[str, Any], port: int) -> Iterator[str]:
    """The app built from ``args`` on an in-process Ray (2 CPUs), HTTP on ``port``; yields its URL.
    Its handle is ``serve.get_app_handle("fa3trt")``."""
    import ray
    from ray import serve

    from deploy.app import build_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="fa3trt", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
