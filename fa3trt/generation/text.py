"""Prompts to FLUX's embeddings, as diffusers' ``FluxPipeline`` encodes them.

Contract: ``text_configs(args, family)`` reads both encoders' configs (inline, or each folder's
``config.json``) and checks them against the transformer: CLIP's width is the pooled projection's,
T5's the joint attention's; each mismatch is a ``ConfigError`` naming the fix (the app builder's
check). ``PromptEncoder(args, device)`` loads the encoders (transformers classes from a config
with random weights from ``seed``, or local folders) and their tokenizers, and ``encode(prompts)``
returns, per prompt, its T5 sequence padded to ``max_text_tokens`` (T, D) and its CLIP pooled
embedding (P,), as float32 arrays: the pipeline's own ``encode_prompt`` runs them, so truncation,
padding and pooling are the pipeline's.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fa3trt.errors import ConfigError
from fa3trt.generation.config import GenerationArgs, TextEncoderArgs
from fa3trt.generation.family import Family, family_for
from fa3trt.generation.parts import load_part, part_config

__all__ = ["PromptEncoder", "text_configs"]


def text_configs(args: GenerationArgs, family: Family) -> tuple[dict[str, Any], dict[str, Any]]:
    """Both encoders' configs, checked against the transformer (see the module docstring)."""
    if args.text_encoders is None:
        raise ConfigError("the generation app has no text_encoders: add text_encoders: {clip: ..., t5: ...}")
    enc = args.text_encoders
    clip = part_config(enc.clip.config, enc.clip.path, "text_encoders.clip")
    t5 = part_config(enc.t5.config, enc.t5.path, "text_encoders.t5")
    width = clip.get("hidden_size", clip.get("text_config", {}).get("hidden_size"))
    if width != family.pooled_dim:
        raise ConfigError(
            f"text_encoders.clip: hidden_size {width} is not the transformer's pooled_projection_dim {family.pooled_dim}"
        )
    if t5.get("d_model") != family.text_dim:
        raise ConfigError(
            f"text_encoders.t5: d_model {t5.get('d_model')} is not the transformer's joint_attention_dim {family.text_dim}"
        )
    for name in ("clip", "t5"):
        folder = Path(getattr(args.text_encoders, name).tokenizer)
        if not folder.is_dir():
            raise ConfigError(f"text_encoders.{name}.tokenizer: {folder} is not a folder; give its tokenizer's folder")
    return clip, t5


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
    """FLUX's text encoders on ``device`` (see the module docstring)."""

    def __init__(self, args: GenerationArgs, device: torch.device | str = "cpu") -> None:
        family = family_for(args)
        text_configs(args, family)
        assert args.text_encoders is not None
        self.device = torch.device(device)
        self.max_tokens = args.max_text_tokens
        transformers = importlib.import_module("transformers")
        diffusers = importlib.import_module("diffusers")
        enc = args.text_encoders
        tokenizers = [transformers.AutoTokenizer.from_pretrained(e.tokenizer) for e in (enc.clip, enc.t5)]
        # The pipeline as the encoders' host: its encode_prompt is the one FluxPipeline runs.
        self.pipe = diffusers.FluxPipeline(
            scheduler=None,
            vae=None,
            text_encoder=_load(enc.clip, "text_encoders.clip", self.device),
            tokenizer=tokenizers[0],
            text_encoder_2=_load(enc.t5, "text_encoders.t5", self.device),
            tokenizer_2=tokenizers[1],
            transformer=None,
        )

    def encode(self, prompts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each prompt's (sequence (T, D), pooled (P,)) embeddings, as float32 arrays."""
        with torch.inference_mode():
            embeds, pooled, _ = self.pipe.encode_prompt(
                list(prompts), prompt_2=None, device=self.device, max_sequence_length=self.max_tokens
            )
        e, p = embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
        return [(e[i], p[i]) for i in range(len(prompts))]
