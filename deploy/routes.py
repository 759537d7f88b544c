"""The app's routes: ``/v1`` over HTTP, and the Open Inference Protocol (KServe v2) over HTTP and
gRPC, as mixins of the class Serve's ingress serves: the model replica
(``deploy.replica.ModelReplica``), or an ingress process in front of the model replicas
(``deploy.ingress.IngressReplica``, with ``ingress_replicas: N``).

Contract: the routes only decode, call and encode. They reach their class through the methods and
attributes listed under ``TYPE_CHECKING`` in ``_Replica`` (``infer``: named inputs of every
model, or the single array of a model with one sent input; ``io_signature``, readiness, the
backend's name, a model replica's info and counters). The protocol itself is ``deploy.kserve``
and ``deploy.kserve_grpc``, request bodies ``deploy.codec``. ``api`` is the one FastAPI app;
every route is a method.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from deploy import kserve, kserve_grpc
from deploy.codec import (
    decode_inputs_json,
    decode_json,
    decode_npy,
    decode_npz,
    encode_json,
    encode_npy,
    encode_npz,
    encode_outputs_json,
    load_json,
)
from fa3trt.errors import InvalidInputError, RequestError

if TYPE_CHECKING:
    from fa3trt.config import AppArgs
    from fa3trt.signature import Signature

__all__ = ["api", "V1Routes", "V2Routes", "NPY", "NPZ", "V2_VERSIONS"]

log = logging.getLogger("ray.serve")

api = FastAPI(title="fa3trt", description="FlashAttention-3 transformer inference")

NPY = "application/x-npy"
NPZ = "application/x-npz"
V2_VERSIONS = ("1",)
"""The model versions v2 clients may name: the app serves one model, version "1" (or none named)."""


def _version() -> str:
    try:
        return importlib.metadata.version("fa3trt")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class _Replica:
    """What the routes use of the class that serves them: ``deploy.replica.ModelReplica`` (a model
    replica as the app's ingress) or ``deploy.ingress.IngressReplica`` (an ingress process that
    hands each request on to the model replicas)."""

    if TYPE_CHECKING:
        args: AppArgs
        replica: str

        async def infer(self, x: Any, answer_dtype: str | None = None) -> Any: ...

        def io_signature(self) -> Signature: ...

        def is_ready(self) -> bool: ...

        async def backend_name(self) -> str: ...

        async def replica_info(self) -> dict[str, Any]: ...

        async def replica_stats(self) -> dict[str, Any]: ...

    async def _read_body(self, request: Request) -> bytes:
        """The request's body, refused (413) past ``max_body_bytes``: the chunks as they arrive,
        joined once. (Copying each chunk into a buffer of the declared length instead cost more:
        zeroing and faulting in the fresh buffer held the GIL longer than the join, and direct
        HTTP served less: docs/benchmarks.md, section 8.)"""
        limit = self.args.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(
                f"body of {declared} bytes exceeds the limit of {limit} bytes; send a shorter sequence", status=413
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(f"body exceeds the limit of {limit} bytes; send a shorter sequence", status=413)
            chunks.append(chunk)
        return b"".join(chunks)


class V1Routes(_Replica):
    """``POST /v1/infer``, ``GET /v1/info``, ``GET /v1/stats``."""

    @api.post("/v1/infer")
    async def infer_http(self, request: Request) -> Response:
        """HTTP: named inputs as .npz (``numpy.savez``; the answer as .npz) or JSON
        ``{"inputs": {name: array}}`` (answer ``{"outputs": {name: array}}``); for a model with
        one sent input also that array alone, as .npy (the answer as .npy in the request's
        dtype) or JSON ``{"x": [...]}`` (answer ``{output name: [...]}``).

        A full queue is answered 503 by Serve's proxy before the body reaches the replica."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if ctype not in (NPZ, NPY, "application/json"):
                raise RequestError(
                    f"Content-Type {ctype or '(none)'!r} is not supported; use {NPZ}, application/json or {NPY}",
                    status=415,
                )
            body = await self._read_body(request)
            named = ctype == NPZ
            if ctype == NPZ:
                x: Any = decode_npz(body, self.args.max_body_bytes)
            elif ctype == NPY:
                x = decode_npy(body)
            else:
                doc = load_json(body)
                named = isinstance(doc, dict) and "inputs" in doc
                x = decode_inputs_json(doc) if named else decode_json(doc, self.io_signature())
            # A request that times out is cancelled: its batch queue drops it.
            y = await asyncio.wait_for(self.infer(x), self.args.request_timeout_s)
        except RequestError as e:  # before InvalidInputError, its base
            return JSONResponse({"error": str(e)}, status_code=e.status)
        except InvalidInputError as e:
            return JSONResponse({"error": str(e)}, status_code=422)
        except TimeoutError:
            return JSONResponse({"error": f"request timed out after {self.args.request_timeout_s}s"}, status_code=504)
        headers = {"x-fa3trt-replica": self.replica}
        if named:
            if ctype == NPZ:
                return Response(encode_npz(y), media_type=NPZ, headers=headers)
            return JSONResponse(encode_outputs_json(y), headers=headers)
        if ctype == NPY:
            return Response(encode_npy(y), media_type=NPY, headers=headers)
        return JSONResponse(encode_json(y, self.io_signature().output.name), headers=headers)

    @api.get("/v1/info")
    async def info(self) -> dict[str, Any]:
        """The replica's backend, device, buckets and batch limits, and the app's arguments."""
        return await self.replica_info()

    @api.get("/v1/stats")
    async def stats(self) -> dict[str, Any]:
        """One model replica's counters since it started: per bucket batches, requests, tokens, compute."""
        return await self.replica_stats()


