"""`serve run` of a config whose model cannot load fails at once, with the fix: the app builder
checks the source before any replica starts and stops `serve run` (which otherwise waits on a
failed app forever). A real `ray start` cluster whose Python finds a `diffusers` that does not
import (a package that raises on import, first on the path): as on a node without it."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from tests.deploy.cluster import ROOT, run


def test_serve_run_of_a_missing_source_package_exits_naming_the_install(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "diffusers"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("diffusers is not installed on this node")\n')
    doc = yaml.safe_load((ROOT / "examples/serve_flux.yaml").read_text())
    config = tmp_path / "flux.yaml"
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = dict(
        os.environ,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    ray_bin, serve_bin = shutil.which("ray") or "ray", shutil.which("serve") or "serve"
    out = run([ray_bin, "start", "--head", "--num-cpus=2", "--port=6379", "--disable-usage-stats"], env)
    assert out.returncode == 0, out.stderr
    env["RAY_ADDRESS"] = "auto"
    try:
        t0 = time.monotonic()
        r = subprocess.run(
            [serve_bin, "run", str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - t0
    finally:
        run([ray_bin, "stop", "--force"], env)
    output = r.stdout + r.stderr
    assert r.returncode != 0 and took < 60, (r.returncode, took, output[-3000:])
    assert "the fa3trt app cannot start: MissingDependencyError: model.source diffusers needs the diffusers" in output
    assert "pip install 'fa3trt[diffusers]'" in output, output[-3000:]
