"""Call the fa3trt application from another Ray job, through its deployment handle.

    ray start --head
    serve run --address auto serve_config.yaml     # or: serve deploy serve_config.yaml
    python examples/handle_client.py               # in another shell (another Ray job)

Sends NumPy arrays and a CPU torch tensor of a few lengths, prints each reply's shape and dtype,
and with --save writes inputs and outputs to an .npz file (no pickle) for checking.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
import torch
from ray import serve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--app", default="fa3trt", help="Serve application name")
    p.add_argument("--hidden", type=int, default=256, help="model width (256 for the tiny preset)")
    p.add_argument("--lengths", default="7,100,300", help="comma-separated sequence lengths")
    p.add_argument("--save", default=None, help="write inputs/outputs to this .npz")
    args = p.parse_args()

    ray.init(address=args.address, logging_level="WARNING")
    handle = serve.get_app_handle(args.app)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(n), args.hidden)).astype(np.float32) for n in args.lengths.split(",")]

    t0 = time.perf_counter()
    # Fire all requests first, then wait: they are batched together on the replica.
    responses = [handle.infer.remote(x) for x in xs]
    ys = [r.result() for r in responses]
    dt = time.perf_counter() - t0
    for x, y in zip(xs, ys):
        print(f"x {x.shape} {x.dtype} -> y {y.shape} {y.dtype}")
    print(f"{len(xs)} requests in {dt * 1e3:.1f} ms")

    yt = handle.infer.remote(torch.from_numpy(xs[0]).to(torch.bfloat16)).result()
    print(f"torch bfloat16 {tuple(xs[0].shape)} -> {type(yt).__name__} {tuple(yt.shape)} {yt.dtype}")

    if args.save:
        arrays = {f"x{i}": x for i, x in enumerate(xs)} | {f"y{i}": y for i, y in enumerate(ys)}
        arrays["y_torch_bf16"] = yt.float().numpy()
        np.savez(args.save, **arrays)


if __name__ == "__main__":
    main()
