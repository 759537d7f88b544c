"""The artifact store: round trips, checksums, key safety, concurrent writers, timing caches."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from fa3trt.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    ConfigError,
    EngineCorruptError,
    EngineNotFoundError,
)
from fa3trt.store import GC_GRACE_S, ArtifactStore, timing_cache_key


def _blob_file(store: ArtifactStore, kind: str, key: str) -> Path:
    return Path(store.root) / kind / store.metadata(kind, key)["blob"]


def test_round_trip_metadata_list_delete(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "s")
    assert not store.has("engines", "e1") and store.list() == []
    meta = store.put("engines", "e1", b"engine bytes", {"gpu": "H100"})
    assert meta["sha256"] == hashlib.sha256(b"engine bytes").hexdigest() and meta["size"] == 12
    data, got = store.get("engines", "e1")
    assert data == b"engine bytes" and got["gpu"] == "H100" and got["key"] == "e1"
    store.put("engines", "e0", b"other")
    assert [m["key"] for m in store.list("engines")] == ["e0", "e1"]
    assert store.list("onnx") == []
    store.delete("engines", "e1")
    assert not store.has("engines", "e1")
    assert not [n for n in os.listdir(tmp_path / "s" / "engines") if n.startswith("e1")]


def test_missing_entry_names_the_build_command(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with pytest.raises(
        EngineNotFoundError, match=r"not built yet; run `python -m build_jobs --config serve_config.yaml"
    ):
        store.get("engines", "nope")


def test_flipped_bytes_are_detected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put("engines", "e", bytes(range(256)) * 4)
    blob = _blob_file(store, "engines", "e")
    raw = bytearray(blob.read_bytes())
    raw[100] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(
        EngineCorruptError, match=r"engines/e .* fails its checksum .*corrupt; rebuild it with .*--force"
    ):
        store.get("engines", "e")
    blob.write_bytes(bytes(raw[:10]))  # truncated
    with pytest.raises(EngineCorruptError, match=r"size 10 vs 1024"):
        store.get("engines", "e")
    blob.unlink()
    with pytest.raises(EngineCorruptError, match="has metadata but no data"):
        store.get("engines", "e")
    (tmp_path / "engines" / "e.json").write_text("{not json")
    with pytest.raises(EngineCorruptError, match="not valid JSON"):
        store.get("engines", "e")


def test_errors_are_named_for_the_artifact(tmp_path: Path) -> None:
    """Engines raise the engine errors; ONNX, weights, records and caches the artifact ones.
    The engine errors are artifact errors, so one ``except`` catches both."""
    store = ArtifactStore(tmp_path)
    with pytest.raises(EngineNotFoundError, match="no engine 'nope'"):
        store.get("engines", "nope")
    for kind, name in (("onnx", "onnx"), ("artifacts", "artifact"), ("timing", "timing")):
        with pytest.raises(ArtifactNotFoundError, match=f"no {name} 'nope' in store .* not built yet") as found:
            store.metadata(kind, "nope")
        assert not isinstance(found.value, EngineNotFoundError)
    for kind in ("engines", "onnx"):
        store.put(kind, "k", b"x" * 64)
        blob = tmp_path / kind / store.metadata(kind, "k")["blob"]
        blob.write_bytes(b"y" * 64)
        with pytest.raises(ArtifactCorruptError, match=f"{kind}/k .* fails its checksum") as corrupt:
            store.get(kind, "k")
        assert isinstance(corrupt.value, EngineCorruptError) == (kind == "engines")
    assert issubclass(EngineNotFoundError, ArtifactNotFoundError) and issubclass(
        EngineCorruptError, ArtifactCorruptError
    )


@pytest.mark.parametrize(
    "key", ["../escape", "a/b", "..", "/etc/passwd", "", ".hidden", "a\\b", "x..y", "k" * 300, "a b"]
)
def test_keys_that_could_escape_are_refused(tmp_path: Path, key: str) -> None:
    store = ArtifactStore(tmp_path / "root")
    for call in (
        lambda: store.put("engines", key, b"x"),
        lambda: store.get("engines", key),
        lambda: store.has("engines", key),
        lambda: store.delete("engines", key),
    ):
        with pytest.raises(ConfigError, match="cannot escape the store root"):
            call()
    assert not (tmp_path / "escape").exists() and not (tmp_path / "root" / "escape").exists()


def test_sidecar_naming_a_foreign_blob_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put("engines", "a", b"aaa")
    store.put("engines", "b", b"bbb")
    side = tmp_path / "engines" / "b.json"
    meta = json.loads(side.read_text())
    meta["blob"] = "../../outside.bin"
    side.write_text(json.dumps(meta))
    with pytest.raises(EngineCorruptError, match="not this key's"):
        store.get("engines", "b")


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"store kind 'models' is unknown"):
        ArtifactStore(tmp_path).put("models", "k", b"x")


def test_fsspec_uri(tmp_path: Path) -> None:
    store = ArtifactStore(f"file://{tmp_path}/s")
    store.put("onnx", "o", b"onnx")
    assert ArtifactStore(tmp_path / "s").get("onnx", "o")[0] == b"onnx"
    mem = ArtifactStore("memory://fa3trt-test-store")
    mem.put("timing", "t", b"cache")
    assert mem.get("timing", "t")[0] == b"cache"
    mem.delete("timing", "t")


def test_concurrent_writers_of_one_key_leave_a_valid_entry(tmp_path: Path) -> None:
    """Writers with different bytes race; readers never see a mixed entry; the end is one writer's."""
    store = ArtifactStore(tmp_path)
    payloads = {w: [f"writer {w} round {i} ".encode() * (1000 + 37 * w + i) for i in range(40)] for w in range(4)}
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(w: int) -> None:
        try:
            for data in payloads[w]:
                ArtifactStore(tmp_path).put("engines", "shared", data, {"writer": w})
        except BaseException as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    def read() -> None:
        while not stop.is_set():
            if store.has("engines", "shared"):
                try:
                    data, meta = store.get("engines", "shared")
                    assert data in payloads[meta["writer"]]
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)
                    return

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not errors, errors[0]
    data, meta = store.get("engines", "shared")
    assert data == payloads[meta["writer"]][-1]
    assert not [n for n in os.listdir(tmp_path / "engines") if ".tmp-" in n]


