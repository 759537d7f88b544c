"""Load a user's model from its source (``model:`` of the app config, ``fa3trt.config.SourceSpec``).

Contract:
- ``load_source(spec)`` returns a ``Loaded``: the module in eval mode in the spec's dtype on the
  CPU, frozen, its ``Signature``, and the factory's sample inputs where a ``python`` factory
  gave them (checked against the signature). Sources: ``diffusers`` / ``transformers`` (a class
  of the package by name, built from ``config`` or loaded from a local folder ``path``, never
  from the network) and ``python`` (``"package.module:function"`` returning the module, or
  ``(module, sample_inputs)``).
- Random weights come from ``seed`` in a forked RNG, on the CPU in float32, so every replica
  and every build worker makes the same model; ``weights`` (safetensors, never pickle) replace
  them and must name exactly the model's parameters.
- ``model_id(spec)`` digests everything that makes two models differ (source, class, config,
  the folder's files, factory, dtype, seed, weights file, signature): the artifact store keys
  ONNX files and engines by it.
- ``export_source`` exports it to ONNX with its attention routed, by its signature's names and
  axes; where an input is ``fill: mask`` (the server makes it: a key-padding prefix mask) the
  routing is told so (``key_padding_masks``), and the traced masks become key lengths.
  ``verify_source`` checks the file in ONNX Runtime against the eager unrouted model, with the
  filled inputs made from ragged lengths (padded masks), as the server makes them.
- A source that cannot be loaded is a ``ConfigError`` that names the key to fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fa3trt._hashing import spec_hash
from fa3trt.attention.routing import route_attention
from fa3trt.buckets import Buckets
from fa3trt.config import SourceSpec
from fa3trt.errors import ConfigError, MissingDependencyError
from fa3trt.onnx.check import verify_onnx
from fa3trt.onnx.export import ExportResult, export_onnx, file_sha256
from fa3trt.signature import BATCH_AXIS, Signature

__all__ = ["Loaded", "load_source", "model_id", "export_source", "verify_source", "export_sizes", "ragged_lengths"]

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A loaded model: module (CPU, eval, frozen), signature, and a factory's sample inputs."""

    module: nn.Module
    signature: Signature
    samples: dict[str, torch.Tensor] | None = None


