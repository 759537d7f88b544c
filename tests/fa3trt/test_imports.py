"""Every module imports on a machine with no TensorRT, no CUDA and no FA3."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = r"""
import sys, importlib.abc
BLOCKED = {"tensorrt", "flash_attn_interface", "cupy", "cuda", "pycuda"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} blocked for this test")
sys.meta_path.insert(0, Block())
import pkgutil, importlib
import fa3trt, build_jobs, deploy
for pkg in (fa3trt, build_jobs, deploy):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if m.name.endswith("__main__"):
            continue
        importlib.import_module(m.name)
from fa3trt import _trt
assert not _trt.available()
try:
    _trt.module()
except ImportError as e:
    assert "install TensorRT" in str(e), e
else:
    raise SystemExit("module() did not raise")
print("ok", sorted(fa3trt.__all__)[:3])
"""


def test_import_without_optional_dependencies() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
