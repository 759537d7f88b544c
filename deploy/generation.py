"""The generation app: ``deploy.generation:build_app`` runs the denoising loop on the server.

One deployment, ``GenerationServer``: one replica per GPU (one CPU replica without GPUs), each
holding its requests in flight (``fa3trt.generation.engine.StepEngine``) and one loop that, pass
after pass, runs the batch the policy picks (earliest deadline first, or FIFO): requests join and
leave at any step boundary, each at its own step. The transformer runs on the serving backends
(torch under routing, CUDA graphs, ``torch.compile``, or this GPU's engine). The cost model of
the admission check is measured at start, before the replica takes traffic.

With a ``vae:`` a second deployment, ``VaeDecoder``, decodes the latents of a request that asks
for ``output: png``, and with ``text_encoders:`` a third, ``TextEncoder``, turns a request's
prompt into its embeddings before it joins the loop (one replica of each per generation replica,
each on its ``gpu_share`` of that GPU), so neither holds up the loop's passes.

The handle API: ``generate(fields)`` returns ``{"latents": array, "steps": n, "seconds": s}``
(``{"png": bytes, ...}`` for ``output: png``);
``handle.options(stream=True).generate_stream.remote(fields)`` yields ``{"step": i, "steps": n}``
per step, then the answer. The HTTP routes are ``deploy.generation_routes``'. A caller that goes
away (a cancelled call, a closed connection) cancels its generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from deploy.generation_routes import GenerationRoutes, gen_api
from deploy.replica import replica_id
from fa3trt import defaults
from fa3trt.errors import DeadlineError
from fa3trt.generation.config import GenerationArgs
from fa3trt.generation.engine import Generation, StepEngine
from fa3trt.generation.family import family_for
from fa3trt.generation.requests import parse_request
from fa3trt.generation.text import PromptEncoder, text_configs
from fa3trt.generation.vae import Decoder, vae_config
from fa3trt.models.sources import check_source
from fa3trt.serving import load_backend

__all__ = [
    "GenerationReplica",
    "GenerationServer",
    "VaeReplica",
    "VaeDecoder",
    "TextEncoderReplica",
    "TextEncoder",
    "build_app",
    "generation_plan",
]

log = logging.getLogger("ray.serve")


class GenerationReplica(GenerationRoutes):
    """One replica of the generation app (see the module docstring)."""

    def __init__(self, args: dict[str, Any], cpu_threads: int | None = None, vae: Any = None, text: Any = None) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        t0 = time.perf_counter()
        self.args = GenerationArgs.model_validate(args)
        self.vae, self.text = vae, text  # the VaeDecoder and TextEncoder deployments' handles, where configured
        self.family = family_for(self.args)
        self.limits = self.family.limits()
        buckets = self.args.bucket_set()
        self.backend = load_backend(
            self.args.backend,
            self.family.spec(),
            buckets=self.family.buckets(),
            store=self.args.store,
            max_batch_tokens=self.family.max_batch_tokens(),
            build_if_missing=self.args.build_if_missing,
            cuda_graphs=self.args.cuda_graphs,
            compile=self.args.compile,
        )
        self.engine = StepEngine(self.family, self.backend, buckets, self.args.max_batch_rows, self.args.policy)
        self.engine.warm()
        self.counts = {"admitted": 0, "finished": 0, "refused": 0, "cancelled": 0}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self.replica = replica_id()
        log.info("fa3trt generation replica %s ready in %.1fs", self.replica, time.perf_counter() - t0)

    def _ensure_loop(self) -> asyncio.Event:
        if self._wake is None or self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run_loop(self._wake))
        return self._wake

    async def _run_loop(self, wake: asyncio.Event) -> None:
        """Pass after pass while anything is in flight; the device work off the event loop."""
        while True:
            batch = self.engine.pick()
            if not batch:
                wake.clear()
                await wake.wait()
                continue
            # A failed pass is retried in halves: only a request that fails alone fails, with the
            # reason; the loop goes on.
            _, failed = await asyncio.to_thread(self.engine.step_or_split, batch)
            for gen, why in failed:
                log.error("generation %d failed at step %d: %s", gen.id, gen.step, why)
                self._finish(gen, RuntimeError(f"generation failed: {why}"))

    def _finish(self, gen: Generation, outcome: Any) -> None:
        queue: asyncio.Queue[Any] | None = getattr(gen, "events", None)
        if queue is not None:
            queue.put_nowait(outcome)

    async def _start(self, fields: Any) -> tuple[Generation, asyncio.Queue[Any], float]:
        """A request checked, its prompts encoded, prepared and admitted; its events' queue; its
        start time."""
        t0, arrival = time.perf_counter(), self.engine.clock()
        req = parse_request(fields, self.limits)
        if req.needs_encoding:  # the text encoders' deployment; its deadline counts from arrival
            negative = self.family.negative_text(req)
            texts = [req.prompt] + ([negative] if negative is not None else [])
            encoded = await asyncio.gather(*(self.text.encode.remote(t) for t in texts))
            req = req.encoded(encoded[0], encoded[1] if len(encoded) > 1 else None)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def on_step(gen: Generation) -> None:  # called on the loop's worker thread
            event: Any = {"step": gen.step, "steps": gen.steps}
            loop.call_soon_threadsafe(queue.put_nowait, event)
            if gen.done:
                loop.call_soon_threadsafe(queue.put_nowait, gen)

        gen = self.engine.new(req, on_step, arrival=arrival)
        gen.events = queue  # type: ignore[attr-defined]
        try:
            self.engine.admit(gen)
        except DeadlineError:
            self.counts["refused"] += 1
            raise
        self.counts["admitted"] += 1
        self._ensure_loop().set()
        return gen, queue, t0

    async def _answer(self, gen: Generation, t0: float) -> dict[str, Any]:
        """The finished request's latents, or its PNG from the VAE deployment."""
        self.counts["finished"] += 1
        # Off the event loop: the copy waits for the device's last pass of this request.
        latents = await asyncio.to_thread(lambda: gen.latents[0].float().cpu().numpy())
        out: dict[str, Any] = {"steps": gen.steps}
        if gen.request.output == "png":
            out["png"] = await self.vae.decode.remote(latents, gen.request.height, gen.request.width)
        else:
            out["latents"] = latents
        return out | {"seconds": round(time.perf_counter() - t0, 4)}

    async def generate(self, fields: Any) -> dict[str, Any]:
        """One generation to its end (see the module docstring)."""
        gen, queue, t0 = await self._start(fields)
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, Generation):
                    return await self._answer(gen, t0)
        except asyncio.CancelledError:
            self._cancel(gen)
            raise

    async def generate_stream(self, fields: Any) -> AsyncIterator[dict[str, Any]]:
        """One generation as events: ``{"step": i, "steps": n}`` per step, then its answer."""
        gen, queue, t0 = await self._start(fields)
        finished = False
        try:
            yield {"step": 0, "steps": gen.steps}
            while True:
                event = await queue.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, Generation):
                    finished = True
                    yield await self._answer(gen, t0)
                    return
                yield event
        finally:
            if not finished:  # the consumer went away (or the pass failed): free its slot
                self._cancel(gen)

    def _cancel(self, gen: Generation) -> None:
        if not gen.cancelled and not gen.done:
            self.engine.cancel(gen)
            self.counts["cancelled"] += 1
            log.info("generation %d cancelled at step %d of %d", gen.id, gen.step, gen.steps)

    def is_ready(self) -> bool:
        return True

    async def replica_info(self) -> dict[str, Any]:
        return self.backend.describe() | {
            "replica": self.replica,
            "family": self.family.name,
            "limits": self.limits.__dict__,
            "policy": self.args.policy,
            "cost_model_s": self.engine.cost.to_dict(),
            "app_args": self.args.model_dump(by_alias=True),
        }

    async def replica_stats(self) -> dict[str, Any]:
        return self.counts | {
            "replica": self.replica,
            "in_flight": len(self.engine),
            "passes": self.engine.passes,
            "rows": self.engine.rows_run,
        }

    def check_health(self) -> None:
        if self._loop_task is not None and self._loop_task.done() and self._loop_task.exception() is not None:
            raise RuntimeError(f"the generation loop died: {self._loop_task.exception()}")


