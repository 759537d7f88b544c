"""The generation app's HTTP routes, mixed into its replica (``deploy.generation``).

Contract: ``POST /v1/generate`` takes JSON (``{"prompt_embeds": [[...]], "pooled_prompt_embeds":
[...], "height": 1024, "width": 1024, "steps": 28, "seed": 7, "deadline_ms": 30000}``) or an
``.npz`` body (the arrays, and the other fields as 0-d arrays). It answers the final latents: as
JSON (``{"latents": [[...]], "steps": n, "seconds": s}``) or as ``.npz`` for an ``.npz`` request;
with ``"output": "png"`` (an app with a VAE) the body is the ``image/png`` itself (its steps and
seconds in the ``x-fa3trt-steps`` and ``x-fa3trt-seconds`` headers). With ``"stream": true`` (or
``Accept: text/event-stream``) it answers server-sent events: one ``step`` event per denoising
step (``{"step": i, "steps": n}``), then a ``done`` event holding the latents as a base64
``.npy`` (``latents_npy``) or the base64 PNG (``png``). A bad field is a 422 naming it; a
deadline that cannot be met a 429 with the estimate (``estimate_ms``); a client that goes away
cancels its generation, which frees its slot at the next step boundary. ``POST
/v1/images/generations`` is OpenAI's Images API where the app has text encoders and a VAE
(``deploy.openai_images``). ``GET /v1/info`` and ``GET /v1/stats`` describe the replica.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from deploy.codec import decode_npz, encode_npy, encode_npz, load_json
from deploy.openai_images import images_fields, openai_error
from fa3trt.errors import DeadlineError, InvalidInputError, RequestError

if TYPE_CHECKING:
    from fa3trt.generation.config import GenerationArgs
    from fa3trt.generation.requests import Limits

__all__ = ["gen_api", "GenerationRoutes", "NPZ", "EVENTS"]

log = logging.getLogger("ray.serve")

gen_api = FastAPI(title="fa3trt generation", description="The denoising loop on the server")

NPZ = "application/x-npz"
EVENTS = "text/event-stream"


def _scalars(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """An ``.npz`` body's fields: 0-d arrays as Python values, the rest as they are."""
    return {k: (v.item() if v.ndim == 0 else v) for k, v in arrays.items()}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _error(e: Exception) -> JSONResponse:
    if isinstance(e, DeadlineError):
        return JSONResponse({"error": str(e), "estimate_ms": round(e.estimate_s * 1e3, 1)}, status_code=429)
    if isinstance(e, RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)
    return JSONResponse({"error": str(e)}, status_code=422)


