"""The artifact store: engines, exported ONNX files, weights, build records and timing caches.

A local folder by default (``./engines``, ``fa3trt.defaults.STORE``) or any fsspec URI (an
NFS path, ``s3://``, ``gs://``) that every node of a cluster can reach. Layout of one entry
``(kind, key)``:

- ``<root>/<kind>/<key>.<sha16>.bin``: the blob, named by its own content (sha256 prefix);
- ``<root>/<kind>/<key>.json``: the sidecar, holding the blob's file name, sha256 and size plus
  the caller's metadata. Writing the sidecar is the single commit point of an entry.

Guarantees:

- Writes are atomic (temporary name + rename on local/NFS paths, one-shot puts on object
  stores), so a reader sees a complete entry or none. Because each blob is named by its
  content and the sidecar names its blob, two writers of one key with different bytes both
  succeed and the entry always ends as one writer's matching (sidecar, blob) pair, never a mix.
- Every read verifies size and sha256; a mismatch is ``ArtifactCorruptError`` naming the fix.
- Keys match ``[A-Za-z0-9][A-Za-z0-9._-]*`` (no separators, no ``..``): they cannot escape the
  root. A missing entry is ``ArtifactNotFoundError`` naming the build command.
- Errors are named for what is stored: entries of kind ``engines`` raise the subclasses
  ``EngineNotFoundError`` and ``EngineCorruptError``, every other kind the artifact classes.
- Nothing is pickled: blobs are bytes, metadata is JSON.
- Blobs replaced by a later ``put`` are removed once older than ``GC_GRACE_S`` (a concurrent
  writer's blob is never younger-than-grace garbage), so ``--force`` rebuilds do not pile up.

Timing caches are stored per (GPU type, TensorRT version): ``timing_cache_key`` names them and
``get_timing_cache`` / ``put_timing_cache`` read and write them under kind ``timing``.
Entries written by the first layout (``<key>.bin`` next to a sidecar without a ``blob`` field)
are still read.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from datetime import datetime
from typing import Any

from fa3trt import defaults
from fa3trt.defaults import BUILD_HINT
from fa3trt.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ConfigError,
    EngineCorruptError,
    EngineNotFoundError,
)

__all__ = [
    "ArtifactStore",
    "KINDS",
    "GC_GRACE_S",
    "validate_key",
    "sanitize_key_part",
    "timing_cache_key",
]

log = logging.getLogger(__name__)

KINDS = ("engines", "onnx", "timing", "artifacts")
GC_GRACE_S = 600.0
"""A replaced blob is deleted only when older than this: a concurrent writer commits its sidecar
within moments of renaming its blob, so a blob this old that no sidecar names is garbage."""

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def validate_key(key: str) -> str:
    """``key`` unchanged, or ``ConfigError`` when it could name a path outside its folder."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or ".." in key:
        raise ConfigError(
            f"store key {key!r} is not allowed: keys are letters, digits, '.', '_' and '-' "
            "(no path separators, no '..'), so they cannot escape the store root"
        )
    return key


def sanitize_key_part(text: str) -> str:
    """``text`` with every run of characters a key may not hold replaced by ``_``."""
    out = _UNSAFE.sub("_", str(text)).strip("._-")
    return out or "unknown"


def timing_cache_key(gpu_type: str, trt_version: str) -> str:
    """Store key (kind ``timing``) of the timing cache of one (GPU type, TensorRT version).

    A timing cache is only valid for the GPU model and TensorRT release that measured it, so both
    are in the key; ``gpu_type`` is Ray's accelerator type (``H100``) or a device name.
    """
    if not gpu_type or not trt_version:
        raise ConfigError(
            f"timing_cache_key needs a GPU type and a TensorRT version, got {gpu_type!r} and {trt_version!r}"
        )
    return validate_key(f"timing-{sanitize_key_part(gpu_type)}-trt{sanitize_key_part(trt_version)}")


def _not_found(kind: str) -> type[ArtifactNotFoundError]:
    return EngineNotFoundError if kind == "engines" else ArtifactNotFoundError


def _corrupt(kind: str) -> type[ArtifactCorruptError]:
    return EngineCorruptError if kind == "engines" else ArtifactCorruptError


