"""The build jobs never import the Serve app: they read the config from ``fa3trt.config``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter: imports every build_jobs module, then walks the paths that read a serve
# config (load_specs) and plan its builds (compute_plan), and lists any deploy module loaded.
SCRIPT = r"""
import importlib, pkgutil, sys, tempfile
import build_jobs
for m in pkgutil.walk_packages(build_jobs.__path__, "build_jobs."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from build_jobs.plan import compute_plan
from build_jobs.runner import load_specs
specs = load_specs(sys.argv[1])
with tempfile.TemporaryDirectory() as store:
    plan = compute_plan(specs, {"CPU": 2.0}, store, trt_available=False)
assert [i.action for i in plan] == ["build"], plan
print(sorted(m for m in sys.modules if m == "deploy" or m.startswith("deploy.")))
"""


def test_build_jobs_never_imports_deploy() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "serve_config.yaml")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", f"build_jobs imported {out.stdout.strip()}"
