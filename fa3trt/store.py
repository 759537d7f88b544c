"""The artifact store: engines, exported ONNX files and timing caches, keyed by content hashes.

A local folder by default (``./engines``) or any fsspec URI (an NFS path, ``s3://``, ``gs://``)
that every node of a cluster can reach. Layout: ``<root>/<kind>/<key>.bin`` and a JSON sidecar
``<root>/<kind>/<key>.json`` holding the blob's sha256 and size plus the caller's metadata.

- Writes are atomic: blob, then sidecar, each written to a unique temporary name and renamed,
  so a reader sees a complete entry or none, and two writers of one key both succeed.
- Every read verifies the checksum; a mismatch is ``EngineCorruptError``.
- Keys match ``[A-Za-z0-9][A-Za-z0-9._-]*`` and cannot escape the root.
- Nothing is pickled: blobs are bytes, metadata is JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from fa3trt.errors import ConfigError, EngineCorruptError, EngineNotFoundError

__all__ = ["ArtifactStore", "KINDS", "DEFAULT_STORE", "BUILD_HINT", "validate_key"]

log = logging.getLogger(__name__)

DEFAULT_STORE = "./engines"
KINDS = ("engines", "onnx", "timing", "artifacts")
BUILD_HINT = "python -m build_jobs --config serve_config.yaml"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise ConfigError(
            f"store key {key!r} is not allowed: keys are letters, digits, '.', '_' and '-' "
            "(no path separators, no '..'), so they cannot escape the store root"
        )
    return key


class ArtifactStore:
    """Content-addressed blobs with JSON sidecars on a local folder or any fsspec filesystem."""

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        import fsspec

        self.uri = os.fspath(uri) if uri is not None else DEFAULT_STORE
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.root = root.rstrip("/") or "/"
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self._local:
            self.root = os.path.abspath(self.root)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    # ------------------------------------------------------------------ paths
    def _path(self, kind: str, key: str, suffix: str) -> str:
        if kind not in KINDS:
            raise ConfigError(f"store kind {kind!r} is unknown; use one of {KINDS}")
        path = f"{self.root}/{kind}/{validate_key(key)}{suffix}"
        if self._local and not os.path.abspath(path).startswith(self.root + os.sep):
            raise ConfigError(f"store key {key!r} resolves outside the store root {self.root}")
        return path

    def _atomic_write(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self._local:
            # Object stores publish a put atomically; there is no rename to lean on.
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # ------------------------------------------------------------------ API
    def put(self, kind: str, key: str, data: bytes, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store ``data`` under (kind, key) with ``metadata``; returns the sidecar written."""
        meta = dict(metadata or {})
        meta.update(
            key=key, kind=kind, sha256=hashlib.sha256(data).hexdigest(), size=len(data), stored_at=time.time()
        )
        self._atomic_write(self._path(kind, key, ".bin"), data)
        # The sidecar goes last: its presence is what makes an entry visible.
        self._atomic_write(self._path(kind, key, ".json"), json.dumps(meta, sort_keys=True, indent=1).encode())
        log.info("stored %s/%s (%d bytes) in %s", kind, key, len(data), self.uri)
        return meta

    def has(self, kind: str, key: str) -> bool:
        return bool(self.fs.exists(self._path(kind, key, ".json")))

    def metadata(self, kind: str, key: str) -> dict[str, Any]:
        path = self._path(kind, key, ".json")
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise EngineNotFoundError(
                f"no {kind[:-1] if kind.endswith('s') else kind} {key!r} in store {self.uri}: not built yet; "
                f"run `{BUILD_HINT} --store {self.uri}`"
            ) from None
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise EngineCorruptError(f"metadata of {kind}/{key} in {self.uri} is not valid JSON ({e}); rebuild it with --force") from e
        if not isinstance(meta, dict):
            raise EngineCorruptError(f"metadata of {kind}/{key} in {self.uri} is not a JSON object; rebuild it with --force")
        return meta

    def get(self, kind: str, key: str) -> tuple[bytes, dict[str, Any]]:
        """The blob and its metadata, checksum verified."""
        meta = self.metadata(kind, key)
        try:
            data = self.fs.cat_file(self._path(kind, key, ".bin"))
        except FileNotFoundError:
            raise EngineCorruptError(f"{kind}/{key} in {self.uri} has metadata but no data; rebuild it with --force") from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != meta.get("size") or digest != meta.get("sha256"):
            raise EngineCorruptError(
                f"{kind}/{key} in {self.uri} fails its checksum (size {len(data)} vs {meta.get('size')}, "
                f"sha256 {digest[:12]} vs {str(meta.get('sha256'))[:12]}): the file is truncated or corrupt; "
                f"rebuild it with `{BUILD_HINT} --force`"
            )
        return data, meta

    def list(self, kind: str = "engines") -> list[dict[str, Any]]:
        """Metadata of every complete entry of ``kind``, sorted by key."""
        base = f"{self.root}/{kind}"
        if not self.fs.exists(base):
            return []
        out = []
        for path in sorted(self.fs.ls(base, detail=False)):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                try:
                    out.append(self.metadata(kind, name[: -len(".json")]))
                except (EngineCorruptError, ConfigError) as e:
                    log.warning("skipping unreadable store entry %s: %s", path, e)
        return out

    def delete(self, kind: str, key: str) -> None:
        for suffix in (".json", ".bin"):
            path = self._path(kind, key, suffix)
            if self.fs.exists(path):
                self.fs.rm_file(path)
