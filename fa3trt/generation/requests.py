"""One generation request, checked before it is admitted: every bad field is an
``InvalidInputError`` naming the field and what to send instead.

Contract: ``parse_request(raw, limits)`` takes a mapping (JSON, an ``.npz`` body's arrays, or a
handle call's dict) and returns a ``GenerateRequest``. Sizes come as ``height`` and ``width`` in
pixels (multiples of the VAE's factor times the patch packing), or as ``tokens`` (a square image
of that many image tokens). The text comes as embeddings, or as ``prompt`` (and
``negative_prompt``) where the app has text encoders: such a request's embeddings are empty until
``encoded`` fills them. The noise comes from ``seed`` (one per request: its answer does not
depend on what it is batched with) or as ``latents`` themselves. ``deadline_ms`` is the time the
client gives the whole generation, from its arrival.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fa3trt.errors import InvalidInputError

__all__ = ["GenerateRequest", "Limits", "parse_request", "FIELDS"]

FIELDS = (
    "prompt",
    "negative_prompt",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "height",
    "width",
    "tokens",
    "steps",
    "guidance_scale",
    "true_cfg_scale",
    "seed",
    "latents",
    "deadline_ms",
    "output",
    "stream",
)
"""The fields a request may carry."""


@dataclass(frozen=True)
class Limits:
    """What the app takes: the text embedding's width and length, the pooled width, the size
    step in pixels, the largest image in tokens, the most steps, the latents' packed channels."""

    text_dim: int
    pooled_dim: int
    max_text_tokens: int
    pixel_step: int
    max_tokens: int
    max_steps: int
    channels: int
    default_guidance: float
    outputs: tuple[str, ...] = ("latents",)
    """What a request may ask for: ``latents``, and ``png`` where the app has a VAE."""
    prompts: bool = False
    """Whether a request may send ``prompt`` (the app has text encoders)."""
    spatial: bool = False
    """Whether ``latents`` are (channels, height / vae_scale_factor, width / vae_scale_factor), else packed
    (tokens, channels)."""
    vae_scale_factor: int = 8
    max_side: int | None = None
    """The longest side in pixels a request may ask for (None: any the token count allows)."""
    guidance_negative: bool = False
    """Whether ``guidance_scale`` > 1 guides with the negative prompt (then a request must carry one)."""


MAX_PROMPT_CHARS = 8192
EMBEDDINGS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


