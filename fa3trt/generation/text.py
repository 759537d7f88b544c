"""Prompts to a family's embeddings, as its diffusers pipeline encodes them.

Contract: ``text_configs(args, family)`` reads the encoders' configs (inline, or each folder's
``config.json``) and has the family check them against the transformer
(``Family.check_text_encoders``), each mismatch a ``ConfigError`` naming the fix (the app
builder's check); the family also gives the pipeline that hosts the encoders and its
``encode_prompt`` call (``text_pipeline``, ``encode_prompts``). FLUX (``FluxPipeline``): ``clip`` (CLIPTextModel) gives the
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

Configs = dict[str, dict[str, Any]]


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
    family.check_text_encoders(configs)
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
        self.family = family
        transformers = importlib.import_module("transformers")
        enc = args.text_encoders
        parts = {
            n: (
                _load(getattr(enc, n), f"text_encoders.{n}", self.device),
                transformers.AutoTokenizer.from_pretrained(getattr(enc, n).tokenizer),
            )
            for n in names
        }
        # The family's pipeline as the encoders' host: its encode_prompt is the one the pipeline runs.
        self.pipe = family.text_pipeline(parts, self.max_tokens)

    def encode(self, prompts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each prompt's (sequence (T, D), pooled (P,)) embeddings, as float32 arrays."""
        with torch.inference_mode():
            embeds, pooled = self.family.encode_prompts(self.pipe, list(prompts), self.device, self.max_tokens)
        e, p = embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
        return [(e[i], p[i]) for i in range(len(prompts))]
