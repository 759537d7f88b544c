"""``model:`` of the app config: where a served model comes from, and what it takes and gives.

Contract: every source is one pydantic spec with one interface, so the export, the build, the
backends and the replica never ask which kind of model they hold:

- ``signature()``: the model's ``Signature`` (named inputs and axes, one output, the bucketed
  axis, ranges, steps, batching);
- ``model_dtype``, ``routing`` (how attention reaches the op: ``off`` for a model that calls
  ``fa3trt.attention`` itself), ``select`` (what of its return value is the answer), ``seed``,
  ``weights``, ``describe()``.

Sources: ``fa3trt`` (the reference transformer's presets, the default), ``diffusers`` and
``transformers`` (a class of the package from a config or a local ``from_pretrained`` folder),
``python`` (``package.module:factory``). Unknown keys are refused; a key that does not apply to
the source is an error naming it. For a diffusers model with a ``patch_size`` the spatial axes of
``hidden_states`` (its last two) must be multiples of it unless ``axis_multiples`` says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from fa3trt import defaults
from fa3trt.errors import ConfigError
from fa3trt.models.reference import ModelConfig, reference_signature
from fa3trt.signature import Signature, TensorSpec

__all__ = ["ReferenceSpec", "SourceSpec", "InputArgs", "OutputArgs", "AnyModelSpec"]

_FLOAT = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _weights_file(v: str | None) -> str | None:
    if v is not None and not Path(v).is_file():
        raise ValueError(f"model.weights {v!r} does not exist; give a safetensors file or omit it")
    return v


class ReferenceSpec(_Strict):
    """The reference transformer (``source: fa3trt``): one of its presets."""

    source: Literal["fa3trt"] = Field("fa3trt", description="The reference transformer of fa3trt.models.reference.")
    preset: Literal["tiny", "seed"] = Field(
        defaults.MODEL_PRESET, description="Model preset: tiny (CPU) or seed (4096 wide, 32 heads)."
    )
    layers: int | None = Field(None, ge=1, le=512, description="Override the preset's layer count.")
    dtype: _FLOAT | None = Field(None, description="Override the preset's dtype.")
    attn_mode: Literal[0, 1] = Field(
        defaults.ATTN_MODE, description="0: attention in the model dtype; 1: FP8 attention."
    )
    seed: int = Field(defaults.SEED, ge=0, description="Seed of the weight init when no weights file is given.")
    weights: str | None = Field(None, description="Safetensors weights file; default: seeded init.")

    _weights_exist = field_validator("weights")(_weights_file)

    def config(self) -> ModelConfig:
        overrides: dict[str, Any] = {"attn_mode": self.attn_mode, "seed": self.seed}
        if self.layers is not None:
            overrides["layers"] = self.layers
        if self.dtype is not None:
            overrides["dtype"] = self.dtype
        return ModelConfig.preset(self.preset, **overrides)

    def signature(self) -> Signature:
        return reference_signature(self.config())

    @property
    def model_dtype(self) -> str:
        return self.config().dtype

    @property
    def routing(self) -> Literal["off"]:
        """The reference model calls ``fa3trt.attention`` itself: nothing to route."""
        return "off"

    @property
    def select(self) -> int:
        return 0

    def describe(self) -> str:
        cfg = self.config()
        return f"fa3trt {cfg.name} ({cfg.layers} layers, {cfg.hidden} wide) {cfg.dtype}"


_DTYPE = Literal["float32", "float16", "bfloat16", "int64", "int32", "bool"]


class InputArgs(_Strict):
    """One named input of a model from ``source: diffusers | transformers | python``."""

    axes: list[str | int] = Field(
        description="Axes of one request's tensor, without the batch axis: a name for a dynamic axis (shared by every input that has it), an int for a fixed size."
    )
    dtype: _DTYPE | None = Field(
        None, description="The dtype the model takes; default: the model's dtype (keep positions in float32)."
    )
    batched: bool = Field(
        True,
        description="false: one tensor for the whole batch (FLUX's img_ids); requests batch only with equal copies.",
    )
    pad: float = Field(0.0, description="The value that pads the bucketed axis under batching: pad.")
    fill: Literal["lengths", "mask"] | None = Field(
        None,
        description="Made by the server from each request's bucketed length (never sent): lengths (B,) or a 0/1 mask.",
    )


class OutputArgs(_Strict):
    """The model output a request gets back."""

    name: str = Field("output", min_length=1, description="The answer's name (HTTP, handle, protocol).")
    select: str | int = Field(
        0,
        description="What of the model's return value: a key, an attribute (sample, last_hidden_state) or a position.",
    )
    axes: list[str | int] = Field(
        default_factory=list, description="Its axes without the batch axis; batching: pad cuts the bucketed one back."
    )
    dtype: _FLOAT = Field("float32", description="The answer's dtype.")


class SourceSpec(_Strict):
    """A user's model: a diffusers or transformers class, or a Python factory."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    source: Literal["diffusers", "transformers", "python"] = Field(description="Where the model comes from.")
    class_name: str | None = Field(
        None,
        alias="class",
        description="diffusers / transformers: the model class (FluxTransformer2DModel, BertModel).",
    )
    config: dict[str, Any] | None = Field(
        None, description="diffusers / transformers: the class's config (random weights from seed, or weights=)."
    )
    path: str | None = Field(None, description="diffusers / transformers: a local folder for from_pretrained.")
    factory: str | None = Field(
        None, description="python: 'package.module:function' returning the module (or (module, sample inputs))."
    )
    dtype: _FLOAT = Field("float32", description="The model's dtype.")
    routing: Literal["auto", "sdpa", "transformers", "off"] = Field(
        "auto", description="How attention reaches fa3trt.attention (fa3trt.route_attention); off: not routed."
    )
    attn_mode: Literal[0, 1] = Field(
        0, description="The routed attention calls' mode: 0 in the model dtype; 1 FP8 (e4m3) attention."
    )
    inputs: dict[str, InputArgs] = Field(min_length=1, description="The model's keyword inputs by name.")
    output: OutputArgs = Field(default_factory=lambda: OutputArgs())
    bucketed_axis: str = Field(description="The axis whose size picks the bucket (the sequence or token axis).")
    axis_ranges: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="[min, max] of every other named axis (TensorRT profiles, request checks); the bucketed axis may have one too, its max at least the largest bucket.",
    )
    axis_multiples: dict[str, int] = Field(
        default_factory=dict,
        description="The step an axis's sizes must be a multiple of (a DiT's patch size); diffusers models with a patch_size get it on hidden_states' last two axes by default.",
    )
    batching: Literal["pad", "shape"] = Field(
        "shape",
        description="pad: requests of different lengths share a batch, padded (exact only when every cross-token op is attention reading the lengths, e.g. an encoder with a padding mask); shape: only equal shapes batch together.",
    )
    seed: int = Field(defaults.SEED, ge=0, description="Seed of the random init when no weights are given.")
    weights: str | None = Field(None, description="Safetensors file of the model's state dict.")

    @model_validator(mode="after")
    def _keys_fit_source(self) -> SourceSpec:
        needs = {"diffusers": ("class_name",), "transformers": ("class_name",), "python": ("factory",)}[self.source]
        shown = {"class_name": "class"}
        for k in needs:
            if getattr(self, k) is None:
                raise ValueError(f"model.source {self.source} needs model.{shown.get(k, k)}")
        wrong = {
            "diffusers": ("factory",),
            "transformers": ("factory",),
            "python": ("class_name", "config", "path"),
        }[self.source]
        for k in wrong:
            if getattr(self, k) is not None:
                raise ValueError(f"model.{shown.get(k, k)} does not apply to source {self.source}; remove it")
        if self.attn_mode == 1 and self.routing == "off":
            raise ValueError("model.attn_mode 1 (FP8) applies to routed attention calls; set model.routing to auto")
        if self.source in ("diffusers", "transformers") and (self.config is None) == (self.path is None):
            raise ValueError(f"model.source {self.source} needs exactly one of model.config and model.path")
        _weights_file(self.weights)
        try:
            self.signature()
        except ConfigError as e:
            raise ValueError(f"model: {e}") from None
        return self

    @property
    def model_dtype(self) -> str:
        return self.dtype

    @property
    def select(self) -> str | int:
        return self.output.select

    def describe(self) -> str:
        """One line for logs and build plans: ``diffusers FluxTransformer2DModel bfloat16``."""
        return f"{self.source} {self.class_name or self.factory} {self.dtype}"

    def signature(self) -> Signature:
        ins = tuple(
            TensorSpec(n, a.dtype or self.dtype, tuple(a.axes), a.batched, a.pad, a.fill)
            for n, a in self.inputs.items()
        )
        out = TensorSpec(self.output.name, self.output.dtype, tuple(self.output.axes))
        steps = self.patch_steps() | dict(self.axis_multiples)
        return Signature(ins, out, self.bucketed_axis, dict(self.axis_ranges), self.batching, steps)

    def patch_steps(self) -> dict[str, int]:
        """A diffusers model's patch size on the named spatial axes of ``hidden_states`` (its last
        two; a video model's frame axis before them by ``patch_size_t``), read from its config
        without loading the model; empty for other sources or without a patch size."""
        if self.source != "diffusers" or "hidden_states" not in self.inputs:
            return {}
        config = self.config
        if config is None and self.path is not None:
            try:
                config = json.loads((Path(self.path) / "config.json").read_text())
            except (OSError, ValueError):
                return {}  # the source check says what is wrong with the folder
        axes = self.inputs["hidden_states"].axes
        patch, patch_t = (config or {}).get("patch_size"), (config or {}).get("patch_size_t")
        if not isinstance(patch, int) or patch < 2 or len(axes) < 3:
            return {}
        steps = {a: patch for a in axes[-2:] if isinstance(a, str)}
        if isinstance(patch_t, int) and patch_t > 1 and len(axes) >= 4 and isinstance(axes[-3], str):
            steps[axes[-3]] = patch_t
        return steps


def _model_source(v: Any) -> str:
    if isinstance(v, dict):
        return "fa3trt" if v.get("source", "fa3trt") == "fa3trt" else "external"
    return "fa3trt" if isinstance(v, ReferenceSpec) else "external"


AnyModelSpec = Annotated[
    Annotated[ReferenceSpec, Tag("fa3trt")] | Annotated[SourceSpec, Tag("external")], Discriminator(_model_source)
]
"""``model:`` of the app: the reference model (``source: fa3trt``, the default) or a user's."""