def _package(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(f"model.source {name} needs the {name} package: pip install {name} ({e})") from e


def _class(package: Any, spec: SourceSpec) -> Any:
    cls = getattr(package, spec.class_name or "", None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(
            f"model.class {spec.class_name!r} is not a model class of {spec.source} "
            f"{getattr(package, '__version__', '')}; name one such as "
            + ("FluxTransformer2DModel" if spec.source == "diffusers" else "BertModel")
        )
    return cls


def _build(spec: SourceSpec) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    if spec.source == "python":
        target = spec.factory or ""
        mod_name, _, fn_name = target.partition(":")
        if not mod_name or not fn_name:
            raise ConfigError(f"model.factory {target!r} must be 'package.module:function'")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"model.factory {target!r} cannot be imported ({e}); check the module path") from e
        made = fn()
        module, samples = made if isinstance(made, tuple) else (made, None)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model.factory {target!r} returned a {type(module).__name__}, not an nn.Module")
        if samples is not None and not isinstance(samples, dict):
            raise ConfigError(f"model.factory {target!r}: sample inputs must be a dict of name -> tensor")
        return module, samples
    package = _package(spec.source)
    cls = _class(package, spec)
    if spec.path is not None:
        if not Path(spec.path).is_dir():
            raise ConfigError(f"model.path {spec.path!r} is not a folder; give a local from_pretrained folder")
        return cls.from_pretrained(spec.path, local_files_only=True), None
    config = dict(spec.config or {})
    try:
        if spec.source == "diffusers":
            return cls.from_config(config), None
        return cls(cls.config_class(**config)), None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config does not build {spec.class_name}: {e}") from e


def load_source(spec: SourceSpec) -> Loaded:
    """The model ``spec`` names, on the CPU (see the module docstring)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        module, samples = _build(spec)
    if spec.weights is not None:
        from safetensors.torch import load_file

        state = load_file(spec.weights)
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(
                f"model.weights {spec.weights!r} does not match {type(module).__name__}: missing "
                f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}; save the model's own state_dict"
            )
    dtype = getattr(torch, spec.dtype)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module = module.to(dtype)
    module = module.eval().requires_grad_(False)
    signature = spec.signature()
    if samples is not None:
        missing = sorted({t.name for t in signature.sent} - set(samples))
        if missing:
            raise ConfigError(f"model.factory {spec.factory!r} gave sample inputs without {missing}")
    log.info("loaded %s model %s (%s)", spec.source, spec.class_name or spec.factory, spec.dtype)
    return Loaded(module, signature, samples)


_WHOLE_FILE = 64 << 20
_SAMPLE = 1 << 20


def _file_digest(path: Path) -> str:
    """sha256 of a file up to 64 MiB; of a larger one its size and three 1 MiB samples (start,
    middle, end), so a replica's start does not read tens of GB of weights to name them."""
    size = path.stat().st_size
    if size <= _WHOLE_FILE:
        return file_sha256(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in (0, size // 2, size - _SAMPLE):
            f.seek(offset)
            h.update(f.read(_SAMPLE))
    return "sampled:" + h.hexdigest()


def _folder_digest(path: str) -> list[tuple[str, str]]:
    root = Path(path)
    return sorted((str(p.relative_to(root)), _file_digest(p)) for p in root.rglob("*") if p.is_file())


def model_id(spec: SourceSpec) -> str:
    """A digest of everything that makes the model (see the module docstring)."""
    d = spec.model_dump(mode="json", by_alias=True)
    if spec.path is not None:  # by content, not by where the folder is
        d["path"] = _folder_digest(spec.path)
    if spec.weights is not None:
        d["weights"] = file_sha256(spec.weights)
    d["signature"] = spec.signature().to_dict()
    d["packages"] = {
        p: getattr(importlib.import_module(p), "__version__", "?")
        for p in ("torch",) + ((spec.source,) if spec.source != "python" else ())
    }
    return spec_hash(d, 16)


def export_sizes(signature: Signature, buckets: Buckets) -> dict[str, int]:
    """Sample sizes for export: each named axis at 16 within its range (at least 2: torch.export
    specializes sizes 0 and 1), the batch axis at 2."""
    sizes = {BATCH_AXIS: 2}
    for a in sorted(signature.axis_names()):
        lo, hi = signature.axis_range(a, buckets)
        if hi < 2:
            raise ConfigError(f"axis {a!r} has range [{lo}, {hi}]; a dynamic axis needs a max >= 2 (or make it a size)")
        sizes[a] = min(hi, max(lo, 2, 16))
    return sizes


def export_source(
    spec: SourceSpec, path: str | os.PathLike[str], buckets: Buckets, loaded: Loaded | None = None
) -> ExportResult:
    """Export the model of ``spec`` with its attention routed (one CustomAttnPlugin node per
    routed call), its inputs and axes named by its signature, and its output selected."""
    loaded = loaded or load_source(spec)
    sig = loaded.signature
    sizes = export_sizes(sig, buckets)
    inputs = loaded.samples if loaded.samples is not None else sig.samples(sizes, sizes[BATCH_AXIS])
    dtype = getattr(torch, spec.dtype)  # float inputs in the model's dtype (the engine's inputs)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    ranges = {a: sig.axis_range(a, buckets) for a in sig.axis_names()}
    module = loaded.module
    # The server makes a fill: mask input from each request's length: a key-padding prefix mask.
    promise = any(t.fill == "mask" for t in sig.inputs)
    with contextlib.ExitStack() as stack:
        if spec.routing != "off":
            report = stack.enter_context(route_attention(module, spec.routing, key_padding_masks=promise))
        res = export_onnx(
            module,
            path,
            {t.name: inputs[t.name] for t in sig.inputs},
            sig.dynamic_axes(),
            output=spec.output.select,
            output_name=sig.output.name,
            axis_ranges=ranges,
        )
    if spec.routing != "off":
        log.info("export of %s: %s", spec.class_name or spec.factory, report.summary())
    return res


def ragged_lengths(batch: int, length: int) -> list[int]:
    """Lengths along the bucketed axis for checks: the full length, about half, and 1, repeated,
    so a batch of two or more holds padded sequences (one of a single token from three)."""
    return [(length, max(1, length // 2), 1)[i % 3] for i in range(batch)]


def verify_source(spec: SourceSpec, path: str | os.PathLike[str], buckets: Buckets) -> float:
    """The exported file in ONNX Runtime against the eager, unrouted model in float32, at the
    export's sample sizes and at each axis's smallest and largest size (the batch at 1 and 3).
    Filled inputs (masks, lengths) come from ``ragged_lengths``: padded batches, as served.
    A file exported in another dtype is checked through a float32 export of the same model."""
    spec32 = spec.model_copy(update={"dtype": "float32"})
    loaded = load_source(spec32)
    sig = loaded.signature
    if spec.dtype != "float32":
        path = Path(path).with_name(Path(path).stem + "-verify-float32.onnx")
        export_source(spec32, path, buckets, load_source(spec32))
    sizes = export_sizes(sig, buckets)

    def make_inputs(s: dict[str, int]) -> dict[str, torch.Tensor]:
        lengths = ragged_lengths(s[BATCH_AXIS], s[sig.bucketed])
        made = sig.samples(s, s[BATCH_AXIS], lengths=lengths)
        return {t.name: made[t.name] for t in sig.inputs}

    check = {a: list(sig.axis_range(a, buckets)) for a in sig.axis_names()} | {BATCH_AXIS: [1, 3]}
    return verify_onnx(
        path,
        loaded.module,
        make_inputs(sizes),
        output=spec.output.select,
        check_sizes=check,
        make_inputs=make_inputs,
        atol=1e-4,
    )
