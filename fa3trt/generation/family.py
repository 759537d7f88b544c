"""What the denoising loop needs of a transformer family, and the family of a configured transformer.

Contract: ``family_for(args)`` is the adapter of the configured transformer's class
(``FluxTransformer2DModel``: ``fa3trt.generation.flux.FluxFamily``; ``SD3Transformer2DModel``:
``fa3trt.generation.sd3.SD3Family``); any other class is a ``ConfigError`` naming those. An
adapter (a ``Family``) reads the transformer's config and gives
- ``spec()``: the transformer as a served model source (any backend runs it), and ``buckets()``,
  ``max_batch_tokens()``: what its backend is built for;
- ``limits()``: what a request may carry (``fa3trt.generation.requests.Limits``), and
  ``tokens(height, width)``: an image's token count, which picks its bucket;
- ``scheduler()``: a new instance of the configured scheduler (one per request: its step index
  is its own), from the family's default config where the app names none;
- ``start(request, device, dtype)``: a request's ``Start``, its state before its first step, as
  the family's diffusers pipeline prepares it (initial noise drawn from the request's own seed on
  the CPU, timesteps, rows: the prompt, and the negative prompt under classifier-free guidance);
- ``inputs(states)``: one pass's batch over requests each at its own step (the timestep is a
  row's input), and ``noise(out, states)``: each request's model output back, its rows combined
  as the pipeline combines them;
- ``latent_channels``: the channels of the latents the VAE decodes, and ``image_latents(x,
  height, width)``: a batch of the loop's latents as the VAE takes them;
- ``negative_text(request)``: the negative prompt a request that sent ``prompt`` is encoded with
  (None: it runs one row a step).
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError
from fa3trt.generation.config import GenerationArgs
from fa3trt.generation.parts import part_config
from fa3trt.generation.requests import GenerateRequest, Limits
from fa3trt.models.spec import SourceSpec
from fa3trt.transfer import to_device

__all__ = ["FAMILIES", "Family", "Start", "family_for", "noise_from_seed", "on_device", "schedule"]

FAMILIES = {
    "FluxTransformer2DModel": "fa3trt.generation.flux:FluxFamily",
    "SD3Transformer2DModel": "fa3trt.generation.sd3:SD3Family",
}
"""The transformer classes the generation app runs, and their adapters."""


@dataclass(eq=False)
class Start:
    """A request's state before its first step (a ``Generation`` carries it on, step by step)."""

    latents: torch.Tensor
    """(1, ...) latents in the model's dtype on the device, as the family's model takes them."""
    embeds: torch.Tensor
    """(rows, T, D): the prompt (and the negative prompt)."""
    pooled: torch.Tensor
    """(rows, P)."""
    guidance: float
    """The distilled guidance input, where the model embeds one."""
    cfg_scale: float
    """Classifier-free guidance: the scale its two rows are combined with (1: one row)."""
    scheduler: Any
    timesteps: torch.Tensor
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    """Inputs one for the whole batch (FLUX's position ids): only requests with equal ones share a pass."""


