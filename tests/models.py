"""Tiny third-party models for the CPU tests: diffusers' FLUX transformer and transformers' BERT,
random weights from a fixed seed (the same configs as examples/serve_flux.yaml and serve_bert.yaml)."""

from __future__ import annotations

from typing import Any

import numpy as np
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


# The generation app's tiny transformer (examples/generate_flux.yaml): FLUX.1-dev-style, with the
# distilled guidance embedding, and FLUX.1-dev's scheduler.
FLUX_GEN_CONFIG = {
    **FLUX_CONFIG,
    "axes_dims_rope": [4, 6, 6],
    "num_layers": 2,
    "num_single_layers": 2,
    "guidance_embeds": True,
}
FLUX_DEV_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def field_tensor(
    fields: dict[str, Any], name: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """A request field as a pipeline takes it: a batch of one, on ``device`` in ``dtype`` (None if absent)."""
    if name not in fields:
        return None
    return torch.from_numpy(np.asarray(fields[name], np.float32))[None].to(device, dtype)


def flux_pipeline_latents(
    transformer: torch.nn.Module,
    fields: dict[str, Any],
    vae: torch.nn.Module | None = None,
    text: dict[str, Any] | None = None,
) -> np.ndarray:
    """The final packed latents (S, C) diffusers' ``FluxPipeline`` gives for a generation request's
    fields (eager ``transformer``, ``output_type="latent"``; the embeddings in the transformer's
    dtype on its device): the reference of the generation app. With ``vae``, the image it decodes
    (``output_type="pil"``) as an (H, W, 3) uint8 array. With ``text`` (``tiny_text_encoders``),
    a ``prompt`` is encoded by the pipeline itself (T5 padded to ``max_sequence_length``)."""
    diffusers = pytest.importorskip("diffusers")

    param = next(transformer.parameters())

    def tensor(name: str) -> torch.Tensor | None:
        return field_tensor(fields, name, param.device, param.dtype)

    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=(text or {}).get("clip"),
        tokenizer=(text or {}).get("clip_tokenizer"),
        text_encoder_2=(text or {}).get("t5"),
        tokenizer_2=(text or {}).get("t5_tokenizer"),
        transformer=transformer,
    )
    cfg = {"true_cfg_scale": fields.get("true_cfg_scale", 1.0)}
    return run_pipeline(pipe, fields, tensor, text, vae, guidance_scale=fields.get("guidance_scale", 3.5), **cfg)


def run_pipeline(
    pipe: Any,
    fields: dict[str, Any],
    tensor: Any,
    text: dict[str, Any] | None,
    vae: torch.nn.Module | None,
    **extra: Any,
) -> np.ndarray:
    """A diffusers pipeline's answer to a generation request's fields (``tensor(name)``: a field
    as the pipeline takes it): its prompts or their embeddings, size, steps, seed or initial
    latents, and ``extra`` (guidance). The final latents (``output_type="latent"``), or with
    ``vae`` the decoded image as an (H, W, 3) uint8 array."""
    prompts = {k: fields[k] for k in ("prompt", "negative_prompt") if k in fields}
    if prompts:
        prompts["max_sequence_length"] = (text or {})["max_sequence_length"]
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        out = pipe(
            **prompts,
            **extra,
            prompt_embeds=tensor("prompt_embeds"),
            pooled_prompt_embeds=tensor("pooled_prompt_embeds"),
            negative_prompt_embeds=tensor("negative_prompt_embeds"),
            negative_pooled_prompt_embeds=tensor("negative_pooled_prompt_embeds"),
            height=fields["height"],
            width=fields["width"],
            num_inference_steps=fields["steps"],
            generator=torch.Generator("cpu").manual_seed(fields.get("seed", 0)),
            latents=tensor("latents"),
            output_type="latent" if vae is None else "pil",
        )
    return np.asarray(out.images[0]) if vae is not None else out.images[0].float().cpu().numpy()


def tiny_flux_gen(seed: int = 0) -> torch.nn.Module:
    """The generation app's tiny transformer as diffusers builds it, unrouted (``seed`` as the config's)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel.from_config(FLUX_GEN_CONFIG).eval()


# The generation app's tiny VAE (examples/generate_flux.yaml): 2 latent channels (the transformer
# packs 4 x 2), 4 blocks (8 pixels per latent), FLUX.1's scaling and shift.
FLUX_GEN_VAE_CONFIG = {
    "block_out_channels": [8, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 2,
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def tiny_vae(seed: int = 0) -> torch.nn.Module:
    """The generation app's tiny VAE as diffusers builds it (``seed`` as the config's)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL.from_config(FLUX_GEN_VAE_CONFIG).eval()


# The SD3 generation app's tiny transformer and VAE (examples/generate_sd3.yaml): 4 latent
# channels, patch size 2, 8 pixels per latent; SD3's scheduler shift, scaling and shift factors.
SD3_GEN_CONFIG = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 24,
    "pos_embed_max_size": 32,
}
SD3_VAE_CONFIG = {**FLUX_GEN_VAE_CONFIG, "latent_channels": 4, "scaling_factor": 1.5305, "shift_factor": 0.0609}
SD3_SCHEDULER = {"shift": 3.0}


