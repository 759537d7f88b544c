"""``python -m fa3trt.selfcheck``: verify the whole TensorRT path on this machine in one command.

With TensorRT and a CUDA GPU: exports the tiny model, builds an engine (one profile per
bucket), runs a ragged batch of every bucket through TensorRT and through the torch backend,
prints max abs error and latency per bucket, and exits 1 if any bucket disagrees beyond the
dtype's tolerance (0 when all agree).

Without TensorRT or a GPU it prints what is missing and how to install it, and exits 2, so CI
and users can tell "not checkable here" (2) from "broken" (1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time

import torch

from fa3trt import _trt
from fa3trt.timing import time_cuda_ms

__all__ = ["main", "missing_requirements", "TOLERANCE", "EXIT_MISSING"]

EXIT_MISSING = 2
TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 2e-3}
"""Max abs error per dtype: the model's output is LayerNorm'd (unit scale), so these are
a few ulps of the dtype accumulated over the layers and TensorRT's different fusions."""


def missing_requirements() -> list[str]:
    """What this machine lacks for the TensorRT path, each with how to get it (empty: nothing)."""
    missing = []
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible to CUDA"
        missing.append(
            f"a CUDA GPU ({why}): run on an NVIDIA GPU machine with a CUDA build of torch "
            "(pip install torch --index-url https://download.pytorch.org/whl/cu128)"
        )

    if not _trt.available():
        missing.append(f"TensorRT 10: {_trt.INSTALL_HINT}")
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        missing.append("polygraphy: pip install polygraphy")
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa3trt.selfcheck", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float16", choices=sorted(TOLERANCE), help="model dtype (default float16)")
    p.add_argument("--buckets", default="64,256", help="comma-separated bucket edges")
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--store", default=None, help="artifact store URI (default: a temporary folder)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per bucket")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    missing = missing_requirements()
    if missing:
        print("fa3trt selfcheck: cannot check the TensorRT path on this machine. Missing:")
        for m in missing:
            print(f"  - {m}")
        print("The torch backend works without these: `python -m pytest tests` checks it.")
        return EXIT_MISSING

    from fa3trt.backends import TorchBackend
    from fa3trt.buckets import Buckets
    from fa3trt.compat import current_environment
    from fa3trt.kernels.selector import enqueue_kernel
    from fa3trt.model import ModelConfig
    from fa3trt.runtime import TensorRTBackend
    from fa3trt.store import ArtifactStore

    env = current_environment()
    print(
        f"GPU {env['gpu_name']} (sm{env['compute_capability']}), TensorRT {env['trt_version']}, torch {torch.__version__}"
    )
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.preset("tiny", dtype=args.dtype)
    print(f"plugin kernel for {args.dtype}: {enqueue_kernel(torch.cuda.current_device(), dtype, cfg.head_dim)}")
    buckets = Buckets(tuple(int(e) for e in args.buckets.split(",")))
    with tempfile.TemporaryDirectory(prefix="fa3trt-selfcheck-") as tmp:
        store = ArtifactStore(args.store or tmp)
        t0 = time.perf_counter()
        trt_be = TensorRTBackend.load(
            cfg,
            weights=None,
            buckets=buckets,
            store=store,
            build_if_missing=True,
            max_batch_tokens=args.max_batch_tokens,
        )
        print(f"engine {trt_be.key} ready in {time.perf_counter() - t0:.1f}s (store {store.uri})")
        torch_be = TorchBackend(cfg, device="cuda")
        tol = TOLERANCE[args.dtype]
        rows = []
        failed = False
        g = torch.Generator().manual_seed(0)
        for i, edge in enumerate(buckets.edges):
            b = min(3, buckets.batch_limit(i, args.max_batch_tokens))
            lens = torch.tensor([edge, max(buckets.lower(i), edge // 2), buckets.lower(i)][:b], dtype=torch.int32)
            x = torch.randn(b, edge, cfg.hidden, generator=g).to("cuda", dtype)
            got = trt_be.run(x, lens)
            want = torch_be.run(x, lens)
            torch.cuda.synchronize()
            err = float((got.float() - want.float()).abs().max())
            ok = err <= tol  # False for NaN too
            failed |= not ok
            t_trt = time_cuda_ms(lambda: trt_be.run(x, lens), warmup=1, iters=args.iters, repeats=1)
            t_torch = time_cuda_ms(lambda: torch_be.run(x, lens), warmup=1, iters=args.iters, repeats=1)
            rows.append((edge, b, lens.tolist(), err, tol, t_trt, t_torch, "ok" if ok else "MISMATCH"))
    print(
        f"\n{'bucket':>7} {'batch':>5} {'lengths':<18} {'max abs err':>11} {'tol':>7} {'trt ms':>8} {'torch ms':>8}  result"
    )
    for edge, b, ls, err, tol, tt, tp, res in rows:
        print(f"{edge:>7} {b:>5} {str(ls):<18} {err:>11.3e} {tol:>7.0e} {tt:>8.3f} {tp:>8.3f}  {res}")
    print("\nselfcheck " + ("FAILED: TensorRT disagrees with the torch backend" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