def noise_from_seed(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The initial noise as diffusers' pipelines draw it: a CPU generator seeded with ``seed``, in
    ``dtype`` (a request's answer does not depend on the device or on what it is batched with)."""
    from diffusers.utils.torch_utils import randn_tensor

    g = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor(shape, generator=g, device=torch.device("cpu"), dtype=dtype)


def on_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on ``device`` in ``dtype``, queued through page-locked memory: preparing a
    request or a pass never waits for the pass the device is running (a copy from pageable
    memory waits for the whole stream; on a serving loop that keeps one pass queued ahead, the
    device would then idle while the host prepares and launches the next)."""
    return to_device(t if dtype is None else t.to(dtype), device)


def schedule(scheduler: Any, device: torch.device, **kwargs: Any) -> torch.Tensor:
    """``scheduler.set_timesteps(**kwargs)`` on the CPU (where the scheduler keeps its sigmas), its
    first step index set to 0 where it takes one (no lookup of the timestep on the device at the
    first step); the timesteps on ``device``, queued."""
    scheduler.set_timesteps(device="cpu", **kwargs)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return on_device(scheduler.timesteps, device)


class Family(abc.ABC):
    """What the adapters share (see the module docstring); a subclass sets the model's widths in
    ``__init__`` and gives ``spec``, ``start``, ``inputs``, ``noise``, ``image_latents`` and
    ``negative_text``."""

    name = ""
    default_scheduler: dict[str, Any] = {}
    default_guidance = 1.0
    spatial = False
    """Whether requests send latents as (C, h, w) (else packed, (S, C))."""
    guidance_negative = False
    """Whether ``guidance_scale`` > 1 guides with the negative prompt (else it is a distilled guidance input)."""

    def __init__(self, args: GenerationArgs) -> None:
        self.args = args
        t = args.transformer
        self.config = part_config(t.config, t.path, "transformer")
        self.text_dim = 0
        self.pooled_dim = 0
        self.channels = 0
        self.latent_channels = 0
        self.pixel_step = 1
        self.max_side: int | None = None

    @property
    def guidance_scale(self) -> float:
        """The guidance a request gets when it names none: the app's, else the family's."""
        return self.args.guidance_scale if self.args.guidance_scale is not None else self.default_guidance

    def limits(self) -> Limits:
        return Limits(
            text_dim=self.text_dim,
            pooled_dim=self.pooled_dim,
            max_text_tokens=self.args.max_text_tokens,
            pixel_step=self.pixel_step,
            max_tokens=self.args.bucket_set().max_len,
            max_steps=self.args.max_steps,
            channels=self.channels,
            default_guidance=self.guidance_scale,
            outputs=("latents", "png") if self.args.vae is not None else ("latents",),
            prompts=self.args.text_encoders is not None,
            spatial=self.spatial,
            vae_scale_factor=self.args.vae_scale_factor,
            max_side=self.max_side,
            guidance_negative=self.guidance_negative,
        )

    def tokens(self, height: int, width: int) -> int:
        return (height // self.pixel_step) * (width // self.pixel_step)

    def buckets(self) -> Buckets:
        """The backend's buckets along the spec's bucketed axis (by default the image tokens)."""
        return self.args.bucket_set()

    def max_batch_tokens(self) -> int:
        return self.buckets().max_len * self.args.max_batch_rows

    def scheduler(self) -> Any:
        diffusers = importlib.import_module("diffusers")
        s = self.args.scheduler
        cls = getattr(diffusers, s.class_name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ConfigError(f"scheduler.class {s.class_name!r} is not a diffusers scheduler")
        try:
            return cls.from_config(dict(s.config if s.config is not None else self.default_scheduler))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler.config does not build {s.class_name}: {e}") from e

    def _spec(
        self, inputs: dict[str, Any], output_axes: list[Any], bucketed: str, ranges: dict[str, Any]
    ) -> SourceSpec:
        t = self.args.transformer
        return SourceSpec.model_validate(
            {
                "source": "diffusers",
                "class": t.class_name,
                **({"config": t.config} if t.config is not None else {"path": t.path}),
                "dtype": t.dtype,
                "routing": t.routing,
                "seed": t.seed,
                "weights": t.weights,
                "inputs": inputs,
                "output": {"name": "sample", "select": 0, "axes": output_axes, "dtype": t.dtype},
                "bucketed_axis": bucketed,
                "axis_ranges": ranges,
                "batching": "shape",
            }
        )

    def _rows(
        self, req: GenerateRequest, cfg: bool, negative_first: bool, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (rows, T, D), pooled (rows, P)): the prompt, and with ``cfg`` the negative
        prompt before or after it, as the family's pipeline orders them."""
        rows, pooled = [req.prompt_embeds], [req.pooled_prompt_embeds]
        if cfg:
            assert req.negative_prompt_embeds is not None and req.negative_pooled_prompt_embeds is not None
            at = 0 if negative_first else 1
            rows.insert(at, req.negative_prompt_embeds)
            pooled.insert(at, req.negative_pooled_prompt_embeds)
        return on_device(torch.from_numpy(np.stack(rows)), device, dtype), on_device(
            torch.from_numpy(np.stack(pooled)), device, dtype
        )

    @abc.abstractmethod
    def spec(self) -> SourceSpec: ...

    @abc.abstractmethod
    def start(self, req: GenerateRequest, device: torch.device, dtype: torch.dtype) -> Start: ...

    @abc.abstractmethod
    def inputs(self, states: list[Any]) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def noise(self, out: torch.Tensor, states: list[Any]) -> list[torch.Tensor]: ...

    @abc.abstractmethod
    def image_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def negative_text(self, req: GenerateRequest) -> str | None:
        """The negative prompt a ``prompt`` request is encoded with, or None (no guided row)."""

    # The text encoders (fa3trt.generation.text): which the family takes, its pipeline as their
    # host, and that pipeline's encode_prompt.
    @abc.abstractmethod
    def check_text_encoders(self, configs: dict[str, dict[str, Any]]) -> None:
        """``ConfigError`` naming the field where the encoders' configs (by name: clip, clip_2,
        t5) do not fit the transformer."""

    @abc.abstractmethod
    def text_pipeline(self, parts: dict[str, tuple[Any, Any]], max_tokens: int) -> Any:
        """The family's diffusers pipeline holding the encoders (``parts``: name -> (model,
        tokenizer)) and nothing else, for its ``encode_prompt``."""

    @abc.abstractmethod
    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, max_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequence embeddings (N, T, D), pooled (N, P)) of ``prompts``, as the pipeline makes them."""


def config_width(cfg: dict[str, Any], key: str = "hidden_size") -> Any:
    """An encoder config's ``key``, at its top or in its ``text_config`` (CLIP's full configs)."""
    return cfg.get(key, cfg.get("text_config", {}).get(key))


def family_for(args: GenerationArgs) -> Family:
    """The adapter of ``args.transformer``'s class (see the module docstring)."""
    name = args.transformer.class_name
    if name not in FAMILIES:
        raise ConfigError(
            f"transformer.class {name!r}: the generation app runs {sorted(FAMILIES)}; serve other models with "
            "the serving app (deploy.app:build_app)"
        )
    module, cls = FAMILIES[name].split(":")
    family: Family = getattr(importlib.import_module(module), cls)(args)
    return family
