"""Build timing: N specs built at once on N GPUs (one Ray task per GPU) vs one after the other.

Each spec is built with ``build_jobs.build_all`` into a fresh store: first every spec in its own
call (sequential: the baseline), then all specs in one call (parallel), in one Ray session on one
machine. The backend is whatever builds here: TensorRT engines where TensorRT imports, else the
torch artifact (ONNX export + ONNX Runtime verification + weights), the same Ray path.

    python -m bench.build_timing --specs 2 --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import bar_plot, card, save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--specs", type=int, default=2)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args()

    import ray

    from build_jobs import build_all
    from fa3trt import tensorrt_available
    from fa3trt.config import AppArgs

    backend = "tensorrt" if tensorrt_available() else "torch"
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    tmp = Path(tempfile.mkdtemp(prefix="fa3trt-build-timing-"))

    def specs(store: Path) -> list[tuple[str, AppArgs]]:
        return [
            (
                f"spec{i}",
                AppArgs.model_validate(
                    {
                        "model": {"preset": args.preset, "layers": args.layers, "dtype": "bfloat16", "seed": i},
                        "buckets": [256, 1024],
                        "backend": backend,
                        "store": str(store),
                    }
                ),
            )
            for i in range(args.specs)
        ]

    def timed(label: str, groups: list[list[tuple[str, AppArgs]]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        results = [r for g in groups for r in build_all(g, progress=False)]
        wall = time.perf_counter() - t0
        bad = [r.error for r in results if r.status != "ok"]
        if bad:
            raise SystemExit(f"{label}: builds failed: {bad}")
        row = {
            "label": label,
            "wall_s": wall,
            "items": len(results),
            "item_s": [r.seconds for r in results],
            "gpu_ids": [r.gpu_ids for r in results],
        }
        print(
            f"{label:28s} {wall:7.1f} s wall  items {[round(s or 0, 1) for s in row['item_s']]} s  gpu ids {row['gpu_ids']}"
        )
        return row

    print(f"card: {card()} x{gpus}  backend {backend}  {args.specs} specs ({args.preset}, {args.layers} layers, bf16)")
    seq = timed("one after the other", [[s] for s in specs(tmp / "seq")])
    par = timed(f"at once on {gpus} GPUs", [specs(tmp / "par")])
    ray.shutdown()
    speedup = seq["wall_s"] / par["wall_s"]
    print(f"parallel speed-up: {speedup:.2f}x" + (f" (ideal {min(gpus, args.specs)}x)" if gpus else ""))
    save(
        args.out,
        "build_timing",
        {"backend": backend, "gpus": gpus, "specs": args.specs, "rows": [seq, par], "speedup": speedup},
    )
    bar_plot(
        args.out,
        "build_timing",
        [seq["label"], par["label"]],
        [seq["wall_s"], par["wall_s"]],
        "wall seconds",
        f"build {args.specs} specs ({backend}) - {card()} x{gpus}",
    )


if __name__ == "__main__":
    main()
