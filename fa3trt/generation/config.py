"""The generation app's arguments (``args:`` of an application with ``import_path:
deploy.generation:build_app``).

Contract: validated with pydantic; unknown keys are refused; every field has a bound and a
description. The transformer is a diffusers DiT named as any model source is (class and config,
or a local folder), without inputs: its family's adapter (``fa3trt.generation.family``: FLUX or SD3, by class) declares
them, so the transformer runs through the same backends as any served model (torch under
routing, CUDA graphs, ``torch.compile``, or its TensorRT engine). The scheduler is a diffusers
scheduler class and its config (flow-matching Euler with the family's shift by default). The VAE,
when given, decodes a request's latents to a PNG in its own deployment; the text encoders, when
given, turn a request's prompt into its embeddings in theirs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fa3trt import defaults
from fa3trt.buckets import Buckets
from fa3trt.errors import ConfigError

__all__ = [
    "TransformerArgs",
    "VaeArgs",
    "TextEncoderArgs",
    "TextEncodersArgs",
    "SchedulerArgs",
    "GenerationArgs",
    "GENERATION_IMPORT_PATH",
    "FLUX_SCHEDULER",
]

GENERATION_IMPORT_PATH = "deploy.generation:build_app"

FLUX_SCHEDULER: dict[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1-dev's flow-matching Euler scheduler config (the FLUX family's default)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransformerArgs(_Strict):
    """The denoising transformer: a diffusers class from a config or a local folder."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: Literal["diffusers"] = Field("diffusers", description="Where the transformer comes from.")
    class_name: str = Field("FluxTransformer2DModel", alias="class", description="The diffusers transformer class.")
    config: dict[str, Any] | None = Field(
        None, description="The class's config (random weights from seed, or weights=)."
    )
    path: str | None = Field(None, description="A local from_pretrained folder of the transformer instead of config.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="The transformer's dtype.")
    routing: Literal["auto", "sdpa", "off"] = Field("auto", description="How its attention reaches the op.")
    seed: int = Field(defaults.SEED, ge=0, description="Seed of the random init when no weights are given.")
    weights: str | None = Field(None, description="Safetensors file of the transformer's state dict.")

    @model_validator(mode="after")
    def _config_or_path(self) -> TransformerArgs:
        if (self.config is None) == (self.path is None):
            raise ValueError("transformer needs exactly one of transformer.config and transformer.path")
        return self


class VaeArgs(_Strict):
    """The image decoder: a diffusers autoencoder from a config or a local folder, served as its
    own deployment (one replica per transformer replica, sharing its GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_name: str = Field("AutoencoderKL", alias="class", description="The diffusers autoencoder class.")
    config: dict[str, Any] | None = Field(
        None, description="The class's config (random weights from seed, or weights=)."
    )
    path: str | None = Field(None, description="A local from_pretrained folder of the VAE instead of config.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="The VAE's dtype.")
    seed: int = Field(defaults.SEED, ge=0, description="Seed of the random init when no weights are given.")
    weights: str | None = Field(None, description="Safetensors file of the VAE's state dict.")
    gpu_share: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="On GPUs: the share of a GPU each VAE replica takes (the transformer the rest).",
    )

    @model_validator(mode="after")
    def _config_or_path(self) -> VaeArgs:
        if (self.config is None) == (self.path is None):
            raise ValueError("vae needs exactly one of vae.config and vae.path")
        return self


class TextEncoderArgs(_Strict):
    """One text encoder: a transformers class from a config or a local folder, and its tokenizer."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_name: str = Field(alias="class", description="The transformers class (CLIPTextModel, T5EncoderModel).")
    config: dict[str, Any] | None = Field(None, description="The class's config (random weights from seed).")
    path: str | None = Field(None, description="A local from_pretrained folder of the encoder instead of config.")
    tokenizer: str = Field(min_length=1, description="A local folder of its tokenizer (AutoTokenizer.from_pretrained).")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="The encoder's dtype.")
    seed: int = Field(defaults.SEED, ge=0, description="Seed of the random init when no folder is given.")

    @model_validator(mode="after")
    def _config_or_path(self) -> TextEncoderArgs:
        if (self.config is None) == (self.path is None):
            raise ValueError(f"text encoder {self.class_name} needs exactly one of config and path")
        return self


