"""Tiny third-party models for the CPU tests: diffusers' FLUX transformer and transformers' BERT,
random weights from a fixed seed (the same configs as examples/serve_flux.yaml and serve_bert.yaml)."""

from __future__ import annotations

import pytest
import torch

FLUX_CONFIG = {
    "patch_size": 1,
    "in_channels": 8,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
BERT_CONFIG = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}


def tiny_flux(double: int = 2, single: int = 2) -> torch.nn.Module:
    """``FluxTransformer2DModel`` with ``double`` joint and ``single`` single-stream blocks, in eval mode."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(num_layers=double, num_single_layers=single, **FLUX_CONFIG).eval()


def flux_inputs(b: int = 2, img: int = 16, txt: int = 8) -> dict[str, torch.Tensor]:
    """Random inputs of ``tiny_flux``: ``b`` images of ``img`` tokens with ``txt`` text tokens."""
    return {
        "hidden_states": torch.randn(b, img, 8),
        "encoder_hidden_states": torch.randn(b, txt, 32),
        "pooled_projections": torch.randn(b, 32),
        "timestep": torch.full((b,), 0.5),
        "img_ids": torch.randn(img, 3),
        "txt_ids": torch.zeros(txt, 3),
    }


def tiny_bert(max_positions: int = 32) -> torch.nn.Module:
    """``BertModel`` (2 layers, 32 wide) with ``max_positions`` positions, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(max_position_embeddings=max_positions, **BERT_CONFIG)).eval()
