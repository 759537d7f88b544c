"""The OpenAI Images API's ``POST /v1/images/generations`` on the generation app: a request's
body mapped to the app's own generation fields, and errors in OpenAI's shape.

Contract: ``images_fields(body, limits)`` takes the JSON body (``{"prompt": "...", "n": 2,
"size": "1024x1024", "response_format": "b64_json"}``; ``model`` and ``user`` are accepted and
ignored; this app's own ``negative_prompt``, ``steps``, ``guidance_scale``, ``true_cfg_scale``,
``seed`` and ``deadline_ms`` may ride along) and returns one field dict per image, each asking for
a PNG, the i-th seeded ``seed + i``. Anything it cannot honour is an ``InvalidInputError`` naming
the parameter: a ``url`` response (images come inline), a size off the app's step or past its
largest bucket, an unknown parameter. ``openai_error`` is the answer of one (OpenAI's error
object: ``message``, ``type``, ``param``, ``code``).
"""

from __future__ import annotations

import math
import re
import secrets
from typing import Any

from fastapi.responses import JSONResponse

from fa3trt.errors import InvalidInputError
from fa3trt.generation.requests import Limits

__all__ = ["images_fields", "openai_error", "MAX_IMAGES"]

MAX_IMAGES = 10
"""The most images one request may ask for (OpenAI's own limit)."""
IGNORED = ("model", "user")
OWN = ("negative_prompt", "steps", "guidance_scale", "true_cfg_scale", "seed", "deadline_ms")


def openai_error(message: str, status: int, param: str | None = None) -> JSONResponse:
    kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def images_fields(body: Any, limits: Limits) -> list[dict[str, Any]]:
    """One generation's fields per image asked for (see the module docstring)."""
    if not isinstance(body, dict):
        raise InvalidInputError('an images request is a JSON object, e.g. {"prompt": "a red house", "size": "512x512"}')
    unknown = sorted(set(body) - {"prompt", "n", "size", "response_format", "output_format", *IGNORED, *OWN})
    if unknown:
        raise InvalidInputError(f"parameters {unknown} are not supported; send prompt, n, size, response_format")
    if "prompt" not in body:
        raise InvalidInputError("prompt is missing; send the text of the image")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise InvalidInputError(f"n = {n!r} must be an integer from 1 to {MAX_IMAGES}")
    if body.get("response_format", "b64_json") != "b64_json":
        raise InvalidInputError(
            "response_format 'url' is not offered: this server returns images inline; send b64_json"
        )
    if body.get("output_format", "png") != "png":
        raise InvalidInputError(f"output_format {body['output_format']!r} is not offered; send png")
    side = math.isqrt(limits.max_tokens) * limits.pixel_step
    size = body.get("size", f"{side}x{side}")
    match = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
    if match is None:
        raise InvalidInputError(f"size {size!r} must be WIDTHxHEIGHT in pixels, e.g. '{side}x{side}'")
    width, height = int(match[1]), int(match[2])
    seed = body.get("seed", secrets.randbelow(2**31))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be an integer, got {seed!r}")
    own = {k: body[k] for k in OWN if k in body and k != "seed"}
    return [
        {"prompt": body["prompt"], "width": width, "height": height, "output": "png", "seed": seed + i, **own}
        for i in range(n)
    ]