class TextEncodersArgs(_Strict):
    """The family's text encoders (as its pipeline uses them: FLUX's CLIP and T5, SD3's two CLIPs
    and T5), served as their own deployment: with them a request may send ``prompt`` instead of
    its embeddings."""

    clip: TextEncoderArgs = Field(
        description="The first CLIP (FLUX: CLIPTextModel, text_encoder/; SD3: CLIPTextModelWithProjection, text_encoder/)."
    )
    clip_2: TextEncoderArgs | None = Field(
        None, description="SD3's second CLIP (CLIPTextModelWithProjection, text_encoder_2/); FLUX has none."
    )
    t5: TextEncoderArgs = Field(
        description="The sequence's T5 encoder (T5EncoderModel; FLUX: text_encoder_2/, SD3: text_encoder_3/)."
    )
    gpu_share: float = Field(
        0.25, gt=0.0, lt=1.0, description="On GPUs: the share of a GPU each text-encoder replica takes."
    )


class SchedulerArgs(_Strict):
    """The sampler: a diffusers scheduler class and its config, one instance per request."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    class_name: str = Field(
        "FlowMatchEulerDiscreteScheduler", alias="class", description="A diffusers scheduler class."
    )
    config: dict[str, Any] | None = Field(
        None, description="Its config (default: the family's: FLUX.1-dev's dynamic shift, SD3's shift 3)."
    )


class GenerationArgs(_Strict):
    """Everything the generation app takes."""

    transformer: TransformerArgs
    scheduler: SchedulerArgs = Field(default_factory=lambda: SchedulerArgs())
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=100.0,
        description="The guidance a request gets when it names none (default: the family's: FLUX.1-dev 3.5, SD3 7).",
    )
    vae: VaeArgs | None = Field(None, description="The image decoder: with it a request may ask for output 'png'.")
    text_encoders: TextEncodersArgs | None = Field(
        None, description="The text encoders: with them a request may send prompt (T5 padded to max_text_tokens)."
    )
    vae_scale_factor: int = Field(
        8, ge=1, le=64, description="Pixels per latent along each side (the VAE's; checked against vae when given)."
    )
    buckets: list[int] = Field(
        default_factory=lambda: [256, 1024, 4096],
        min_length=1,
        max_length=64,
        description="Ascending edges of the image-token count: one batch shape family and one TensorRT profile each.",
    )
    max_text_tokens: int = Field(512, ge=1, le=4096, description="The longest prompt embedding a request may carry.")
    max_steps: int = Field(100, ge=1, le=10000, description="The most denoising steps a request may ask for.")
    max_batch_rows: int = Field(8, ge=1, le=1024, description="Rows per transformer pass (a true-CFG request takes 2).")
    policy: Literal["edf", "fifo"] = Field(
        "edf", description="edf: earliest deadline first, preempting at step boundaries; fifo: arrival order."
    )
    backend: Literal["auto", "tensorrt", "torch"] = Field("auto", description="As the serving app's.")
    store: str = Field(defaults.STORE, min_length=1, description="Artifact store for the transformer's engines.")
    build_if_missing: bool = Field(defaults.BUILD_IF_MISSING, description="Build this GPU's engine at start.")
    cuda_graphs: bool = Field(defaults.CUDA_GRAPHS, description="Torch backend: each step's batch as a CUDA graph.")
    compile: bool = Field(defaults.COMPILE, description="Torch backend: the transformer under torch.compile.")
    replicas: int | Literal["auto"] = Field(
        defaults.REPLICAS, description="auto: one per GPU (one CPU replica without)."
    )
    max_queued_requests: int = Field(defaults.MAX_QUEUED_REQUESTS, ge=1, le=1 << 20, description="Serve's queue limit.")
    max_body_bytes: int = Field(defaults.MAX_BODY_BYTES, ge=1024, le=1 << 32, description="Largest HTTP body.")
    request_timeout_s: float = Field(600.0, gt=0, le=86400, description="Longest time a generation may take.")

    @field_validator("buckets")
    @classmethod
    def _buckets_valid(cls, v: list[int]) -> list[int]:
        try:
            Buckets(tuple(v))
        except ConfigError as e:
            raise ValueError(str(e)) from e
        return v

    @model_validator(mode="after")
    def _shares_fit(self) -> GenerationArgs:
        shares = sum(p.gpu_share for p in (self.vae, self.text_encoders) if p is not None)
        if shares >= 0.9:
            raise ValueError(
                f"vae.gpu_share + text_encoders.gpu_share = {shares:g} leaves the transformer under 0.1 of its GPU; "
                "lower them"
            )
        return self

    @field_validator("replicas")
    @classmethod
    def _replicas_positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"replicas must be 'auto' or an integer >= 1, got {v}")
        return v

    def bucket_set(self) -> Buckets:
        return Buckets(tuple(self.buckets))
