"""FLUX-style transformers in the denoising loop, step for step as diffusers' ``FluxPipeline``.

Contract: ``FluxFamily(args)`` reads the transformer's config (inline, or the folder's
``config.json``) and gives
- ``spec()``: the transformer as a served model source (``fa3trt.models.spec.SourceSpec``): its
  inputs as the pipeline calls it (packed latents ``hidden_states`` (S, C), the text embedding
  ``encoder_hidden_states`` (T, D), ``pooled_projections`` (P,), ``timestep`` () in the model's
  dtype already divided by 1000, ``img_ids`` (S, 3) and ``txt_ids`` (T, 3) shared by a batch, and
  ``guidance`` () where the model embeds it), bucketed by the image tokens S, batched by shape.
  Any backend runs it: torch under routing, CUDA graphs, ``torch.compile``, or its engine;
- ``start(request, device, dtype)``: a request's state before its first step: its initial
  latents (from its ``latents``, or drawn from its own ``seed`` on the CPU as the pipeline draws
  them, then packed), its position ids, its rows (the prompt, and the negative prompt under true
  classifier-free guidance), and its own scheduler set to its steps, with the flow-matching shift
  of its image's token count (``calculate_shift``);
- ``inputs(states)`` one pass's batch of several requests (each at its own step: the timestep
  is a row's input), and ``noise(out, states)`` each request's model output back (the two rows
  of a guided request combined as the pipeline combines them).
A request's answer is the pipeline's whatever it is batched with: its noise, scheduler and
timesteps are its own, and the transformer treats the rows of a batch apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fa3trt.errors import ConfigError
from fa3trt.generation.config import GenerationArgs
from fa3trt.generation.parts import part_config
from fa3trt.generation.requests import GenerateRequest, Limits
from fa3trt.models.spec import SourceSpec

__all__ = ["FluxFamily", "Start", "calculate_shift"]

TIMESTEP_SCALE = 1000.0
"""The pipeline passes the transformer the scheduler's timestep divided by this."""


