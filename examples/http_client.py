"""Call the fa3trt application over HTTP with named inputs (an .npz body, numpy.savez).

    serve run examples/serve_flux.yaml       # or serve_config.yaml, examples/serve_bert.yaml
    python examples/http_client.py           # in another shell

Reads the model's inputs from ``GET /v1/info``, sends one request per length as .npz, and prints
each answer. JSON works too: ``{"inputs": {name: nested list}}`` -> ``{"outputs": {name: ...}}``.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import requests

from fa3trt.signature import Signature


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's URL (with its route prefix)")
    p.add_argument("--lengths", default="7,100", help="comma-separated lengths along the bucketed axis")
    args = p.parse_args()

    sig = Signature.from_dict(requests.get(f"{args.url}/v1/info", timeout=30).json()["signature"])
    print("inputs:", {t.name: (t.dtype, list(t.axes)) for t in sig.sent}, "bucketed axis:", sig.bucketed)
    for i, n in enumerate(int(n) for n in args.lengths.split(",")):
        inputs = sig.sample_request(n, seed=i)
        buf = io.BytesIO()
        np.savez(buf, **inputs)
        r = requests.post(
            f"{args.url}/v1/infer", data=buf.getvalue(), headers={"content-type": "application/x-npz"}, timeout=120
        )
        r.raise_for_status()
        answer = np.load(io.BytesIO(r.content), allow_pickle=False)
        print({k: v.shape for k, v in inputs.items()}, "->", {k: answer[k].shape for k in answer.files})


if __name__ == "__main__":
    main()