class V2Routes(_Replica):
    """KServe v2: REST routes under ``/v2`` and the ``inference.GRPCInferenceService`` methods."""

    @functools.cached_property
    def model_name(self) -> str:
        """The model's v2 name: the Serve application's name (``fa3trt`` outside Serve)."""
        try:
            return str(serve.get_replica_context().app_name)
        except Exception:  # outside Serve (direct construction in tests)
            return "fa3trt"

    async def _v2_metadata(self) -> dict[str, Any]:
        platform = f"fa3trt_{await self.backend_name()}"
        return kserve.model_metadata(self.model_name, V2_VERSIONS, platform, self.io_signature())

    async def _v2_infer(self, req: kserve.V2Request) -> dict[str, tuple[np.ndarray, str]]:
        """Each row of the protocol's batch axis is one request to the batch queues."""
        sig = self.io_signature()
        rows = kserve.split_request(req, sig)
        hint = kserve.answer_dtype(req)
        answers = await asyncio.wait_for(
            asyncio.gather(*(self.infer(r, hint) for r in rows)), self.args.request_timeout_s
        )
        return kserve.join_outputs(answers, req, sig)

    def _v2_error(self, e: Exception) -> tuple[int, str]:
        """(HTTP status, message) of a failed v2 call; server faults are logged."""
        status = kserve.http_status(e)
        if status >= 500:
            log.error("v2 request failed: %s: %s", type(e).__name__, e)
        if isinstance(e, TimeoutError):
            return status, f"request timed out after {self.args.request_timeout_s}s; retry, or send fewer rows"
        return status, kserve.error_body(e)["error"]

    def _http_error(self, e: Exception) -> JSONResponse:
        status, message = self._v2_error(e)
        return JSONResponse({"error": message}, status_code=status)

    def _unknown_model(self, name: str, version: str) -> JSONResponse | None:
        """The protocol's 404 when ``name`` (or ``version``) is not the served model, else None."""
        try:
            kserve.check_model(name, version, self.model_name, V2_VERSIONS)
        except RequestError as e:
            return self._http_error(e)
        return None

    @api.get("/v2/health/live")
    def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    def v2_ready(self) -> JSONResponse:
        ready = self.is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @api.get("/v2")
    def v2_server_metadata(self) -> dict[str, Any]:
        return kserve.server_metadata(_version())

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def v2_model_metadata(self, name: str, version: str = "") -> JSONResponse:
        return self._unknown_model(name, version) or JSONResponse(await self._v2_metadata())

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    def v2_model_ready(self, name: str, version: str = "") -> JSONResponse:
        if refused := self._unknown_model(name, version):
            return refused
        ready = self.is_ready()
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer_http(self, name: str, request: Request, version: str = "") -> Response:
        """v2 REST inference: JSON tensors or the binary tensor data extension (deploy.kserve)."""
        try:
            kserve.check_model(name, version, self.model_name, V2_VERSIONS)
            encoding = request.headers.get("content-encoding", "identity").lower()
            if encoding != "identity":
                raise RequestError(f"Content-Encoding {encoding!r} is not supported; send the body uncompressed", 415)
            body = await self._read_body(request)
            req = kserve.parse_http_infer(body, request.headers.get(kserve.HEADER_LENGTH))
            outputs = await self._v2_infer(req)
        except Exception as e:
            return self._http_error(e)
        content, json_len = kserve.encode_http_infer(self.model_name, version or V2_VERSIONS[0], req, outputs)
        headers = {"x-fa3trt-replica": self.replica}
        if json_len is None:
            return Response(content, media_type="application/json", headers=headers)
        headers[kserve.HEADER_LENGTH] = str(json_len)
        return Response(content, media_type="application/octet-stream", headers=headers)

    # gRPC, inference.GRPCInferenceService: Serve's gRPC proxy calls the method of the RPC's
    # name with the request's bytes (deploy.kserve_grpc.add_GRPCInferenceServiceServicer_to_server);
    # an error is a status set on grpc_context.
    async def ServerLive(self, request: Any, grpc_context: Any = None) -> Any:
        return kserve_grpc.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, grpc_context: Any = None) -> Any:
        return kserve_grpc.pb.ServerReadyResponse(ready=self.is_ready())

    async def ServerMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        meta = kserve.server_metadata(_version())
        return kserve_grpc.pb.ServerMetadataResponse(**meta)

    async def ModelReady(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            request = kserve_grpc.parse_message("ModelReady", request)
            kserve.check_model(request.name, request.version, self.model_name, V2_VERSIONS)
        except RequestError as e:
            return self._grpc_error(e, grpc_context, kserve_grpc.pb.ModelReadyResponse())
        return kserve_grpc.pb.ModelReadyResponse(ready=self.is_ready())

    async def ModelMetadata(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            request = kserve_grpc.parse_message("ModelMetadata", request)
            kserve.check_model(request.name, request.version, self.model_name, V2_VERSIONS)
        except RequestError as e:
            return self._grpc_error(e, grpc_context, kserve_grpc.pb.ModelMetadataResponse())
        return kserve_grpc.grpc_model_metadata(await self._v2_metadata())

    async def ModelInfer(self, request: Any, grpc_context: Any = None) -> Any:
        try:
            size = request.ByteSize() if isinstance(request, kserve_grpc.pb.ModelInferRequest) else len(request)
            limit = self.args.max_body_bytes
            if size > limit:
                raise RequestError(
                    f"request of {size} bytes exceeds the limit of {limit} bytes (max_body_bytes); send fewer tokens",
                    413,
                )
            # The tensors stay views on the request's bytes (kserve_grpc.read_infer).
            request, raw = kserve_grpc.read_infer(request)
            kserve.check_model(request.model_name, request.model_version, self.model_name, V2_VERSIONS)
            req = kserve_grpc.parse_grpc_infer(request, raw)
            outputs = await self._v2_infer(req)
        except Exception as e:
            return self._grpc_error(e, grpc_context, kserve_grpc.pb.ModelInferResponse())
        answer = kserve_grpc.encode_grpc_infer(self.model_name, request.model_version or V2_VERSIONS[0], req, outputs)
        return kserve_grpc.Serialized(answer)

    def _grpc_error(self, e: Exception, grpc_context: Any, empty: Any) -> Any:
        _, message = self._v2_error(e)
        if grpc_context is None:  # called outside Serve's gRPC proxy
            raise e
        grpc_context.set_code(kserve_grpc.grpc_code(e))
        grpc_context.set_details(message)
        return empty
