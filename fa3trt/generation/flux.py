"""FLUX-style transformers in the denoising loop, step for step as diffusers' ``FluxPipeline``.

Contract: ``FluxFamily(args)`` (a ``fa3trt.generation.family.Family``) reads the transformer's
config (inline, or the folder's ``config.json``) and gives
- ``spec()``: the transformer as a served model source: its inputs as the pipeline calls it
  (packed latents ``hidden_states`` (S, C), the text embedding ``encoder_hidden_states`` (T, D),
  ``pooled_projections`` (P,), ``timestep`` () in the model's dtype already divided by 1000,
  ``img_ids`` (S, 3) and ``txt_ids`` (T, 3) shared by a batch, and ``guidance`` () where the
  model embeds it), bucketed by the image tokens S, batched by shape;
- ``start(request, device, dtype)``: its initial latents (its ``latents``, or drawn from its own
  ``seed`` on the CPU as the pipeline draws them, then packed), its position ids, its rows (the
  prompt, and the negative prompt under true classifier-free guidance, ``true_cfg_scale``), and
  its own scheduler set to its steps, with the flow-matching shift of its image's token count
  (``calculate_shift``);
- ``inputs(states)``, ``noise(out, states)`` (a guided request's rows combined as the pipeline
  combines them), ``image_latents`` (packed latents unpacked, as the pipeline unpacks them).
A request's answer is the pipeline's whatever it is batched with: its noise, scheduler and
timesteps are its own, and the transformer treats the rows of a batch apart.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch

from fa3trt.errors import ConfigError
from fa3trt.generation.config import FLUX_SCHEDULER, GenerationArgs
from fa3trt.generation.family import Family, Start, config_width, noise_from_seed, on_device, schedule
from fa3trt.generation.requests import GenerateRequest
from fa3trt.models.spec import SourceSpec

__all__ = ["FluxFamily", "calculate_shift", "scheduler_shift", "unpack"]

TIMESTEP_SCALE = 1000.0
"""The pipeline passes the transformer the scheduler's timestep divided by this."""


def calculate_shift(tokens: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """The flow-matching shift ``mu`` for an image of ``tokens`` tokens (diffusers' FLUX rule)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return tokens * m + base_shift - m * base_len


def scheduler_shift(config: Any, tokens: int, max_shift: float) -> float:
    """``calculate_shift`` from a flow-matching scheduler's config, with diffusers' defaults where it
    names none (``max_shift``: the family's pipeline's own default)."""
    return calculate_shift(
        tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", max_shift),
    )


def unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed (B, S, C) latents to (B, C / 4, H, W), as the pipeline unpacks them."""
    b, _, c = latents.shape
    h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


class FluxFamily(Family):
    """The FLUX adapter (see the module docstring)."""

    name = "flux"
    default_scheduler = FLUX_SCHEDULER
    default_guidance = 3.5  # FLUX.1-dev's

    def __init__(self, args: GenerationArgs) -> None:
        super().__init__(args)
        cfg = self.config
        self.patch = int(cfg.get("patch_size", 1))
        if self.patch != 1:
            raise ConfigError(f"transformer.config.patch_size = {self.patch}: FLUX packs 2x2 latents itself; use 1")
        self.channels = int(cfg.get("in_channels", 64))
        if self.channels % 4:
            raise ConfigError(f"transformer.config.in_channels = {self.channels} is not 4 x the latent channels")
        self.latent_channels = self.channels // 4
        self.text_dim = int(cfg.get("joint_attention_dim", 4096))
        self.pooled_dim = int(cfg.get("pooled_projection_dim", 768))
        self.guidance_embeds = bool(cfg.get("guidance_embeds", False))
        self.pixel_step = 2 * args.vae_scale_factor

    def spec(self) -> SourceSpec:
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
        return self._spec(inputs, ["S", self.channels], "S", {"T": [1, self.args.max_text_tokens]})

    def start(self, req: GenerateRequest, device: torch.device, dtype: torch.dtype) -> Start:
        h, w = 2 * (req.height // self.pixel_step), 2 * (req.width // self.pixel_step)
        c = self.latent_channels
        if req.latents is not None:
            latents = on_device(torch.from_numpy(req.latents)[None], device, dtype)
        else:  # drawn as the pipeline draws them, then packed
            noise = noise_from_seed((1, c, h, w), req.seed, dtype)
            latents = noise.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, c * 4)
            latents = on_device(latents, device)
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        shared = {
            "img_ids": on_device(ids.reshape(-1, 3), device, dtype),
            "txt_ids": torch.zeros(req.prompt_embeds.shape[0], 3, device=device, dtype=dtype),
        }
        embeds, pooled = self._rows(req, req.cfg, negative_first=False, device=device, dtype=dtype)
        scheduler = self.scheduler()
        config = scheduler.config
        # As the pipeline: evenly spaced sigmas, unless the scheduler makes its own.
        sigmas = None if getattr(config, "use_flow_sigmas", False) else np.linspace(1.0, 1 / req.steps, req.steps)
        mu = scheduler_shift(config, latents.shape[1], max_shift=1.15)
        timesteps = schedule(scheduler, device, sigmas=sigmas, mu=mu)
        cfg_scale = req.true_cfg_scale if req.cfg else 1.0
        return Start(latents, embeds, pooled, req.guidance_scale, cfg_scale, scheduler, timesteps, shared)

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
            **first.shared,
        }
        if self.guidance_embeds:
            batch["guidance"] = on_device(torch.tensor(guidance, dtype=torch.float32), first.latents.device)
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

    def image_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return unpack(latents, height, width, self.args.vae_scale_factor)

    def negative_text(self, req: GenerateRequest) -> str | None:
        return req.negative_prompt if req.negative_prompt and req.true_cfg_scale > 1.0 else None

    def check_text_encoders(self, configs: dict[str, dict[str, Any]]) -> None:
        if "clip_2" in configs:
            raise ConfigError("text_encoders.clip_2: FLUX has one CLIP; remove clip_2")
        if config_width(configs["clip"]) != self.pooled_dim:
            raise ConfigError(
                f"text_encoders.clip: hidden_size {config_width(configs['clip'])} is not the transformer's "
                f"pooled_projection_dim {self.pooled_dim}"
            )
        if configs["t5"].get("d_model") != self.text_dim:
            raise ConfigError(
                f"text_encoders.t5: d_model {configs['t5'].get('d_model')} is not the transformer's "
                f"joint_attention_dim {self.text_dim}"
            )

    def text_pipeline(self, parts: dict[str, tuple[Any, Any]], max_tokens: int) -> Any:
        diffusers = importlib.import_module("diffusers")
        return diffusers.FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=parts["clip"][0],
            tokenizer=parts["clip"][1],
            text_encoder_2=parts["t5"][0],
            tokenizer_2=parts["t5"][1],
            transformer=None,
        )

    def encode_prompts(
        self, pipe: Any, prompts: list[str], device: torch.device, max_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=device, max_sequence_length=max_tokens)
        return embeds, pooled
