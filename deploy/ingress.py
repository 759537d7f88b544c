"""Ingress processes (``ingress_replicas: N``): N CPU replicas take the app's HTTP and gRPC
traffic and hand each request's arrays to the model replicas by deployment handle.

Why: a model replica that is also the ingress does all of a request's network work in its own
process: reading the body, decoding, encoding and writing the answer. With large tensors these
copies hold its GIL while the model's launches wait for it (docs/benchmarks.md, section 8: under
direct HTTP a batch's launch took 9.5 ms instead of 5.3 ms, and the GPU waited). Ingress
replicas spread that work over N processes, and a model replica then sees only handle calls,
whose arrays arrive through Ray's shared-memory object store. With direct ingress on, each
ingress replica listens on its own ports (``python -m deploy.targets``).

Contract: ``IngressReplica`` serves the same routes (``deploy.routes``) as the model replica, with
the same answers and errors. Requests are checked by the model replica (one place for the
rules); ``/v1/info`` and ``/v1/stats`` are a model replica's, with ``ingress_replica`` added to
the info.
"""

from __future__ import annotations

import os
from typing import Any

from ray import serve
from ray.exceptions import RayTaskError

from deploy.routes import V1Routes, V2Routes, api
from fa3trt.config import AppArgs
from fa3trt.signature import Signature

__all__ = ["IngressReplica", "Ingress"]


class IngressReplica(V1Routes, V2Routes):
    """One ingress process: the app's routes, each request handed to ``model`` (a handle of the
    model deployment)."""

    def __init__(self, args: dict[str, Any], model: Any) -> None:
        self.args = AppArgs.model_validate(args)
        self.model = model
        # The model replicas' signature, from the same arguments (nothing is loaded here).
        self.signature: Signature = self.args.model.signature()
        self._backend: str | None = None
        try:
            self.replica = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside Serve
            self.replica = f"pid{os.getpid()}"

    async def _call(self, method: str, *args: Any) -> Any:
        """``method`` of a model replica; its error raised as the model replica raised it (the
        routes answer it as they would there), not wrapped with the remote traceback."""
        try:
            return await getattr(self.model, method).remote(*args)
        except RayTaskError as e:
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise

    async def infer(self, x: Any, answer_dtype: str | None = None) -> Any:
        return await self._call("infer", x, answer_dtype)

    def io_signature(self) -> Signature:
        return self.signature

    def is_ready(self) -> bool:
        return True  # Serve routes to an ingress replica once the app (model replicas too) is up

    async def backend_name(self) -> str:
        if self._backend is None:
            self._backend = str(await self.model.backend_name.remote())
        return self._backend

    async def replica_info(self) -> dict[str, Any]:
        info: dict[str, Any] = await self.model.replica_info.remote()
        return info | {"ingress_replica": self.replica}

    async def replica_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = await self.model.replica_stats.remote()
        return stats


# As deploy.replica.ModelServer: wrapped beside the class, whose import runs it in the replica.
Ingress = serve.deployment(name="Ingress")(serve.ingress(api)(IngressReplica))
