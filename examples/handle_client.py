"""Call the fa3trt application from another Ray job, through its deployment handle.

    ray start --head
    serve run --address auto serve_config.yaml     # or any config: examples/serve_flux.yaml, ...
    python examples/handle_client.py               # in another shell (another Ray job)

Reads the served model's inputs from the app (``info``), sends one request per length (a dict
of input name -> array, without the batch axis: the server batches), prints each answer's
shape and dtype, and with --save writes inputs and outputs to an .npz file (no pickle).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray
from ray import serve

from fa3trt.signature import Signature


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--app", default="fa3trt", help="Serve application name")
    p.add_argument("--lengths", default="7,100,300", help="comma-separated lengths along the bucketed axis")
    p.add_argument("--save", default=None, help="write inputs/outputs to this .npz")
    args = p.parse_args()

    ray.init(address=args.address, logging_level="WARNING")
    handle = serve.get_app_handle(args.app)
    sig = Signature.from_dict(handle.info.remote().result()["signature"])
    print("inputs:", {t.name: (t.dtype, list(t.axes)) for t in sig.sent}, "bucketed axis:", sig.bucketed)
    reqs = [sig.sample_request(int(n), i) for i, n in enumerate(args.lengths.split(","))]

    t0 = time.perf_counter()
    # Fire all requests first, then wait: they are batched together on the replica.
    responses = [handle.infer.remote(r) for r in reqs]
    answers = [r.result() for r in responses]
    dt = time.perf_counter() - t0
    for r, a in zip(reqs, answers):
        shapes = {k: v.shape for k, v in r.items()}
        print(f"{shapes} -> " + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in a.items()))
    print(f"{len(reqs)} requests in {dt * 1e3:.1f} ms")

    if args.save:
        arrays = {f"in{i}_{k}": v for i, r in enumerate(reqs) for k, v in r.items()}
        arrays |= {f"out{i}_{k}": v for i, a in enumerate(answers) for k, v in a.items()}
        np.savez(args.save, **arrays)


if __name__ == "__main__":
    main()