def test_replaced_blobs_are_collected_after_the_grace_period(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    store.put("engines", "e", b"old")
    old = _blob_file(store, "engines", "e")
    store.put("engines", "e", b"new")
    assert old.exists()  # young: could still be a concurrent writer's
    past = time.time() - GC_GRACE_S - 5
    os.utime(old, (past, past))
    store.put("engines", "e", b"newer")
    assert not old.exists()
    assert store.get("engines", "e")[0] == b"newer"


def test_first_layout_entries_still_read(tmp_path: Path) -> None:
    (tmp_path / "engines").mkdir()
    data = b"legacy engine"
    (tmp_path / "engines" / "old.bin").write_bytes(data)
    meta = {"key": "old", "kind": "engines", "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (tmp_path / "engines" / "old.json").write_text(json.dumps(meta))
    store = ArtifactStore(tmp_path)
    assert store.get("engines", "old")[0] == data
    store.delete("engines", "old")
    assert os.listdir(tmp_path / "engines") == []


def test_timing_caches_per_gpu_type_and_tensorrt_version(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    assert store.get_timing_cache("H100", "10.9.0") is None
    store.put_timing_cache("H100", "10.9.0", b"h100 cache")
    store.put_timing_cache("NVIDIA H200 (141GB)", "10.9.0", b"h200 cache")
    assert store.get_timing_cache("H100", "10.9.0") == b"h100 cache"
    assert store.get_timing_cache("H100", "10.10.0") is None
    assert store.get_timing_cache("NVIDIA H200 (141GB)", "10.9.0") == b"h200 cache"
    assert timing_cache_key("NVIDIA H200 (141GB)", "10.9.0") == "timing-NVIDIA_H200_141GB-trt10.9.0"
    assert {m["gpu_type"] for m in store.list("timing")} == {"H100", "NVIDIA H200 (141GB)"}
    # A corrupt cache is ignored (rebuilt from scratch), never fed to TensorRT.
    _blob_file(store, "timing", timing_cache_key("H100", "10.9.0")).write_bytes(b"garbage!!!")
    assert store.get_timing_cache("H100", "10.9.0") is None
    with pytest.raises(ConfigError, match="needs a GPU type and a TensorRT version"):
        timing_cache_key("", "10.9")