def _mtime(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec ``info`` dict, across filesystems."""
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class ArtifactStore:
    """Content-addressed blobs with JSON sidecars on a local folder or any fsspec filesystem."""

    def __init__(self, uri: str | os.PathLike[str] | None = None) -> None:
        import fsspec

        self.uri = os.fspath(uri) if uri is not None else defaults.STORE
        if not self.uri:
            raise ConfigError(f"store URI must not be empty; use a folder such as {defaults.STORE!r} or an fsspec URI")
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._local = "file" in protocols or "local" in protocols
        if self._local:
            self.root = os.path.abspath(self.root)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.uri!r})"

    # ------------------------------------------------------------------ paths
    def _dir(self, kind: str) -> str:
        if kind not in KINDS:
            raise ConfigError(f"store kind {kind!r} is unknown; use one of {KINDS}")
        return f"{self.root}/{kind}"

    def _path(self, kind: str, key: str, suffix: str) -> str:
        path = f"{self._dir(kind)}/{validate_key(key)}{suffix}"
        if self._local and not os.path.abspath(path).startswith(self.root + os.sep):
            raise ConfigError(f"store key {key!r} resolves outside the store root {self.root}")
        return path

    def _blob_re(self, key: str) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(key)}\.[0-9a-f]{{16}}\.bin$")

    def _atomic_write(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if not self._local:
            # Object stores publish a put atomically; there is no rename to lean on.
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ------------------------------------------------------------------ API
    def put(self, kind: str, key: str, data: bytes, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store ``data`` under (kind, key) with JSON-serializable ``metadata``; returns the sidecar.

        Replaces an existing entry. Safe when several processes put the same key at once.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"store.put({kind!r}, {key!r}) takes bytes, got {type(data).__name__}")
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        blob_name = f"{validate_key(key)}.{digest[:16]}.bin"
        meta = dict(metadata or {})
        meta.update(key=key, kind=kind, sha256=digest, size=len(data), blob=blob_name, stored_at=time.time())
        try:
            sidecar = json.dumps(meta, sort_keys=True, indent=1).encode()
        except TypeError as e:
            raise ConfigError(
                f"metadata of {kind}/{key} is not JSON-serializable ({e}); pass str/int/float/list/dict values"
            ) from e
        self._atomic_write(self._path(kind, key, f".{digest[:16]}.bin"), data)
        # The sidecar goes last: its presence is what makes an entry visible, and it names its blob.
        self._atomic_write(self._path(kind, key, ".json"), sidecar)
        log.info("stored %s/%s (%d bytes) in %s", kind, key, len(data), self.uri)
        self._collect_garbage(kind, key)
        return meta

    def has(self, kind: str, key: str) -> bool:
        """Whether a committed entry (its sidecar) exists; does not read or verify the blob."""
        return bool(self.fs.exists(self._path(kind, key, ".json")))

    def metadata(self, kind: str, key: str) -> dict[str, Any]:
        """The entry's sidecar: the caller's metadata plus ``key``, ``sha256``, ``size``, ``stored_at``."""
        path = self._path(kind, key, ".json")
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            raise _not_found(kind)(
                f"no {kind[:-1] if kind.endswith('s') else kind} {key!r} in store {self.uri}: not built yet; "
                f"run `{BUILD_HINT} --store {self.uri}`"
            ) from None
        try:
            meta = json.loads(raw)
        except ValueError as e:
            raise _corrupt(kind)(
                f"metadata of {kind}/{key} in {self.uri} is not valid JSON ({e}); rebuild it with `{BUILD_HINT} --force`"
            ) from e
        if not isinstance(meta, dict):
            raise _corrupt(kind)(
                f"metadata of {kind}/{key} in {self.uri} is not a JSON object; rebuild it with `{BUILD_HINT} --force`"
            )
        return meta

    def _blob_path(self, kind: str, key: str, meta: dict[str, Any]) -> str:
        blob = meta.get("blob")
        if blob is None:  # first layout: <key>.bin
            return self._path(kind, key, ".bin")
        if not isinstance(blob, str) or not self._blob_re(key).match(blob):
            raise _corrupt(kind)(
                f"metadata of {kind}/{key} in {self.uri} names blob {blob!r}, which is not this key's; "
                f"rebuild it with `{BUILD_HINT} --force`"
            )
        return f"{self._dir(kind)}/{blob}"

    def get(self, kind: str, key: str) -> tuple[bytes, dict[str, Any]]:
        """The blob and its metadata, size and sha256 verified."""
        meta = self.metadata(kind, key)
        try:
            data = self.fs.cat_file(self._blob_path(kind, key, meta))
        except FileNotFoundError:
            # A concurrent put may have replaced the entry (and its old blob) after we read the
            # sidecar: read the new sidecar once before calling the entry broken.
            fresh = self.metadata(kind, key)
            try:
                if fresh.get("blob") == meta.get("blob"):
                    raise FileNotFoundError
                meta, data = fresh, self.fs.cat_file(self._blob_path(kind, key, fresh))
            except FileNotFoundError:
                raise _corrupt(kind)(
                    f"{kind}/{key} in {self.uri} has metadata but no data; rebuild it with `{BUILD_HINT} --force`"
                ) from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != meta.get("size") or digest != meta.get("sha256"):
            raise _corrupt(kind)(
                f"{kind}/{key} in {self.uri} fails its checksum (size {len(data)} vs {meta.get('size')}, "
                f"sha256 {digest[:12]} vs {str(meta.get('sha256'))[:12]}): the file is truncated or corrupt; "
                f"rebuild it with `{BUILD_HINT} --force`"
            )
        return data, meta

    def list(self, kind: str = "engines") -> list[dict[str, Any]]:
        """Metadata of every committed entry of ``kind``, sorted by key."""
        base = self._dir(kind)
        if not self.fs.exists(base):
            return []
        out = []
        for path in sorted(self.fs.ls(base, detail=False)):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                try:
                    out.append(self.metadata(kind, name[: -len(".json")]))
                except (ArtifactCorruptError, ConfigError) as e:
                    log.warning("skipping unreadable store entry %s: %s", path, e)
        return out

    def delete(self, kind: str, key: str) -> None:
        """Remove the entry (sidecar first, so it disappears atomically) and all its blobs."""
        sidecar = self._path(kind, key, ".json")
        if self.fs.exists(sidecar):
            self.fs.rm_file(sidecar)
        for path in self._blobs(kind, key):
            self._rm_quiet(path)
        legacy = self._path(kind, key, ".bin")
        if self.fs.exists(legacy):
            self._rm_quiet(legacy)

    # ------------------------------------------------------------------ timing caches
    def get_timing_cache(self, gpu_type: str, trt_version: str) -> bytes | None:
        """The stored timing cache of (GPU type, TensorRT version), or None (also when corrupt)."""
        key = timing_cache_key(gpu_type, trt_version)
        if not self.has("timing", key):
            return None
        try:
            data, _ = self.get("timing", key)
        except (ArtifactCorruptError, ArtifactNotFoundError) as e:
            log.warning("ignoring timing cache %s: %s", key, e)
            return None
        return data

    def put_timing_cache(
        self, gpu_type: str, trt_version: str, data: bytes, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Store the timing cache of (GPU type, TensorRT version), replacing the previous one."""
        meta = {"gpu_type": gpu_type, "tensorrt": trt_version, **(metadata or {})}
        return self.put("timing", timing_cache_key(gpu_type, trt_version), data, meta)

    # ------------------------------------------------------------------ housekeeping
    def _blobs(self, kind: str, key: str) -> builtins.list[str]:
        base = self._dir(kind)
        validate_key(key)
        pattern = self._blob_re(key)
        try:
            names = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        return [p for p in names if pattern.match(p.rsplit("/", 1)[-1])]

    def _rm_quiet(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    def _collect_garbage(self, kind: str, key: str) -> None:
        """Delete this key's blobs that the current sidecar does not name and that are old."""
        try:
            current = self.metadata(kind, key).get("blob")
            now = time.time()
            for path in self._blobs(kind, key):
                if path.rsplit("/", 1)[-1] == current:
                    continue
                mtime = _mtime(self.fs.info(path))
                if mtime is not None and now - mtime > GC_GRACE_S:
                    log.info("removing replaced blob %s", path)
                    self._rm_quiet(path)
        except (OSError, ArtifactNotFoundError, ArtifactCorruptError) as e:
            log.debug("store garbage collection of %s/%s skipped: %s", kind, key, e)
