"""Build FA3 (flash-attention's ``hopper/``) with only the kernels this project calls.

FA3 has no wheel, and its full build compiles several hundred CUDA files (hours). The op calls
only the non-causal forward pass, so the build here keeps the forward kernels for the chosen
head dims and dtypes (bf16 always; fp16 and FP8 e4m3 unless left out) with the varlen path and
clusters, and leaves out the backward pass, split-KV, paged KV, append-KV, local attention,
softcap, PackGQA, the sm8x kernels and the mixed head dims: six kernel files at the defaults,
compiled in parallel in minutes where the full build takes hours (docs/benchmarks.md, section 1). It runs FA3's own setup.py with its
``FLASH_ATTENTION_DISABLE_*`` switches, which setup.py also records in the
``flash_attn_config`` module it writes, so ``fa3trt.attention.kernels.fa3`` knows what the build holds and
sends everything else to the next kernel.

    python -m fa3trt.fa3_build ~/flash-attention             # pip-install the build (flash_attn_3)
    python -m fa3trt.fa3_build ~/flash-attention --inplace   # build in the tree, then use it with
    PYTHONPATH=~/flash-attention/hopper python -m bench.attention

Needs nvcc 12.3+ (CUDA 13 works), the flash-attention checkout with its ``csrc/cutlass``
submodule, and torch built for CUDA on the machine that builds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["build_env", "main", "HEAD_DIMS"]

HEAD_DIMS = (64, 96, 128, 192, 256)
# Features of FA3 the op never uses: each one left out saves its own set of kernel files.
_UNUSED = (
    "BACKWARD",
    "SPLIT",
    "PAGEDKV",
    "APPENDKV",
    "LOCAL",
    "SOFTCAP",
    "PACKGQA",
    "SM80",
    "HDIMDIFF64",
    "HDIMDIFF192",
)


def build_env(head_dims: tuple[int, ...] = (64, 128), fp16: bool = True, fp8: bool = True) -> dict[str, str]:
    """The ``FLASH_ATTENTION_*`` environment for FA3's setup.py: the forward kernels of
    ``head_dims`` only (a head dim between two built ones runs on the wider kernel)."""
    bad = sorted(set(head_dims) - set(HEAD_DIMS))
    if bad or not head_dims:
        raise ValueError(f"head dims {bad or '(none)'} are not FA3 kernel widths; choose from {HEAD_DIMS}")
    env = {f"FLASH_ATTENTION_DISABLE_{name}": "TRUE" for name in _UNUSED}
    env.update({f"FLASH_ATTENTION_DISABLE_HDIM{d}": "TRUE" for d in HEAD_DIMS if d not in head_dims})
    if not fp16:
        env["FLASH_ATTENTION_DISABLE_FP16"] = "TRUE"
    if not fp8:
        env["FLASH_ATTENTION_DISABLE_FP8"] = "TRUE"
    env["FLASH_ATTENTION_FORCE_BUILD"] = "TRUE"  # never look for a prebuilt wheel online
    return env


def _parse_dims(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--head-dims takes comma-separated integers such as 64,128, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fa3trt.fa3_build", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a flash-attention checkout (holding hopper/ and csrc/cutlass)")
    ap.add_argument("--head-dims", type=_parse_dims, default=(64, 128), help="kernel widths to build (default 64,128)")
    ap.add_argument("--no-fp16", action="store_true", help="leave out the fp16 kernels (bf16 stays)")
    ap.add_argument(
        "--no-fp8", action="store_true", help="leave out the FP8 e4m3 kernels (mode=1 then quantizes and runs bf16)"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 4, help="files compiled at once (default: all cores)")
    ap.add_argument("--inplace", action="store_true", help="build inside hopper/ instead of pip-installing it")
    args = ap.parse_args(argv)

    hopper = args.source.expanduser().resolve() / "hopper"
    if not (hopper / "setup.py").is_file():
        ap.error(f"{hopper / 'setup.py'} not found; pass the root of a flash-attention checkout")
    if not (args.source.expanduser().resolve() / "csrc" / "cutlass" / "include" / "cute").is_dir():
        ap.error(f"{args.source}/csrc/cutlass is empty; run `git submodule update --init csrc/cutlass` in the checkout")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        ap.error("nvcc not found; put the CUDA toolkit's bin/ on PATH or set CUDA_HOME")
    try:
        env = build_env(args.head_dims, fp16=not args.no_fp16, fp8=not args.no_fp8)
    except ValueError as e:
        ap.error(str(e))
    env |= {"MAX_JOBS": str(args.jobs), "NVCC_THREADS": "1"}
    print("FA3 build:", " ".join(f"{k}={v}" for k, v in sorted(env.items())), flush=True)
    if args.inplace:
        cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    else:
        cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "."]
    return subprocess.call(cmd, cwd=hopper, env=os.environ | env)


if __name__ == "__main__":
    sys.exit(main())