def calculate_shift(tokens: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """The flow-matching shift ``mu`` for an image of ``tokens`` tokens (diffusers' FLUX rule)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return tokens * m + base_shift - m * base_len


@dataclass
class Start:
    """A request's state before its first step."""

    latents: torch.Tensor
    """(1, S, C) packed latents in the model's dtype on the device."""
    img_ids: torch.Tensor
    txt_ids: torch.Tensor
    embeds: torch.Tensor
    """(rows, T, D): the prompt (and the negative prompt)."""
    pooled: torch.Tensor
    """(rows, P)."""
    guidance: float
    scheduler: Any
    timesteps: torch.Tensor


def _transformer_config(args: GenerationArgs) -> dict[str, Any]:
    t = args.transformer
    return part_config(t.config, t.path, "transformer")


class FluxFamily:
    """The FLUX adapter (see the module docstring)."""

    name = "flux"

    def __init__(self, args: GenerationArgs) -> None:
        if args.transformer.class_name != "FluxTransformer2DModel":
            raise ConfigError(
                f"transformer.class {args.transformer.class_name!r}: the generation app runs FLUX-style transformers "
                "(FluxTransformer2DModel) so far"
            )
        self.args = args
        cfg = _transformer_config(args)
        self.patch = int(cfg.get("patch_size", 1))
        if self.patch != 1:
            raise ConfigError(f"transformer.config.patch_size = {self.patch}: FLUX packs 2x2 latents itself; use 1")
        self.channels = int(cfg.get("in_channels", 64))
        if self.channels % 4:
            raise ConfigError(f"transformer.config.in_channels = {self.channels} is not 4 x the latent channels")
        self.text_dim = int(cfg.get("joint_attention_dim", 4096))
        self.pooled_dim = int(cfg.get("pooled_projection_dim", 768))
        self.guidance_embeds = bool(cfg.get("guidance_embeds", False))
        self.pixel_step = 2 * args.vae_scale_factor

    def limits(self) -> Limits:
        return Limits(
            text_dim=self.text_dim,
            pooled_dim=self.pooled_dim,
            max_text_tokens=self.args.max_text_tokens,
            pixel_step=self.pixel_step,
            max_tokens=self.args.bucket_set().max_len,
            max_steps=self.args.max_steps,
            channels=self.channels,
            default_guidance=self.args.guidance_scale,
            outputs=("latents", "png") if self.args.vae is not None else ("latents",),
            prompts=self.args.text_encoders is not None,
        )

    def spec(self) -> SourceSpec:
        """The transformer as a served model source (see the module docstring)."""
        t, dtype = self.args.transformer, self.args.transformer.dtype
        inputs: dict[str, Any] = {
            "hidden_states": {"axes": ["S", self.channels]},
            "encoder_hidden_states": {"axes": ["T", self.text_dim]},
            "pooled_projections": {"axes": [self.pooled_dim]},
            "timestep": {"axes": []},
            "img_ids": {"axes": ["S", 3], "batched": False},
            "txt_ids": {"axes": ["T", 3], "batched": False},
        }
        if self.guidance_embeds:
            inputs["guidance"] = {"axes": [], "dtype": "float32"}
        return SourceSpec.model_validate(
            {
                "source": "diffusers",
                "class": t.class_name,
                **({"config": t.config} if t.config is not None else {"path": t.path}),
                "dtype": dtype,
                "routing": t.routing,
                "seed": t.seed,
                "weights": t.weights,
                "inputs": inputs,
                "output": {"name": "sample", "select": 0, "axes": ["S", self.channels], "dtype": dtype},
                "bucketed_axis": "S",
                "axis_ranges": {"T": [1, self.args.max_text_tokens]},
                "batching": "shape",
            }
        )

    def tokens(self, height: int, width: int) -> int:
        return (height // self.pixel_step) * (width // self.pixel_step)

    def scheduler(self) -> Any:
        """A new instance of the configured scheduler (one per request: its step index is its own)."""
        diffusers = importlib.import_module("diffusers")
        cls = getattr(diffusers, self.args.scheduler.class_name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ConfigError(f"scheduler.class {self.args.scheduler.class_name!r} is not a diffusers scheduler")
        try:
            return cls.from_config(dict(self.args.scheduler.config))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"scheduler.config does not build {self.args.scheduler.class_name}: {e}") from e

    def start(self, req: GenerateRequest, device: torch.device, dtype: torch.dtype) -> Start:
        """``req``'s state before its first step (see the module docstring)."""
        from diffusers.utils.torch_utils import randn_tensor

        h, w = 2 * (req.height // self.pixel_step), 2 * (req.width // self.pixel_step)
        c = self.channels // 4
        if req.latents is not None:
            latents = torch.from_numpy(req.latents)[None].to(device, dtype)
        else:
            # As the pipeline draws them: its own generator on the CPU, in the model's dtype, then packed.
            g = torch.Generator("cpu").manual_seed(req.seed)
            noise = randn_tensor((1, c, h, w), generator=g, device=torch.device("cpu"), dtype=dtype)
            latents = noise.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, c * 4)
            latents = latents.to(device)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids = ids.reshape(-1, 3).to(device, dtype)
        txt_ids = torch.zeros(req.prompt_embeds.shape[0], 3).to(device, dtype)
        rows = [req.prompt_embeds] + ([req.negative_prompt_embeds] if req.cfg else [])
        pooled = [req.pooled_prompt_embeds] + ([req.negative_pooled_prompt_embeds] if req.cfg else [])
        embeds = torch.from_numpy(np.stack(rows)).to(device, dtype)  # type: ignore[arg-type]
        pooled_t = torch.from_numpy(np.stack(pooled)).to(device, dtype)  # type: ignore[arg-type]
        scheduler = self.scheduler()
        config = scheduler.config
        # As the pipeline: evenly spaced sigmas, unless the scheduler makes its own.
        sigmas = None if getattr(config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / req.steps, req.steps)
        mu = calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)
        return Start(latents, img_ids, txt_ids, embeds, pooled_t, req.guidance_scale, scheduler, scheduler.timesteps)

    def inputs(self, states: list[Any]) -> dict[str, torch.Tensor]:
        """One pass over ``states`` (each at its own step; equal image and text sizes)."""
        first = states[0]
        dtype = first.latents.dtype
        hidden, timestep, embeds, pooled, guidance = [], [], [], [], []
        for s in states:
            t = s.timesteps[s.step].to(dtype) / TIMESTEP_SCALE
            for r in range(s.rows):
                hidden.append(s.latents)
                timestep.append(t.reshape(1))
                embeds.append(s.embeds[r : r + 1])
                pooled.append(s.pooled[r : r + 1])
                guidance.append(s.guidance)
        batch = {
            "hidden_states": torch.cat(hidden),
            "encoder_hidden_states": torch.cat(embeds),
            "pooled_projections": torch.cat(pooled),
            "timestep": torch.cat(timestep),
            "img_ids": first.img_ids,
            "txt_ids": first.txt_ids,
        }
        if self.guidance_embeds:
            batch["guidance"] = torch.tensor(guidance, dtype=torch.float32, device=first.latents.device)
        return batch

    def noise(self, out: torch.Tensor, states: list[Any]) -> list[torch.Tensor]:
        """Each state's model output (1, S, C) from one pass's ``out`` (rows in ``inputs``' order)."""
        noises, r = [], 0
        for s in states:
            pos = out[r : r + 1]
            if s.rows == 2:  # true classifier-free guidance, as the pipeline combines it
                neg = out[r + 1 : r + 2]
                pos = neg + s.cfg_scale * (pos - neg)
            noises.append(pos)
            r += s.rows
        return noises