class GenerationRoutes:
    """``/v1/generate``, ``/v1/images/generations``, ``/v1/info``, ``/v1/stats`` on the class that
    runs the loop."""

    if TYPE_CHECKING:
        args: GenerationArgs
        limits: Limits

        async def generate(self, request: Any) -> dict[str, Any]: ...

        def generate_stream(self, request: Any) -> AsyncIterator[dict[str, Any]]: ...

        async def replica_info(self) -> dict[str, Any]: ...

        async def replica_stats(self) -> dict[str, Any]: ...

    async def _body(self, request: Request) -> tuple[dict[str, Any], bool]:
        """The request's fields, and whether it came as ``.npz``."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in (NPZ, "application/json"):
            raise RequestError(
                f"Content-Type {ctype or '(none)'!r} is not supported; use application/json or {NPZ}", 415
            )
        body = await request.body()
        if len(body) > self.args.max_body_bytes:
            raise RequestError(f"body of {len(body)} bytes exceeds the limit of {self.args.max_body_bytes} bytes", 413)
        if ctype == NPZ:
            return _scalars(decode_npz(body, self.args.max_body_bytes)), True
        doc = load_json(body)
        if not isinstance(doc, dict):
            raise InvalidInputError(
                'a generation request is a JSON object of fields, e.g. {"prompt_embeds": [[...]], ...}'
            )
        return doc, False

    @gen_api.post("/v1/generate")
    async def generate_http(self, request: Request) -> Response:
        """One generation over HTTP (see the module docstring)."""
        try:
            fields, npz = await self._body(request)
            stream = bool(fields.get("stream")) or EVENTS in request.headers.get("accept", "")
            fields.pop("stream", None)
            if stream:
                events = self.generate_stream(fields)
                first = await anext(events)  # a bad request or a refused deadline fails here, as an error status
                return StreamingResponse(self._sse(first, events), media_type=EVENTS)
            out = await asyncio.wait_for(self.generate(fields), self.args.request_timeout_s)
        except (InvalidInputError, DeadlineError) as e:
            return _error(e)
        except TimeoutError:
            return JSONResponse(
                {"error": f"generation timed out after {self.args.request_timeout_s}s"}, status_code=504
            )
        if "png" in out:
            meta = {"x-fa3trt-steps": str(out["steps"]), "x-fa3trt-seconds": str(out["seconds"])}
            return Response(out["png"], media_type="image/png", headers=meta)
        if npz:
            return Response(encode_npz({"latents": out["latents"]}), media_type=NPZ)
        return JSONResponse({"latents": out["latents"].tolist(), "steps": out["steps"], "seconds": out["seconds"]})

    @gen_api.post("/v1/images/generations")
    async def images_generations(self, request: Request) -> Response:
        """OpenAI's Images API (``deploy.openai_images``): ``n`` PNGs of one prompt, generated
        side by side (they share the loop's passes), as ``{"created": t, "data": [{"b64_json":
        ...}]}``. Needs the app's text encoders and VAE."""
        if not (self.limits.prompts and "png" in self.limits.outputs):
            missing = " and ".join(
                n for n, ok in (("text_encoders", self.limits.prompts), ("vae", "png" in self.limits.outputs)) if not ok
            )
            return openai_error(f"/v1/images/generations needs {missing} in this app's config", 501)
        body = await request.body()
        if len(body) > self.args.max_body_bytes:
            return openai_error(f"body of {len(body)} bytes exceeds the limit of {self.args.max_body_bytes} bytes", 413)
        try:
            many = images_fields(load_json(body), self.limits)
            tasks = [asyncio.ensure_future(self.generate(f)) for f in many]
            try:
                outs = await asyncio.wait_for(asyncio.gather(*tasks), self.args.request_timeout_s)
            except BaseException:  # one refused or the client gone: the others stop too
                for t in tasks:
                    t.cancel()
                raise
        except DeadlineError as e:
            return openai_error(str(e), 429)
        except InvalidInputError as e:
            return openai_error(str(e), 400)
        except TimeoutError:
            return openai_error(f"generation timed out after {self.args.request_timeout_s}s", 504)
        data = [{"b64_json": base64.b64encode(o["png"]).decode()} for o in outs]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def _sse(self, first: dict[str, Any], events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        """Server-sent events of one generation: its steps, then its latents."""

        async def chain() -> AsyncIterator[dict[str, Any]]:
            yield first
            async for e in events:
                yield e

        async for e in chain():
            if "seconds" not in e:
                yield _event("step", e)
            elif "png" in e:
                yield _event(
                    "done", {"steps": e["steps"], "seconds": e["seconds"], "png": base64.b64encode(e["png"]).decode()}
                )
            else:
                npy = base64.b64encode(encode_npy(np.ascontiguousarray(e["latents"]))).decode()
                yield _event("done", {"steps": e["steps"], "seconds": e["seconds"], "latents_npy": npy})

    @gen_api.get("/v1/info")
    async def info(self) -> dict[str, Any]:
        return await self.replica_info()

    @gen_api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        return await self.replica_stats()


def decode_sse_latents(data: dict[str, Any]) -> np.ndarray:
    """The latents of a ``done`` event (for clients)."""
    return np.load(io.BytesIO(base64.b64decode(data["latents_npy"])), allow_pickle=False)
