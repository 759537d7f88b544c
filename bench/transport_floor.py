"""The floor of each transport on this host: what a request of a given size costs in the client,
on the wire and in the app's codecs, with no Serve and no model in its path.

``FloorServer`` is one bare process (a Ray actor, as a replica is) that answers every request with
its own tensor: ``/v1/infer`` (.npy, ``deploy.codec``) and KServe v2 over HTTP (binary tensors,
``deploy.kserve``) on uvicorn, KServe v2 over gRPC (raw contents, ``deploy.kserve_grpc``) on a
``grpc.aio`` server, and ``echo`` as a plain actor call (Ray's object store, what a deployment
handle rides on). ``bench.transports`` drives it with the very clients it drives the app with, at
batch 1, in the same run: a transport's floor over the app's handle path is the least any server
behind these clients could reach.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import numpy as np

from deploy import kserve, kserve_grpc
from deploy.codec import decode_npy, encode_npy

__all__ = ["FloorServer", "FLOOR_MODEL"]

FLOOR_MODEL = "floor"
"""The v2 model name the floor server answers to."""


def _listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


def echo_outputs(req: kserve.V2Request) -> dict[str, tuple[np.ndarray, str]]:
    """The request's first input as every output it asks for (``y`` when it names none)."""
    name, x = next(iter(req.inputs.items()))
    return {o: (x, req.datatypes[name]) for o in (req.outputs or {"y": True})}


def echo_app() -> Any:
    """The Starlette app: ``POST /v1/infer`` (.npy) and ``POST /v2/models/floor/infer``, each
    decoded and encoded by the app's own codecs, the input returned as the output."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def v1(request: Request) -> Response:
        x = decode_npy(await request.body())
        return Response(encode_npy(x), media_type="application/x-npy")

    async def v2(request: Request) -> Response:
        req = kserve.parse_http_infer(await request.body(), request.headers.get(kserve.HEADER_LENGTH))
        content, json_len = kserve.encode_http_infer(FLOOR_MODEL, "1", req, echo_outputs(req))
        headers = {} if json_len is None else {kserve.HEADER_LENGTH: str(json_len)}
        return Response(content, media_type="application/octet-stream", headers=headers)

    return Starlette(
        routes=[
            Route("/v1/infer", v1, methods=["POST"]),
            Route(f"/v2/models/{FLOOR_MODEL}/infer", v2, methods=["POST"]),
        ]
    )


class FloorServer:
    """One process serving the echo over HTTP and gRPC on free ports of 127.0.0.1 (``start``),
    and ``echo`` as an actor method."""

    def __init__(self) -> None:
        self._http: Any = None
        self._serving: asyncio.Task[Any] | None = None
        self._grpc: Any = None

    async def start(self) -> dict[str, str]:
        """Starts both servers on this actor's event loop: ``{"http": base URL, "grpc": host:port}``."""
        import grpc
        import uvicorn

        sock = _listen()
        http = self._http = uvicorn.Server(uvicorn.Config(echo_app(), log_level="warning", loop="none", lifespan="off"))
        self._serving = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started:
            if self._serving.done():
                self._serving.result()  # raises why it stopped
            await asyncio.sleep(0.01)

        async def model_infer(data: bytes, context: Any) -> bytes:
            request, raw = kserve_grpc.read_infer(data)
            req = kserve_grpc.parse_grpc_infer(request, raw)
            return kserve_grpc.encode_grpc_infer(FLOOR_MODEL, request.model_version or "1", req, echo_outputs(req))

        unlimited = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._grpc = grpc.aio.server(options=unlimited)
        handler = grpc.unary_unary_rpc_method_handler(model_infer)  # bytes in, bytes out
        self._grpc.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(kserve_grpc.SERVICE, {"ModelInfer": handler}),)
        )
        grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        return {"http": f"http://127.0.0.1:{sock.getsockname()[1]}", "grpc": f"127.0.0.1:{grpc_port}"}

    async def stop(self) -> None:
        if self._grpc is not None:
            await self._grpc.stop(None)
        if self._http is not None and self._serving is not None:
            self._http.should_exit = True
            await self._serving

    def echo(self, x: np.ndarray) -> np.ndarray:
        return x
