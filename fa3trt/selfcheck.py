"""``python -m fa3trt.selfcheck``: verify the whole TensorRT path on this machine in one command.

One path for every model (the tiny reference model by default; ``--config serve_config.yaml
[--app NAME]`` checks an app's model): export it with its attention routed and check the file in
ONNX Runtime against the eager unrouted model (on any machine: a CPU is enough); then, with
TensorRT and a CUDA GPU, build its engine (one profile per bucket), run a ragged batch of every
bucket through TensorRT and through the torch backend, print the max abs error and latency per
bucket, and exit 1 if any bucket disagrees beyond the dtype's tolerance (0 when all agree).

Without TensorRT or a GPU it prints what is missing and how to install it, and exits 2, so CI
and users can tell "not checkable here" (2) from "broken" (1).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from typing import Any

import torch

from fa3trt import trt
from fa3trt.timing import time_cuda_ms

__all__ = ["main", "check", "missing_requirements", "TOLERANCE", "EXIT_MISSING"]

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

    if not trt.available():
        missing.append(f"TensorRT 10: {trt.INSTALL_HINT}")
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        missing.append("polygraphy: pip install polygraphy")
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fa3trt.selfcheck", description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float16", choices=sorted(TOLERANCE), help="the tiny model's dtype")
    p.add_argument("--buckets", default="64,256", help="comma-separated bucket edges (the tiny model)")
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--store", default=None, help="artifact store URI (default: a temporary folder)")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per bucket")
    p.add_argument("--config", default=None, help="a serve config whose app's model to check (default: the tiny model)")
    p.add_argument("--app", default=None, help="--config: the application's name (default: its first fa3trt app)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    from fa3trt.buckets import Buckets
    from fa3trt.config import load_serve_config
    from fa3trt.models.spec import AnyModelSpec, ReferenceSpec

    spec: AnyModelSpec = ReferenceSpec(preset="tiny", dtype=args.dtype)
    buckets = Buckets(tuple(int(e) for e in args.buckets.split(",")))
    max_batch_tokens = args.max_batch_tokens
    if args.config is not None:
        apps = dict(load_serve_config(args.config))
        name = args.app or next(iter(apps))
        if name not in apps:
            print(f"fa3trt selfcheck: {args.config} has no fa3trt application {name!r}; it has {sorted(apps)}")
            return 1
        spec, buckets, max_batch_tokens = (
            apps[name].model,
            apps[name].bucket_set(),
            apps[name].batching.max_batch_tokens,
        )
    return check(spec, buckets, max_batch_tokens, args.store, args.iters)


def check(spec: Any, buckets: Any, max_batch_tokens: int, store_uri: str | None, iters: int = 20) -> int:
    """The whole path for ``spec``: the ONNX check anywhere; the engine where TensorRT runs."""
    from fa3trt.models.export import export_source, verify_source
    from fa3trt.models.sources import model_id

    print(f"model {spec.describe()} ({model_id(spec)}), buckets {list(buckets.edges)}")
    with tempfile.TemporaryDirectory(prefix="fa3trt-selfcheck-") as tmp:
        path = f"{tmp}/model.onnx"
        res = export_source(spec, path, buckets)
        print(f"exported: {res.plugin_nodes} CustomAttnPlugin nodes, inputs {res.inputs}")
        err = verify_source(spec, path, buckets)
        print(f"ONNX Runtime vs the eager unrouted model: max abs error {err:.2e}")
        missing = missing_requirements()
        if missing:
            print("the export is sound; the TensorRT path cannot be checked here. Missing:")
            for m in missing:
                print(f"  - {m}")
            print("The torch backend works without these: `bash tests/run.sh` checks it.")
            return EXIT_MISSING
        return _compare(spec, buckets, max_batch_tokens, store_uri or tmp, iters)


def _compare(spec: Any, buckets: Any, max_batch_tokens: int, store_uri: str, iters: int) -> int:
    """Each bucket's ragged batch through TensorRT and through the torch backend."""
    from fa3trt.serving.batch import assemble
    from fa3trt.serving.tensorrt_backend import TensorRTBackend
    from fa3trt.serving.torch_backend import TorchBackend
    from fa3trt.serving.warmup import request_at
    from fa3trt.trt.compat import current_environment

    env = current_environment()
    print(
        f"GPU {env['gpu_name']} (sm{env['compute_capability']}), TensorRT {env['trt_version']}, torch {torch.__version__}"
    )
    t0 = time.perf_counter()
    trt_be = TensorRTBackend.load(
        spec, buckets=buckets, store=store_uri, max_batch_tokens=max_batch_tokens, build_if_missing=True
    )
    print(f"engine {trt_be.key} ready in {time.perf_counter() - t0:.1f}s (store {store_uri})")
    torch_be = TorchBackend(spec, "cuda")
    sig, tol = trt_be.signature, TOLERANCE[spec.model_dtype]
    rows, failed = [], False
    for i, edge in enumerate(buckets.edges):
        sizes = sig.sample_sizes(buckets, edge)
        n = sizes[sig.bucketed]
        b = min(3, buckets.batch_limit(i, max_batch_tokens))
        lengths = [n, max(sig.step(sig.bucketed), n // 2 // sig.step(sig.bucketed) * sig.step(sig.bucketed)), n][:b]
        if sig.batching != "pad":
            lengths = [n] * b
        reqs = [request_at(sig, sizes | {sig.bucketed: m}, i, seed) for seed, m in enumerate(lengths)]
        batch = assemble(sig, reqs, torch.device("cuda"), lengths_on_device=True).inputs
        got, want = trt_be.run(batch).float(), torch_be.run(batch).float()
        torch.cuda.synchronize()
        err = float((got - want).abs().max())
        ok = err <= tol  # False for NaN too
        failed |= not ok
        t_trt = time_cuda_ms(lambda: trt_be.run(batch), warmup=1, iters=iters, repeats=1)
        t_torch = time_cuda_ms(lambda: torch_be.run(batch), warmup=1, iters=iters, repeats=1)
        rows.append((edge, b, lengths, err, tol, t_trt, t_torch, "ok" if ok else "MISMATCH"))
    print(
        f"\n{'bucket':>7} {'batch':>5} {'lengths':<18} {'max abs err':>11} {'tol':>7} {'trt ms':>8} {'torch ms':>8}  result"
    )
    for edge, b, ls, err, tol, tt, tp, res in rows:
        print(f"{edge:>7} {b:>5} {str(ls):<18} {err:>11.3e} {tol:>7.0e} {tt:>8.3f} {tp:>8.3f}  {res}")
    print("\nselfcheck " + ("FAILED: TensorRT disagrees with the torch backend" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
