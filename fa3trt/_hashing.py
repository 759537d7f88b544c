"""The one way this project hashes a specification (sha256 of its canonical JSON) and a file."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

__all__ = ["spec_hash", "file_sha256"]


def spec_hash(parts: dict[str, Any], n: int = 32) -> str:
    """First ``n`` hex digits of sha256 over ``parts`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:n]


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