class VaeReplica:
    """One replica of the app's image decoder (``fa3trt.generation.vae.Decoder``), on its share of
    a GPU (or the CPU): ``decode(latents, height, width)`` returns PNG bytes."""

    def __init__(self, args: dict[str, Any], cpu_threads: int | None = None) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        parsed = GenerationArgs.model_validate(args)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.decoder = Decoder(parsed, family_for(parsed), device)

    async def decode(self, latents: Any, height: int, width: int) -> bytes:
        return await asyncio.to_thread(self.decoder.decode, latents, height, width)


class TextEncoderReplica:
    """One replica of the app's text encoders (``fa3trt.generation.text.PromptEncoder``), on its
    share of a GPU (or the CPU): ``encode(prompt)`` returns its (sequence, pooled) embeddings;
    prompts arriving together are encoded as one batch (both encoders pad to fixed lengths, so a
    prompt's embeddings do not depend on its neighbours)."""

    def __init__(self, args: dict[str, Any], cpu_threads: int | None = None) -> None:
        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = PromptEncoder(GenerationArgs.model_validate(args), device)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def encode(self, prompts: list[str]) -> list[tuple[Any, Any]]:
        return await asyncio.to_thread(self.encoder.encode, prompts)


# Wrapped beside the class, as deploy.replica's deployments are: a replica's process imports this
# module to get the class, and that import moves the routes of gen_api onto it.
GenerationServer = serve.deployment(name="GenerationServer")(serve.ingress(gen_api)(GenerationReplica))
VaeDecoder = serve.deployment(name="VaeDecoder")(VaeReplica)
TextEncoder = serve.deployment(name="TextEncoder")(TextEncoderReplica)


