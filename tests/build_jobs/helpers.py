"""Temp serve configs for the build_jobs tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def app(name: str, store: Path | str, **model: Any) -> dict[str, Any]:
    """One fa3trt application entry (tiny preset, one layer unless ``model`` says otherwise)."""
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "deploy.app:build_app",
        "args": {
            "model": {"preset": "tiny", "layers": 1, **model},
            "buckets": [128, 512],
            "backend": "auto",
            "store": str(store),
        },
    }


def write_config(path: Path, apps: list[dict[str, Any]]) -> Path:
    doc = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": 8000}, "applications": apps}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def garbage_weights(path: Path) -> Path:
    """A file that exists (so the config validates) but is not safetensors."""
    path.write_bytes(b"\x00\x01 this is not a safetensors file " * 40)
    return path


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]
