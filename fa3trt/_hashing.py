"""The one way this project hashes a specification: sha256 of its canonical JSON."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def spec_hash(parts: dict[str, Any], n: int = 32) -> str:
    """First ``n`` hex digits of sha256 over ``parts`` as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:n]
