"""Load a model from its source (``model:`` of the app config, ``fa3trt.models.spec``).

Contract:
- ``check_source(spec)`` finds what would stop a model from loading without building it: the
  package not importable (the error names the install command), the class missing, the folder
  or its ``config.json`` unreadable, the factory not importable or not callable. The app builder
  calls it before any replica starts, so ``serve run`` fails at once instead of retrying.
- ``load_source(spec)`` returns a ``Loaded``: the module in eval mode in the spec's dtype on the
  CPU, frozen, its ``Signature``, and the factory's sample inputs where a ``python`` factory
  gave them (checked against the signature). Sources: ``fa3trt`` (the reference presets),
  ``diffusers`` / ``transformers`` (a class of the package by name, built from ``config`` or
  loaded from a local folder ``path``, never from the network) and ``python``
  (``"package.module:function"`` returning the module, or ``(module, sample_inputs)``).
- Random weights come from ``seed`` in a forked RNG, on the CPU in float32, so every replica
  and every build worker makes the same model; ``weights`` (safetensors, never pickle) replace
  them and must name exactly the model's parameters.
- ``model_id(spec)`` digests everything that makes two models differ (source, preset or class,
  config, the folder's files, factory, dtype, seed, weights file, signature, torch's and the
  package's versions): the artifact store keys ONNX files and engines by it.
- A source that cannot be loaded is a ``ConfigError`` (``MissingDependencyError`` for a missing
  package) that names the key to fix.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fa3trt._hashing import file_sha256, spec_hash
from fa3trt.errors import ConfigError, MissingDependencyError
from fa3trt.models.reference import build_model
from fa3trt.models.spec import AnyModelSpec, ReferenceSpec, SourceSpec
from fa3trt.signature import Signature

__all__ = ["Loaded", "load_source", "check_source", "model_id", "EXTRAS"]

log = logging.getLogger(__name__)

EXTRAS = {"diffusers": "diffusers", "transformers": "transformers"}
"""The fa3trt extra that installs each source's package (pinned as the tests pin it)."""


@dataclass
class Loaded:
    """A loaded model: module (CPU, eval, frozen), signature, and a factory's sample inputs."""

    module: nn.Module
    signature: Signature
    samples: dict[str, torch.Tensor] | None = None


def _install_hint(package: str) -> str:
    extra = EXTRAS.get(package)
    return f"pip install 'fa3trt[{extra}]'" if extra else f"pip install {package}"


def _package(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise MissingDependencyError(
            f"model.source {name} needs the {name} package, which does not import here ({e}): "
            f"{_install_hint(name)} on every node that serves or builds it"
        ) from e


def _class(package: Any, spec: SourceSpec) -> type[nn.Module]:
    cls = getattr(package, spec.class_name or "", None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ConfigError(
            f"model.class {spec.class_name!r} is not a model class of {spec.source} "
            f"{getattr(package, '__version__', '')}; name one such as "
            + ("FluxTransformer2DModel" if spec.source == "diffusers" else "BertModel")
        )
    return cls


def _factory(spec: SourceSpec) -> Any:
    target = spec.factory or ""
    mod_name, _, fn_name = target.partition(":")
    if not mod_name or not fn_name:
        raise ConfigError(f"model.factory {target!r} must be 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"model.factory {target!r} cannot be imported ({type(e).__name__}: {e}); check the module path and that "
            "the module is installed on every node"
        ) from e
    if not callable(fn):
        raise ConfigError(f"model.factory {target!r} is a {type(fn).__name__}, not a function that returns a model")
    return fn


def check_source(spec: AnyModelSpec) -> None:
    """Raise what ``load_source`` would raise for a missing package, class, folder or factory,
    without building the model (see the module docstring)."""
    if isinstance(spec, ReferenceSpec):
        return
    if spec.source == "python":
        _factory(spec)
        return
    if importlib.util.find_spec(spec.source) is None:
        raise MissingDependencyError(
            f"model.source {spec.source} needs the {spec.source} package, which is not installed: "
            f"{_install_hint(spec.source)} on every node that serves or builds it"
        )
    _class(_package(spec.source), spec)
    if spec.path is not None:
        folder = Path(spec.path)
        if not folder.is_dir():
            raise ConfigError(f"model.path {spec.path!r} is not a folder; give a local from_pretrained folder")
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.path {spec.path!r} has no config.json; give the folder that save_pretrained wrote"
            )


def _build(spec: SourceSpec) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    if spec.source == "python":
        target = spec.factory
        made = _factory(spec)()
        module, samples = made if isinstance(made, tuple) else (made, None)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model.factory {target!r} returned a {type(module).__name__}, not an nn.Module")
        if samples is not None and not isinstance(samples, dict):
            raise ConfigError(f"model.factory {target!r}: sample inputs must be a dict of name -> tensor")
        return module, samples
    cls = _class(_package(spec.source), spec)
    if spec.path is not None:
        if not Path(spec.path).is_dir():
            raise ConfigError(f"model.path {spec.path!r} is not a folder; give a local from_pretrained folder")
        return cls.from_pretrained(spec.path, local_files_only=True), None  # type: ignore[attr-defined]
    config = dict(spec.config or {})
    try:
        if spec.source == "diffusers":
            return cls.from_config(config), None  # type: ignore[attr-defined]
        return cls(cls.config_class(**config)), None  # type: ignore[attr-defined,call-arg]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config does not build {spec.class_name}: {e}") from e


def load_source(spec: AnyModelSpec) -> Loaded:
    """The model ``spec`` names, on the CPU (see the module docstring)."""
    if isinstance(spec, ReferenceSpec):
        return Loaded(build_model(spec.config(), spec.weights), spec.signature())
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
    log.info("loaded %s", spec.describe())
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


def model_id(spec: AnyModelSpec) -> str:
    """A digest of everything that makes the model (see the module docstring)."""
    d: dict[str, Any]
    if isinstance(spec, ReferenceSpec):  # by what the preset and overrides make, not how they are written
        d = {"source": spec.source, "model": spec.config().compute_hash()}
    else:
        d = spec.model_dump(mode="json", by_alias=True)
        if not spec.attn_mode:  # the default leaves the ids of models stored before it existed as they were
            del d["attn_mode"]
        if spec.path is not None:  # by content, not by where the folder is
            d["path"] = _folder_digest(spec.path)
    if spec.weights is not None:
        d["weights"] = _file_digest(Path(spec.weights))
    d["signature"] = spec.signature().to_dict()
    source = spec.source if spec.source in EXTRAS else None
    d["packages"] = {
        p: getattr(importlib.import_module(p), "__version__", "?") for p in ("torch",) + ((source,) if source else ())
    }
    return spec_hash(d, 16)
