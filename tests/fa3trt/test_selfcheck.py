"""``python -m fa3trt.selfcheck``: one path for every model; exit 2 naming what is missing where
TensorRT or a GPU is, and on a machine with both a passing comparison of every bucket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import gpu, requires_tensorrt

ROOT = Path(__file__).resolve().parents[2]


def test_selfcheck_exits_2_and_names_what_is_missing() -> None:
    from fa3trt.trt import available as tensorrt_available

    if torch.cuda.is_available() and tensorrt_available():
        pytest.skip("this machine has everything: the TensorRT tests run the self-check's path")
    r = subprocess.run(
        [sys.executable, "-m", "fa3trt.selfcheck"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2, r.stdout + r.stderr
    # The reference model goes through the same export and ONNX Runtime check first.
    assert "exported: 2 CustomAttnPlugin nodes" in r.stdout
    assert "Missing:" in r.stdout and ("TensorRT" in r.stdout or "CUDA GPU" in r.stdout)


def test_selfcheck_of_a_users_model_checks_the_export_anywhere() -> None:
    """--config with a user's model: its routed export verified in ONNX Runtime on this machine,
    then exit 2 (or the TensorRT comparison where TensorRT runs)."""
    r = subprocess.run(
        [sys.executable, "-m", "fa3trt.selfcheck", "--config", "examples/serve_bert.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "exported: 2 CustomAttnPlugin nodes" in r.stdout, r.stdout + r.stderr[-2000:]
    err = float(r.stdout.split("eager unrouted model: max abs error ")[1].split()[0])
    assert err < 1e-4
    from fa3trt.trt import available as tensorrt_available

    want = 0 if torch.cuda.is_available() and tensorrt_available() else 2
    assert r.returncode == want, r.stdout + r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "fa3trt.selfcheck", "--config", "examples/serve_bert.yaml", "--app", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "no fa3trt application 'nope'" in r.stdout


@gpu
@requires_tensorrt
def test_selfcheck_passes() -> None:
    from fa3trt.selfcheck import main

    assert main(["--iters", "3"]) == 0
