"""Every module imports on a machine with no TensorRT, no CUDA, no FA3, no transformers and no
diffusers; every exception class of the project lives in ``fa3trt.errors`` and is exported by
``fa3trt``."""

from __future__ import annotations

import subprocess
import sys

BLOCKER = r"""
import sys, importlib.abc
BLOCKED = {"tensorrt", "flash_attn_interface", "cupy", "cuda", "pycuda", "transformers", "diffusers"}
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
from fa3trt.trt import _trt
assert not _trt.available()
try:
    _trt.module()
except ImportError as e:
    assert "install TensorRT" in str(e), e
else:
    raise SystemExit("module() did not raise")
# One error tree: every exception class defined in the project is defined in fa3trt.errors.
import inspect, fa3trt.errors
for name, mod in sorted(sys.modules.items()):
    if name.split(".")[0] in ("fa3trt", "build_jobs", "deploy") and name != "fa3trt.errors":
        for cls_name, cls in vars(mod).items():
            if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == name:
                raise SystemExit(f"{name}.{cls_name} belongs in fa3trt/errors.py")
for cls_name in fa3trt.errors.__all__:
    assert issubclass(getattr(fa3trt.errors, cls_name), fa3trt.errors.Fa3TrtError), cls_name
    assert getattr(fa3trt, cls_name) is getattr(fa3trt.errors, cls_name), f"fa3trt.__all__ lacks {cls_name}"
    assert cls_name in fa3trt.__all__, cls_name
print("ok", sorted(fa3trt.__all__)[:3])
"""


def test_import_without_optional_dependencies() -> None:
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
