"""Call the generation app (``serve run examples/generate_flux.yaml``, or ``generate_sd3.yaml``) over HTTP or by handle.

    python examples/generate_client.py                      # HTTP, server-sent events per step
    python examples/generate_client.py --handle             # from another Ray job, streamed
    python examples/generate_client.py --output png --save image.png   # decoded by the app's VAE
    python examples/generate_client.py --prompt "a red house" --output png --save house.png

Reads the app's limits (``/v1/info``), makes random prompt embeddings of its widths (or sends
``--prompt`` to an app with text encoders), asks for one image of ``--size`` pixels, prints each step as it
lands, and with --save writes the final latents to an .npy file (FLUX: packed (tokens, channels),
to decode with the model's VAE after unpacking, as diffusers' FluxPipeline does with
``output_type="latent"``; SD3: (channels, height / 8, width / 8)). An app whose model guides by a
negative prompt (SD3) gets an empty one.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

from deploy.generation_routes import decode_sse_latents


def request_fields(
    limits: dict[str, Any], size: int, steps: int, seed: int, deadline_ms: float | None
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    fields: dict[str, Any] = {
        "prompt_embeds": rng.standard_normal((min(16, limits["max_text_tokens"]), limits["text_dim"])).astype(
            np.float32
        ),
        "pooled_prompt_embeds": rng.standard_normal(limits["pooled_dim"]).astype(np.float32),
        "height": size,
        "width": size,
        "steps": steps,
        "seed": seed,
    }
    if limits.get("guidance_negative"):  # guided by a negative prompt (SD3): an empty one
        t = fields["prompt_embeds"].shape[0]
        fields["negative_prompt_embeds"] = np.zeros((t, limits["text_dim"]), np.float32)
        fields["negative_pooled_prompt_embeds"] = np.zeros(limits["pooled_dim"], np.float32)
    if deadline_ms is not None:
        fields["deadline_ms"] = deadline_ms
    return fields


def over_http(url: str, fields: dict[str, Any]) -> np.ndarray | bytes:
    body = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in fields.items()} | {"stream": True}
    with requests.post(f"{url}/v1/generate", json=body, stream=True, timeout=600) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {r.text}")
        event = None
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "done":
                    print(f"done in {data['seconds']:.3f} s")
                    return base64.b64decode(data["png"]) if "png" in data else decode_sse_latents(data)
                print(f"step {data['step']}/{data['steps']}")
    raise SystemExit("the stream ended without a done event")


def over_handle(address: str, app: str, fields: dict[str, Any]) -> np.ndarray | bytes:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="WARNING")
    handle = serve.get_app_handle(app)
    for event in handle.options(stream=True).generate_stream.remote(fields):
        if "seconds" in event:
            print(f"done in {event['seconds']:.3f} s")
            return bytes(event["png"]) if "png" in event else np.asarray(event["latents"])
        print(f"step {event['step']}/{event['steps']}")
    raise SystemExit("the stream ended without the answer")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's HTTP address")
    p.add_argument("--handle", action="store_true", help="call through the deployment handle (another Ray job)")
    p.add_argument("--address", default="auto", help="Ray cluster address for --handle")
    p.add_argument("--app", default="fa3trt-generate", help="Serve application name for --handle")
    p.add_argument("--size", type=int, default=128, help="image height and width in pixels")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline-ms", type=float, default=None, help="the time the generation may take")
    p.add_argument("--prompt", default=None, help="send this text (an app with text encoders) instead of embeddings")
    p.add_argument("--output", choices=("latents", "png"), default="latents", help="png: the app's VAE decodes it")
    p.add_argument("--save", default=None, help="write the final latents to this .npy (or the .png)")
    args = p.parse_args()

    limits = requests.get(f"{args.url}/v1/info", timeout=30).json()["limits"]
    fields = request_fields(limits, args.size, args.steps, args.seed, args.deadline_ms) | {"output": args.output}
    if args.prompt is not None:  # the app's text encoders make the embeddings
        fields = {k: v for k, v in fields.items() if not k.endswith("prompt_embeds")} | {"prompt": args.prompt}
    t0 = time.perf_counter()
    answer = over_handle(args.address, args.app, fields) if args.handle else over_http(args.url, fields)
    ms = (time.perf_counter() - t0) * 1e3
    if isinstance(answer, bytes):
        print(f"png of {len(answer)} bytes in {ms:.1f} ms")
        if args.save:
            Path(args.save).write_bytes(answer)
    else:
        print(f"latents {answer.shape} {answer.dtype} in {ms:.1f} ms")
        if args.save:
            np.save(args.save, answer)


if __name__ == "__main__":
    main()
