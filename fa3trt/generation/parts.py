"""A generation app's parts (transformer, text encoders, VAE): their configs and their loading.

Contract: ``part_config(config, path, field)`` is a part's config: the inline ``config`` where
given, else its folder's ``config.json``; an unreadable file is a ``ConfigError`` naming ``field``
and the fix. ``load_part(module, class_name, ...)`` builds ``module.<class_name>`` from an inline
config (random weights from ``seed``, without touching the caller's random state) or from a
``save_pretrained`` folder, in ``dtype``; a class that is not a model class of ``module``, or
a folder that does not load, is a ``ConfigError`` naming ``field``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from fa3trt.errors import ConfigError

__all__ = ["load_part", "part_config"]


def part_config(config: Mapping[str, Any] | None, path: str | None, field: str) -> dict[str, Any]:
    """The inline ``config``, else ``path``'s ``config.json`` (see the module docstring)."""
    if config is not None:
        return dict(config)
    file = Path(path or "") / "config.json"
    try:
        return dict(json.loads(file.read_text()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}.path: {file} is not a readable config.json ({e}); give the {field}'s folder") from e


def load_part(
    module: str,
    class_name: str,
    *,
    config: Mapping[str, Any] | None,
    path: str | None,
    dtype: torch.dtype,
    seed: int,
    field: str,
    from_config: Callable[[Any, Mapping[str, Any]], Any],
    dtype_kwarg: str,
) -> Any:
    """``module.<class_name>`` from ``config`` (``from_config(cls, config)``, seeded) or ``path``
    (``cls.from_pretrained(path, **{dtype_kwarg: dtype})``), in eval mode (see the module docstring)."""
    cls = getattr(importlib.import_module(module), class_name, None)
    if cls is None or not (hasattr(cls, "from_config") or hasattr(cls, "config_class")):
        raise ConfigError(f"{field}: {class_name!r} is not a {module} model class")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = (
                from_config(cls, config) if config is not None else cls.from_pretrained(path, **{dtype_kwarg: dtype})
            )
        except (OSError, TypeError, ValueError) as e:
            raise ConfigError(f"{field}: {class_name} does not load from {path or 'its config'}: {e}") from e
    return model.eval()