def tiny_sd3_gen(seed: int = 0) -> torch.nn.Module:
    """The SD3 generation app's tiny transformer as diffusers builds it, unrouted."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel.from_config(SD3_GEN_CONFIG).eval()


def tiny_sd3_vae(seed: int = 0) -> torch.nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL.from_config(SD3_VAE_CONFIG).eval()


def sd3_fields(h: int, w: int, steps: int, seed: int, guided: bool = True, **extra: Any) -> dict[str, Any]:
    """A tiny SD3 generation request: random prompt embeddings from ``seed``, and under guidance
    (``guided``, SD3's default 7) random negative ones; unguided, ``guidance_scale`` 1 (one row)."""
    rng = np.random.default_rng(300 + seed)
    out: dict[str, Any] = {
        "prompt_embeds": rng.standard_normal((8, 32)).astype(np.float32),
        "pooled_prompt_embeds": rng.standard_normal(24).astype(np.float32),
        "height": h,
        "width": w,
        "steps": steps,
        "seed": seed,
    }
    if guided:
        out["negative_prompt_embeds"] = rng.standard_normal((8, 32)).astype(np.float32)
        out["negative_pooled_prompt_embeds"] = rng.standard_normal(24).astype(np.float32)
    else:
        out["guidance_scale"] = 1.0
    return out | extra


def sd3_pipeline_latents(
    fields: dict[str, Any], vae: torch.nn.Module | None = None, text: dict[str, Any] | None = None
) -> np.ndarray:
    """The final latents (C, h, w) diffusers' ``StableDiffusion3Pipeline`` gives for a request's
    fields on the eager tiny SD3 transformer (``output_type="latent"``); with ``vae``, its image as
    an (H, W, 3) uint8 array; with ``text`` (``tiny_sd3_text_encoders``), a ``prompt`` (and
    ``negative_prompt``) encoded by the pipeline itself."""
    diffusers = pytest.importorskip("diffusers")
    text = text or {}

    def tensor(name: str) -> torch.Tensor | None:
        return field_tensor(fields, name)

    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_gen(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER),
        vae=vae,
        text_encoder=text.get("clip"),
        tokenizer=text.get("clip_tokenizer"),
        text_encoder_2=text.get("clip_2"),
        tokenizer_2=text.get("clip_tokenizer"),
        text_encoder_3=text.get("t5"),
        tokenizer_3=text.get("t5_tokenizer"),
    )
    return run_pipeline(pipe, fields, tensor, text, vae, guidance_scale=fields.get("guidance_scale", 7.0))


# The generation app's tiny text encoders (examples/generate_flux.yaml) and their tokenizers
# (examples/tokenizers/): CLIP's pooled width and T5's width are the tiny transformer's.
CLIP_CONFIG = {
    "vocab_size": 54,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 16,
    "bos_token_id": 52,
    "eos_token_id": 53,
    "pad_token_id": 53,
}
T5_CONFIG = {
    "vocab_size": 38,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 64,
    "num_layers": 1,
    "num_heads": 2,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def tiny_text_encoders(tokenizers: str, max_sequence_length: int, seed: int = 0) -> dict[str, Any]:
    """The tiny CLIP and T5 encoders as transformers builds them (``seed`` as the config's), their
    tokenizers from ``tokenizers``/clip and /t5, for ``flux_pipeline_latents(text=...)``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIG)).eval()
    torch.manual_seed(seed)
    t5 = transformers.T5EncoderModel(transformers.T5Config(**T5_CONFIG)).eval()
    return {
        "clip": clip,
        "clip_tokenizer": transformers.AutoTokenizer.from_pretrained(f"{tokenizers}/clip"),
        "t5": t5,
        "t5_tokenizer": transformers.AutoTokenizer.from_pretrained(f"{tokenizers}/t5"),
        "max_sequence_length": max_sequence_length,
    }


# SD3's tiny text encoders (examples/generate_sd3.yaml): two CLIPs with projections (12 + 12: the
# tiny SD3's pooled width 24; hidden 16 + 16 padded to T5's 32) and FLUX's tiny T5; the CLIP
# tokenizer serves both CLIPs.
SD3_CLIP_CONFIG = {**CLIP_CONFIG, "hidden_size": 16, "intermediate_size": 32, "projection_dim": 12}
SD3_CLIP_2_CONFIG = {**SD3_CLIP_CONFIG, "num_hidden_layers": 2}


def tiny_sd3_text_encoders(tokenizers: str, max_sequence_length: int, seed: int = 0) -> dict[str, Any]:
    """SD3's tiny encoders as transformers builds them (``seed`` as the config's), for
    ``sd3_pipeline_latents(text=...)``."""
    transformers = pytest.importorskip("transformers")
    made = {}
    for name, cls, cfg in (
        ("clip", "CLIPTextModelWithProjection", SD3_CLIP_CONFIG),
        ("clip_2", "CLIPTextModelWithProjection", SD3_CLIP_2_CONFIG),
        ("t5", "T5EncoderModel", T5_CONFIG),
    ):
        model_cls = getattr(transformers, cls)
        torch.manual_seed(seed)
        made[name] = model_cls(model_cls.config_class(**cfg)).eval()
    return made | {
        "clip_tokenizer": transformers.AutoTokenizer.from_pretrained(f"{tokenizers}/clip"),
        "t5_tokenizer": transformers.AutoTokenizer.from_pretrained(f"{tokenizers}/t5"),
        "max_sequence_length": max_sequence_length,
    }
