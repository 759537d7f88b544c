"""A DiT-style reference transformer whose attention is ``fa3trt.attention`` (``fa3trt.attention.op``).

``build_model(config, weights)`` returns an ``nn.Module`` taking ``(x, seq_lens)`` with x of
shape (B, S, hidden) and seq_lens int32 (B,); rows past a sequence's length come back zero.
``reference_signature(config)`` describes it as every served model is described: ``x`` (S,
hidden) in, ``y`` (S, hidden) out, ``seq_lens`` made by the server, requests of different
lengths padded into one batch.
Weights come from a safetensors file or a seeded init made on the CPU in float32, so the same
seed gives the same weights on every device and backend.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fa3trt._hashing import spec_hash
from fa3trt.attention.kernels.base import dense_batch
from fa3trt.attention.op import MODE_FP8, MODE_NATIVE, attention
from fa3trt.attention.rules import values_hidden
from fa3trt.errors import ConfigError, InvalidInputError
from fa3trt.signature import Signature, TensorSpec
from fa3trt.transfer import to_device

__all__ = ["ModelConfig", "Transformer", "build_model", "save_weights", "reference_signature", "PRESETS"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the reference transformer."""

    hidden: int = 256
    """Model width D; requests are (S, hidden) arrays."""
    heads: int = 4
    """Attention heads; hidden must be divisible by heads."""
    layers: int = 2
    """Transformer blocks."""
    mlp_ratio: int = 4
    """MLP width = mlp_ratio * hidden."""
    attn_mode: int = MODE_NATIVE
    """0 = attention in the model dtype, 1 = FP8 attention."""
    dtype: str = "float32"
    """Weights and activations: float32, float16 or bfloat16."""
    seed: int = 0
    """Seed of the init when no weights file is given."""
    name: str = field(default="custom", compare=True)
    """Preset name, for logs and /v1/info."""

    def __post_init__(self) -> None:
        for f in ("hidden", "heads", "layers", "mlp_ratio"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ConfigError(f"ModelConfig.{f} must be an integer >= 1, got {getattr(self, f)!r}")
        if self.hidden % self.heads:
            raise ConfigError(
                f"ModelConfig.hidden={self.hidden} is not divisible by heads={self.heads}; "
                "choose heads that divide hidden"
            )
        if self.dtype not in _DTYPES:
            raise ConfigError(f"ModelConfig.dtype={self.dtype!r}; use one of {sorted(_DTYPES)}")
        if self.attn_mode not in (MODE_NATIVE, MODE_FP8):
            raise ConfigError(f"ModelConfig.attn_mode={self.attn_mode!r}; use 0 (native) or 1 (FP8)")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """``tiny`` (CPU: 256 wide, 4 heads, 2 layers) or ``seed`` (4096 wide, 32 heads of 128, bf16)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compute_hash(self) -> str:
        """Hash of everything that changes the model's graph or numerics (``name`` is ignored)."""
        d = self.to_dict()
        d.pop("name")
        return spec_hash(d, 16)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden=256, heads=4, layers=2, dtype="float32", name="tiny"),
    "seed": ModelConfig(hidden=4096, heads=32, layers=2, dtype="bfloat16", name="seed"),
}


class Block(nn.Module):
    """norm -> QKV -> attention -> out proj -> residual; norm -> MLP (GELU) -> residual."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.norm1 = nn.LayerNorm(d, elementwise_affine=True)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=True)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        b, s, _ = x.shape
        h, hd = self.cfg.heads, self.cfg.head_dim
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, h, hd).unbind(2)
        a = attention(q, k, v, seq_lens, self.cfg.attn_mode)
        x = x + self.proj(a.reshape(b, s, h * hd))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Transformer(nn.Module):
    """The block stack. ``forward(x, seq_lens)``; padded rows of the output are zero."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)

    def forward(self, x: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.cfg.hidden:
            raise InvalidInputError(f"x must have shape (batch, seq, {self.cfg.hidden}), got {tuple(x.shape)}")
        b, s, _ = x.shape
        for blk in self.blocks:
            x = blk(x, seq_lens)
        # Every sequence fills the batch (host lengths, read without a sync; a trace keeps the mask).
        if seq_lens is None or (not values_hidden(seq_lens) and dense_batch(seq_lens, s)):
            return self.norm(x)
        keep = torch.arange(s, device=x.device)[None, :] < to_device(seq_lens, x.device)[:, None]
        return self.norm(x) * keep[:, :, None].to(x.dtype)


def _seeded_init(model: Transformer, seed: int) -> None:
    # Drawn on the CPU in float32 in a fixed order: identical on every machine and device.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.dim() == 1:  # LayerNorm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.02)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def build_model(
    config: ModelConfig, weights: str | os.PathLike[str] | None = None, device: torch.device | str = "cpu"
) -> Transformer:
    """The reference model in eval mode on ``device`` in ``config.dtype``.

    ``weights``: a safetensors file saved by ``save_weights`` (or any file with the same names
    and shapes); None uses the seeded init.
    """
    model = Transformer(config)
    if weights is None:
        _seeded_init(model, config.seed)
    else:
        from safetensors.torch import load_file

        state = load_file(os.fspath(weights))
        expected = dict(model.state_dict())
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                f"weights file {os.fspath(weights)!r} does not match ModelConfig({config.name}): "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}; check hidden/heads/layers"
            )
        for name, t in state.items():
            if t.shape != expected[name].shape:
                raise ConfigError(
                    f"weights file {os.fspath(weights)!r}: {name} has shape {tuple(t.shape)}, "
                    f"the config needs {tuple(expected[name].shape)}"
                )
        model.load_state_dict({k: t.float() for k, t in state.items()})
    return model.to(device=device, dtype=config.torch_dtype).eval().requires_grad_(False)


def save_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's weights as safetensors (never pickle)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, os.fspath(path))


def reference_signature(cfg: ModelConfig) -> Signature:
    """The reference model as a served signature: ``x`` (S, hidden) in, ``y`` (S, hidden) out,
    ``seq_lens`` made by the server, requests of different lengths padded into one batch."""
    x = TensorSpec("x", cfg.dtype, ("S", cfg.hidden))
    lens = TensorSpec("seq_lens", "int32", (), fill="lengths")
    return Signature((x, lens), TensorSpec("y", cfg.dtype, ("S", cfg.hidden)), "S", {}, "pad")
