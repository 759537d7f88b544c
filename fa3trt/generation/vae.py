"""A generation's latents to an image, as diffusers' ``FluxPipeline`` decodes them.

Contract: ``vae_config(args, packed_channels)`` reads the configured autoencoder's config and checks it against the
transformer (its latent channels times 4 are the transformer's packed channels, its scale factor
2 ** (blocks - 1) is ``vae_scale_factor``), each mismatch a ``ConfigError`` naming the fix.
``Decoder(args, packed_channels, device)`` loads it (a diffusers class from a config with random weights from
``seed``, or a local folder; an optional safetensors state dict). ``decode(latents,
height, width)`` takes packed latents (S, C), as the loop answers them, and returns the image as
PNG bytes: unpacked, unscaled and shifted by the VAE's config, decoded, and post-processed by
diffusers' ``VaeImageProcessor`` (the pipeline's ``output_type="pil"``). ``decode_many`` decodes
images of one size as one batch.
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
from fa3trt.generation.parts import load_part, part_config

__all__ = ["Decoder", "unpack", "vae_config"]


def unpack(latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed (B, S, C) latents to (B, C / 4, H, W), as the pipeline unpacks them."""
    b, _, c = latents.shape
    h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    x = latents.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def vae_config(args: GenerationArgs, packed_channels: int) -> dict[str, Any]:
    """The VAE's config (inline, or its folder's ``config.json``) checked against the transformer's
    packed channels and ``vae_scale_factor``, without loading its weights (the app builder's check)."""
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
    packed = packed_channels
    latent = int(cfg.get("latent_channels", 4))
    if latent * 4 != packed:
        raise ConfigError(
            f"vae latent_channels = {latent}, but the transformer packs {packed} channels (4 x {packed // 4}); "
            f"give a vae with latent_channels {packed // 4}"
        )
    return cfg


class Decoder:
    """The configured VAE on ``device`` (see the module docstring)."""

    def __init__(self, args: GenerationArgs, packed_channels: int, device: torch.device | str = "cpu") -> None:
        vae_config(args, packed_channels)
        assert args.vae is not None
        self.args, v = args, args.vae
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
        x = unpack(x, height, width, self.args.vae_scale_factor) / self.scaling + self.shift
        with torch.inference_mode():
            images: Any = self.processor.postprocess(self.vae.decode(x, return_dict=False)[0], output_type="pil")
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return out
