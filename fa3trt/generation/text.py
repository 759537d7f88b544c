"""Prompts to a family's embeddings, as its diffusers pipeline encodes them.

Contract: ``text_configs(args, family)`` reads the encoders' configs (inline, or each folder's
``config.json``) and checks them against the transformer, each mismatch a ``ConfigError`` naming
the fix (the app builder's check). FLUX (``FluxPipeline``): ``clip`` (CLIPTextModel) gives the
pooled embedding, its width the pooled projection's; ``t5`` the sequence, its width the joint
attention's; no ``clip_2``. SD3 (``StableDiffusion3Pipeline``): ``clip`` and ``clip_2``
(CLIPTextModelWithProjection, CLIP-L and CLIP-G) give the pooled embedding side by side (their
projections add up to the pooled projection's width) and the first part of the sequence (their
widths side by side, padded to T5's), ``t5`` the rest (its width the joint attention's).
``PromptEncoder(args, device)`` loads the encoders (transformers classes from a config with random
weights from ``seed``, or local folders) and their tokenizers, and ``encode(prompts)`` returns, per
prompt, its sequence (``max_text_tokens``, D) and its pooled embedding (P,), as float32 arrays: the
pipeline's own ``encode_prompt`` runs them, so truncation, padding and pooling are the pipeline's
(FLUX: T5 padded to ``max_text_tokens``; SD3: the CLIPs' tokens, then T5's up to
``max_text_tokens``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fa3trt.errors import ConfigError
from fa3trt.generation.config import GenerationArgs, TextEncoderArgs
from fa3trt.generation.family import Family, family_for
from fa3trt.generation.parts import load_part, part_config

__all__ = ["PromptEncoder", "text_configs"]

Configs = dict[str, dict[str, Any]]


def _width(cfg: dict[str, Any], key: str = "hidden_size") -> Any:
    return cfg.get(key, cfg.get("text_config", {}).get(key))


def _check_flux(configs: Configs, family: Family) -> None:
    if "clip_2" in configs:
        raise ConfigError("text_encoders.clip_2: FLUX has one CLIP; remove clip_2")
    if _width(configs["clip"]) != family.pooled_dim:
        raise ConfigError(
            f"text_encoders.clip: hidden_size {_width(configs['clip'])} is not the transformer's "
            f"pooled_projection_dim {family.pooled_dim}"
        )
    if configs["t5"].get("d_model") != family.text_dim:
        raise ConfigError(
            f"text_encoders.t5: d_model {configs['t5'].get('d_model')} is not the transformer's joint_attention_dim "
            f"{family.text_dim}"
        )


def _check_sd3(configs: Configs, family: Family) -> None:
    if "clip_2" not in configs:
        raise ConfigError("text_encoders.clip_2: SD3 encodes with two CLIPs; add clip_2 (CLIP-G, text_encoder_2/)")
    projections = [_width(configs[n], "projection_dim") or 512 for n in ("clip", "clip_2")]
    if sum(projections) != family.pooled_dim:
        raise ConfigError(
            f"text_encoders: clip's and clip_2's projection_dim ({projections[0]} + {projections[1]}) are not the "
            f"transformer's pooled_projection_dim {family.pooled_dim}"
        )
    t5 = configs["t5"].get("d_model")
    if t5 != family.text_dim:
        raise ConfigError(
            f"text_encoders.t5: d_model {t5} is not the transformer's joint_attention_dim {family.text_dim}"
        )
    widths = [_width(configs[n]) for n in ("clip", "clip_2")]
    if sum(widths) > t5:
        raise ConfigError(
            f"text_encoders: clip's and clip_2's hidden_size ({widths[0]} + {widths[1]}) are wider than t5's d_model {t5}"
        )


CHECKS: dict[str, Callable[[Configs, Family], None]] = {"flux": _check_flux, "sd3": _check_sd3}


def text_configs(args: GenerationArgs, family: Family) -> Configs:
    """The encoders' configs by name, checked against the transformer (see the module docstring)."""
    enc = args.text_encoders
    if enc is None:
        raise ConfigError("the generation app has no text_encoders: add text_encoders: {clip: ..., t5: ...}")
    configs = {
        name: part_config(e.config, e.path, f"text_encoders.{name}")
        for name in ("clip", "clip_2", "t5")
        if (e := getattr(enc, name)) is not None
    }
    CHECKS[family.name](configs, family)
    for name in configs:
        folder = Path(getattr(enc, name).tokenizer)
        if not folder.is_dir():
            raise ConfigError(f"text_encoders.{name}.tokenizer: {folder} is not a folder; give its tokenizer's folder")
    return configs


def _load(enc: TextEncoderArgs, field: str, device: torch.device) -> Any:
    dtype = getattr(torch, enc.dtype)
    model = load_part(
        "transformers",
        enc.class_name,
        config=enc.config,
        path=enc.path,
        dtype=dtype,
        seed=enc.seed,
        field=field,
        from_config=lambda cls, config: cls(cls.config_class(**config)),
        dtype_kwarg="dtype",
    )
    return model.to(device, dtype)


class PromptEncoder:
    """The family's text encoders on ``device`` (see the module docstring)."""

    def __init__(self, args: GenerationArgs, device: torch.device | str = "cpu") -> None:
        family = family_for(args)
        names = list(text_configs(args, family))
        assert args.text_encoders is not None
        self.device = torch.device(device)
        self.max_tokens = args.max_text_tokens
        self.family = family.name
        transformers = importlib.import_module("transformers")
        diffusers = importlib.import_module("diffusers")
        enc = args.text_encoders
        parts = {
            n: (
                _load(getattr(enc, n), f"text_encoders.{n}", self.device),
                transformers.AutoTokenizer.from_pretrained(getattr(enc, n).tokenizer),
            )
            for n in names
        }
        # The pipeline as the encoders' host: its encode_prompt is the one the pipeline runs.
        if self.family == "sd3":
            self.pipe = diffusers.StableDiffusion3Pipeline(
                transformer=None,
                scheduler=None,
                vae=None,
                text_encoder=parts["clip"][0],
                tokenizer=parts["clip"][1],
                text_encoder_2=parts["clip_2"][0],
                tokenizer_2=parts["clip_2"][1],
                text_encoder_3=parts["t5"][0],
                tokenizer_3=parts["t5"][1],
            )
            self.t5_tokens = self.max_tokens - int(self.pipe.tokenizer_max_length)
            if self.t5_tokens < 1:
                raise ConfigError(
                    f"max_text_tokens = {self.max_tokens} leaves T5 no tokens after the CLIPs' "
                    f"{self.pipe.tokenizer_max_length}; raise it (SD3: 77 + 256 = 333)"
                )
        else:
            self.pipe = diffusers.FluxPipeline(
                scheduler=None,
                vae=None,
                text_encoder=parts["clip"][0],
                tokenizer=parts["clip"][1],
                text_encoder_2=parts["t5"][0],
                tokenizer_2=parts["t5"][1],
                transformer=None,
            )

    def encode(self, prompts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each prompt's (sequence (T, D), pooled (P,)) embeddings, as float32 arrays."""
        with torch.inference_mode():
            if self.family == "sd3":
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    list(prompts),
                    None,
                    None,
                    device=self.device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.t5_tokens,
                )
            else:
                embeds, pooled, _ = self.pipe.encode_prompt(
                    list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_tokens
                )
        e, p = embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
        return [(e[i], p[i]) for i in range(len(prompts))]