def generation_plan(args: GenerationArgs, cluster_gpus: float, cluster_cpus: float) -> dict[str, Any]:
    """Deployment options of the generation replicas (``generate``) and, where configured, of the
    VAE's (``vae``) and the text encoders' (``text``), and a CPU replica's PyTorch threads
    (``threads``, None on GPUs): one generation replica per GPU (one CPU replica without GPUs,
    reserving a share of a CPU as the serving app's do), and as many VAE and text-encoder
    replicas, each on its ``gpu_share`` of a GPU beside the transformer's. A replica takes as many
    requests at once as Serve lets it queue: they wait in its loop, not in Serve's queue, so a
    deadline is judged as soon as a request arrives."""
    gpus = int(cluster_gpus)
    n = (gpus or 1) if args.replicas == "auto" else args.replicas
    queue = {"max_ongoing_requests": args.max_queued_requests, "max_queued_requests": args.max_queued_requests}
    shares = {
        name: part.gpu_share for name, part in (("vae", args.vae), ("text", args.text_encoders)) if part is not None
    }
    plan: dict[str, Any] = {}
    for name, share in (("generate", 1 - sum(shares.values())), *shares.items()):
        cpus = defaults.REPLICA_CPUS_AUTO if gpus and name == "generate" else defaults.CPU_REPLICA_CPUS
        actor = {"num_gpus": share, "num_cpus": cpus} if gpus else {"num_cpus": cpus}
        plan[name] = {"num_replicas": n, "ray_actor_options": actor, **queue}
    plan["threads"] = None if gpus else max(1, int(cluster_cpus) // (n * (1 + len(shares))))
    return plan


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: deploy.generation:build_app``)."""
    import ray

    from deploy.app import stop_serve_run

    try:
        parsed = GenerationArgs.model_validate(args)
        family = family_for(parsed)
        check_source(family.spec())
        if parsed.vae is not None:
            vae_config(parsed, family.latent_channels)
        if parsed.text_encoders is not None:
            text_configs(parsed, family)
    except Exception as e:
        stop_serve_run(f"the fa3trt generation app cannot start: {type(e).__name__}: {e}")
        raise
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    plan = generation_plan(parsed, resources.get("GPU", 0), resources.get("CPU", 1))
    log.info("fa3trt generation app: deployment options %s", plan)
    doc, threads = parsed.model_dump(by_alias=True), plan["threads"]
    parts = {
        name: deployment.options(**plan[name]).bind(doc, threads)  # type: ignore[attr-defined]
        for name, deployment in (("vae", VaeDecoder), ("text", TextEncoder))
        if name in plan
    }
    return GenerationServer.options(**plan["generate"]).bind(doc, threads, parts.get("vae"), parts.get("text"))  # type: ignore[attr-defined,no-any-return]
