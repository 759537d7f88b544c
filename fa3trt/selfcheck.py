"""``python -m fa3trt.selfcheck``: verify the whole TensorRT path on this machine in one command.

With TensorRT and a CUDA GPU: exports the tiny model, builds an engine (one profile per
bucket), runs a ragged batch of every bucket through TensorRT and through the torch backend,
prints max abs error and latency per bucket, and exits 1 if any bucket disagrees beyond the
dtype's tolerance (0 when all agree).

Without TensorRT or a GPU it prints what is missing and how to install it, and exits 2, so CI
and users can tell "not checkable here" (2) from "broken" (1).

``--config serve_config.yaml [--app NAME]`` checks the app's model instead. For a user's model
(``model: source: ...``) it first exports it with its attention routed and checks the file in
ONNX Runtime against the eager unrouted model (on any machine: a CPU is enough), then, with
TensorRT and a GPU, builds its engine by name and runs each bucket's batch through TensorRT and
through the torch backend under routing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from typing import Any

import torch

from fa3trt.timing import time_cuda_ms
from fa3trt.trt import _trt

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
    p.add_argument("--config", default=None, help="a serve config whose app's model to check (default: the tiny model)")
    p.add_argument("--app", default=None, help="--config: the application's name (default: its first fa3trt app)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )

    if args.config is not None:
        from fa3trt.config import SourceSpec, load_serve_config

        apps = dict(load_serve_config(args.config))
        name = args.app or next(iter(apps))
        if name not in apps:
            print(f"fa3trt selfcheck: {args.config} has no fa3trt application {name!r}; it has {sorted(apps)}")
            return 1
        app = apps[name]
        if isinstance(app.model, SourceSpec):
            return _check_source(app.model, app.bucket_set(), app.batching.max_batch_tokens, args.store)
        args.dtype = app.model.config().dtype
        args.buckets = ",".join(str(e) for e in app.buckets)

    missing = missing_requirements()
    if missing:
        print("fa3trt selfcheck: cannot check the TensorRT path on this machine. Missing:")
        for m in missing:
            print(f"  - {m}")
        print("The torch backend works without these: `python -m pytest tests` checks it.")
        return EXIT_MISSING

    from fa3trt.attention.kernels.selector import enqueue_kernel
    from fa3trt.buckets import Buckets
    from fa3trt.models.reference import ModelConfig
    from fa3trt.serving.backends import TorchBackend
    from fa3trt.store import ArtifactStore
    from fa3trt.trt.compat import current_environment
    from fa3trt.trt.runtime import TensorRTBackend

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


def _check_source(spec: Any, buckets: Any, max_batch_tokens: int, store_uri: str | None) -> int:
    """``--config`` with a user's model: the ONNX check anywhere; the engine where TensorRT runs."""
    from fa3trt.models.sources import export_source, model_id, verify_source

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
            return EXIT_MISSING
        from fa3trt.serving.served import ModuleBackend
        from fa3trt.store import ArtifactStore
        from fa3trt.trt.build import BuildConfig
        from fa3trt.trt.named_build import build_named_to_store
        from fa3trt.trt.named_runtime import NamedTensorRTBackend

        store = ArtifactStore(store_uri or tmp)
        sig = spec.signature()
        if spec.dtype != "float32":
            path = f"{tmp}/model-{spec.dtype}.onnx"
            export_source(spec, path, buckets)
        config = BuildConfig(buckets=buckets, max_batch_tokens=max_batch_tokens)
        build_named_to_store(store, path, sig, model_id(spec), config)
        trt_be = NamedTensorRTBackend.load(
            sig, model_id(spec), buckets=buckets, store=store, max_batch_tokens=max_batch_tokens
        )
        torch_be = ModuleBackend(spec, "cuda")
        tol = TOLERANCE[spec.dtype]
        failed = False
        for i, edge in enumerate(buckets.edges):
            b = min(2, buckets.batch_limit(i, max_batch_tokens))
            batch = sig.samples(sig.sample_sizes(buckets, edge), b)
            got, want = trt_be.run(batch).float(), torch_be.run(batch).float()
            err = float((got - want).abs().max())
            failed |= not err <= tol
            print(
                f"bucket {edge}: batch {b}, max abs err {err:.3e} (tol {tol:.0e}) {'ok' if err <= tol else 'MISMATCH'}"
            )
    print("\nselfcheck " + ("FAILED: TensorRT disagrees with the torch backend" if failed else "passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
