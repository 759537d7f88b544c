"""A generation's latents to an image, as the family's diffusers pipeline decodes them.

Contract: ``vae_config(args, latent_channels)`` reads the configured autoencoder's config and
checks it against the transformer (its latent channels are those of the transformer's latents,
its scale factor 2 ** (blocks - 1) is ``vae_scale_factor``), each mismatch a ``ConfigError``
naming the fix. ``Decoder(args, family, device)`` loads it (a diffusers class from a config with
random weights from ``seed``, or a local folder; an optional safetensors state dict).
``decode(latents, height, width)`` takes a request's latents as the loop answers them (FLUX:
packed (S, C); SD3: (C, h, w)) and returns the image as PNG bytes: as the family's latents
(``Family.image_latents``: unpacked for FLUX), unscaled and shifted by the VAE's config, decoded,
and post-processed by diffusers' ``VaeImageProcessor`` (the pipeline's ``output_type="pil"``).
``decode_many`` decodes images of one size as one batch.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fa3trt.errors import ConfigError
from fa3trt.generation.config import GenerationArgs
from fa3trt.generation.family import Family
from fa3trt.generation.parts import load_part, part_config

__all__ = ["Decoder", "vae_config"]


def vae_config(args: GenerationArgs, latent_channels: int) -> dict[str, Any]:
    """The VAE's config (inline, or its folder's ``config.json``) checked against the channels of
    the transformer's latents and ``vae_scale_factor``, without loading its weights (the app
    builder's check)."""
    if args.vae is None:
        raise ConfigError("the generation app has no vae: add vae: {class: AutoencoderKL, config|path: ...}")
    cfg = part_config(args.vae.config, args.vae.path, "vae")
    blocks = len(cfg.get("block_out_channels", (64,)))
    factor = 2 ** (blocks - 1)
    if factor != args.vae_scale_factor:
        raise ConfigError(
            f"vae_scale_factor = {args.vae_scale_factor} but the vae scales by {factor} ({blocks} blocks); "
            f"set vae_scale_factor: {factor}"
        )
    latent = int(cfg.get("latent_channels", 4))
    if latent != latent_channels:
        raise ConfigError(
            f"vae latent_channels = {latent}, but the transformer's latents have {latent_channels} channels; "
            f"give a vae with latent_channels {latent_channels}"
        )
    return cfg


class Decoder:
    """The configured VAE on ``device`` (see the module docstring)."""

    def __init__(self, args: GenerationArgs, family: Family, device: torch.device | str = "cpu") -> None:
        vae_config(args, family.latent_channels)
        assert args.vae is not None
        self.args, self.family, v = args, family, args.vae
        dtype = getattr(torch, v.dtype)
        vae = load_part(
            "diffusers",
            v.class_name,
            config=v.config,
            path=v.path,
            dtype=dtype,
            seed=v.seed,
            field="vae",
            from_config=lambda cls, config: cls.from_config(config),
            dtype_kwarg="torch_dtype",
        )
        if v.weights is not None:
            from safetensors.torch import load_file

            vae.load_state_dict(load_file(v.weights))
        self.vae = vae.eval().to(device, dtype)
        self.device, self.dtype = torch.device(device), dtype
        cfg = self.vae.config
        self.scaling, self.shift = float(cfg.scaling_factor), float(cfg.shift_factor or 0.0)
        image_processor = importlib.import_module("diffusers.image_processor")
        self.processor = image_processor.VaeImageProcessor(vae_scale_factor=args.vae_scale_factor * 2)

    def decode(self, latents: np.ndarray, height: int, width: int) -> bytes:
        return self.decode_many([latents], height, width)[0]

    def decode_many(self, latents: Sequence[np.ndarray], height: int, width: int) -> list[bytes]:
        """PNGs of several images of one size (see the module docstring)."""
        x = torch.from_numpy(np.stack([np.asarray(a, np.float32) for a in latents])).to(self.device, self.dtype)
        x = self.family.image_latents(x, height, width) / self.scaling + self.shift
        with torch.inference_mode():
            images: Any = self.processor.postprocess(self.vae.decode(x, return_dict=False)[0], output_type="pil")
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