@dataclass
class GenerateRequest:
    """A checked request (arrays as float32; sizes in pixels)."""

    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt_embeds: np.ndarray | None = None
    negative_pooled_prompt_embeds: np.ndarray | None = None
    true_cfg_scale: float = 1.0
    latents: np.ndarray | None = None
    deadline_ms: float | None = None
    output: str = "latents"
    stream: bool = False
    prompt: str | None = None
    """Set where the request sent text: its embeddings are empty until ``encoded``."""
    negative_prompt: str | None = None

    @property
    def needs_encoding(self) -> bool:
        return self.prompt is not None and self.prompt_embeds.shape[0] == 0

    def encoded(
        self, positive: tuple[np.ndarray, np.ndarray], negative: tuple[np.ndarray, np.ndarray] | None
    ) -> GenerateRequest:
        """This request with its prompts' (sequence, pooled) embeddings."""
        return dataclasses.replace(
            self,
            prompt_embeds=positive[0],
            pooled_prompt_embeds=positive[1],
            negative_prompt_embeds=negative[0] if negative else None,
            negative_pooled_prompt_embeds=negative[1] if negative else None,
        )

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance with a negative prompt: two rows a step."""
        return self.true_cfg_scale > 1.0 and self.negative_prompt_embeds is not None


def _array(raw: Mapping[str, Any], name: str, shape: tuple[int | None, ...], want: str) -> np.ndarray:
    """``raw[name]`` as float32 of ``shape`` (None: any size along that axis; a leading batch of
    one is dropped), finite; ``want`` says what to send where the shape is not."""
    value = raw[name]
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{name} must be an array of numbers ({e})") from e
    if arr.ndim == len(shape) + 1 and arr.shape[0] == 1:  # a batch of one, as diffusers' pipelines take them
        arr = arr[0]
    if arr.ndim != len(shape) or any(n is not None and a != n for a, n in zip(arr.shape, shape)):
        raise InvalidInputError(f"{name} has shape {tuple(arr.shape)}; {want}")
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} holds NaN or Inf; send finite values")
    return arr


def _embeds(raw: Mapping[str, Any], name: str, width: int) -> np.ndarray:
    """A sequence (T, width) of embeddings."""
    return _array(raw, name, (None, width), f"it must be (T, {width})")


def _pooled(raw: Mapping[str, Any], name: str, width: int) -> np.ndarray:
    return _array(raw, name, (width,), f"it must be ({width})")


def _number(raw: Mapping[str, Any], name: str, kind: type, lo: float, hi: float, default: Any = None) -> Any:
    if name not in raw or raw[name] is None:
        if default is None:
            raise InvalidInputError(f"{name} is missing; send it")
        return default
    value = raw[name]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and float(value) != int(value)):
        raise InvalidInputError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if not (lo <= value <= hi) or (kind is float and not math.isfinite(value)):
        raise InvalidInputError(f"{name} = {value} is outside [{lo:g}, {hi:g}]")
    return value


def _size(raw: Mapping[str, Any], limits: Limits) -> tuple[int, int]:
    step = limits.pixel_step
    if "tokens" in raw and raw["tokens"] is not None:
        if "height" in raw or "width" in raw:
            raise InvalidInputError("send tokens, or height and width, not both")
        tokens = _number(raw, "tokens", int, 1, limits.max_tokens)
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise InvalidInputError(
                f"tokens = {tokens} is not a square (a square image); send {side * side} or height and width"
            )
        return side * step, side * step
    height = _number(raw, "height", int, step, 1 << 16)
    width = _number(raw, "width", int, step, 1 << 16)
    for name, value in (("height", height), ("width", width)):
        if limits.max_side is not None and value > limits.max_side:
            raise InvalidInputError(f"{name} = {value} is past the longest side this app takes ({limits.max_side})")
        if value % step:
            near = sorted({max(step, value // step * step), -(-value // step) * step})
            raise InvalidInputError(
                f"{name} = {value} is not a multiple of {step} (the VAE's factor times the patch size); "
                f"send {' or '.join(map(str, near))}"
            )
    tokens = (height // step) * (width // step)
    if tokens > limits.max_tokens:
        raise InvalidInputError(
            f"height x width = {height} x {width} is {tokens} image tokens, past the largest bucket ({limits.max_tokens})"
        )
    return height, width


def _text(raw: Mapping[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r:.80}")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInputError(f"{name} has {len(value)} characters; send at most {MAX_PROMPT_CHARS}")
    return value


def parse_request(raw: Any, limits: Limits) -> GenerateRequest:
    """``raw`` checked field by field (see the module docstring)."""
    if not isinstance(raw, Mapping):
        raise InvalidInputError(f"a generation request is a mapping of field -> value, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidInputError(f"unknown fields {unknown}; a request may carry {list(FIELDS)}")
    prompt, negative = _text(raw, "prompt"), _text(raw, "negative_prompt")
    if prompt is not None or negative is not None:
        if not limits.prompts:
            raise InvalidInputError(
                "prompt needs a text encoder, which this app has none of; send prompt_embeds and pooled_prompt_embeds"
            )
        if prompt is None:
            raise InvalidInputError("negative_prompt needs prompt; send both")
        given = [n for n in EMBEDDINGS if n in raw]
        if given:
            raise InvalidInputError(f"send prompt or {given[0]}, not both")
        embeds, pooled = np.zeros((0, limits.text_dim), np.float32), np.zeros(limits.pooled_dim, np.float32)
    else:
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            if name not in raw:
                alt = "prompt, or " if limits.prompts else ""
                raise InvalidInputError(f"{name} is missing; send {alt}prompt_embeds and pooled_prompt_embeds")
        embeds = _embeds(raw, "prompt_embeds", limits.text_dim)
        if not 1 <= embeds.shape[0] <= limits.max_text_tokens:
            raise InvalidInputError(f"prompt_embeds has {embeds.shape[0]} tokens; send 1 to {limits.max_text_tokens}")
        pooled = _pooled(raw, "pooled_prompt_embeds", limits.pooled_dim)
    height, width = _size(raw, limits)
    req = GenerateRequest(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        height=height,
        width=width,
        steps=_number(raw, "steps", int, 1, limits.max_steps, 28),
        guidance_scale=_number(raw, "guidance_scale", float, 0.0, 100.0, limits.default_guidance),
        true_cfg_scale=_number(raw, "true_cfg_scale", float, 1.0, 100.0, 1.0),
        seed=_number(raw, "seed", int, 0, 2**63 - 1, 0),
        deadline_ms=_number(raw, "deadline_ms", float, 1.0, 8.64e7, math.inf),
        output=str(raw.get("output", "latents")),
        prompt=prompt,
        negative_prompt=negative,
        stream=bool(raw.get("stream", False)),
    )
    if req.deadline_ms == math.inf:
        req.deadline_ms = None
    if req.output not in limits.outputs:
        why = "this app has no VAE" if req.output == "png" else "unknown output"
        raise InvalidInputError(f"output {req.output!r} is not offered ({why}); send one of {list(limits.outputs)}")
    negatives = [n for n in ("negative_prompt_embeds", "negative_pooled_prompt_embeds") if n in raw]
    if negatives:
        if len(negatives) != 2:
            raise InvalidInputError("send both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
        req.negative_prompt_embeds = _embeds(raw, "negative_prompt_embeds", limits.text_dim)
        req.negative_pooled_prompt_embeds = _pooled(raw, "negative_pooled_prompt_embeds", limits.pooled_dim)
        if req.negative_prompt_embeds.shape != embeds.shape:
            raise InvalidInputError(
                f"negative_prompt_embeds has shape {req.negative_prompt_embeds.shape}; it must be prompt_embeds' {embeds.shape}"
            )
    if limits.guidance_negative and req.guidance_scale > 1.0:
        if req.true_cfg_scale != 1.0:
            raise InvalidInputError("true_cfg_scale: this model guides by guidance_scale; leave true_cfg_scale out")
        if req.negative_prompt_embeds is None and req.prompt is None:
            raise InvalidInputError(
                f"guidance_scale = {req.guidance_scale:g} guides with a negative prompt: send negative_prompt_embeds "
                "and negative_pooled_prompt_embeds (zeros for an empty prompt), or guidance_scale 1"
            )
    if "latents" in raw:
        req.latents = _latents(raw, limits, height, width)
    return req


def _latents(raw: Mapping[str, Any], limits: Limits, height: int, width: int) -> np.ndarray:
    if limits.spatial:
        want = (limits.channels, height // limits.vae_scale_factor, width // limits.vae_scale_factor)
        return _array(raw, "latents", want, f"height x width = {height} x {width} makes latents of shape {want}")
    tokens = (height // limits.pixel_step) * (width // limits.pixel_step)
    arr = _array(raw, "latents", (None, limits.channels), f"it must be (S, {limits.channels})")
    if arr.shape[0] != tokens:
        raise InvalidInputError(
            f"latents has {arr.shape[0]} tokens; height x width = {height} x {width} makes {tokens} "
            f"(packed latents of shape ({tokens}, {limits.channels}))"
        )
    return arr
