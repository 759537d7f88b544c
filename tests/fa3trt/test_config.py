"""The app's config schema (``fa3trt.config``) and the defaults every stage shares (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from fa3trt.buckets import Buckets
from fa3trt.config import APP_IMPORT_PATH, AppArgs, BatchingConfig, apply_env_overrides, load_serve_config
from fa3trt.errors import ConfigError
from fa3trt.store import ArtifactStore
from fa3trt.trt.build import BuildConfig

SHIPPED = Path(__file__).resolve().parents[2] / "serve_config.yaml"


def test_app_args_refuse_unknown_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AppArgs.model_validate({"bukets": [1]})
    with pytest.raises(ValidationError, match="strictly ascending"):
        AppArgs.model_validate({"buckets": [512, 128]})
    with pytest.raises(ValidationError, match="not buckets"):
        AppArgs.model_validate({"buckets": [128], "batching": {"bucket_overrides": {256: {"max_batch_size": 2}}}})
    with pytest.raises(ValidationError, match="does not exist"):
        AppArgs.model_validate({"model": {"weights": "/nonexistent.safetensors"}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"replicas": 0})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"backend": "onnx"})
    # CUDA graphs are accepted here; the backend refuses them where no graph can run (a CPU replica).
    assert AppArgs.model_validate({"cuda_graphs": True}).cuda_graphs is True


def test_batching_checks_overrides_against_the_buckets_it_is_given() -> None:
    """What a live replica's reconfigure validates: the same schema, with its buckets as context."""
    raw = {"bucket_overrides": {256: {"max_batch_size": 2}}}
    assert BatchingConfig.model_validate(raw).bucket_overrides[256].max_batch_size == 2  # no buckets known
    with pytest.raises(ValidationError, match=r"names edges \[256\] that are not buckets \[128, 512\]"):
        BatchingConfig.model_validate(raw, context={"buckets": (128, 512)})
    ok = BatchingConfig.model_validate(raw, context={"buckets": (128, 256)})
    assert ok.bucket_overrides[256].max_batch_size == 2
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BatchingConfig.model_validate({"max_batch_token": 1}, context={"buckets": (128,)})


def test_env_overrides_reach_the_app_and_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"model": {"preset": "tiny", "layers": 1}, "buckets": [128]}
    assert apply_env_overrides(raw, {}) == raw
    got = apply_env_overrides(raw, {"FA3TRT_MODEL_PRESET": "seed", "FA3TRT_MODEL_LAYERS": "2"})
    assert got["model"] == {"preset": "seed", "layers": "2"} and raw["model"] == {"preset": "tiny", "layers": 1}
    assert AppArgs.model_validate(got).model.layers == 2
    # build_jobs reads serve_config.yaml through load_serve_config: it builds what the app serves.
    monkeypatch.setenv("FA3TRT_MODEL_PRESET", "seed")
    monkeypatch.setenv("FA3TRT_MODEL_LAYERS", "3")
    ((_, args),) = load_serve_config(SHIPPED)
    assert (args.model.preset, args.model.layers) == ("seed", 3)


def test_repo_serve_config_is_valid(tmp_path: Path) -> None:
    ((name, args),) = load_serve_config(SHIPPED)
    assert name == "fa3trt" and args.model.preset == "tiny"
    with pytest.raises(ConfigError, match="no application"):
        p = tmp_path / "c.yaml"
        p.write_text("applications: []\n")
        load_serve_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_serve_config(tmp_path / "missing.yaml")


def test_defaults_are_what_the_shipped_config_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left out, every value means what serve_config.yaml spells out, in the schema, the engine
    build and the store alike: an engine built from the shipped config is the one a backend
    loaded without buckets looks for."""
    monkeypatch.delenv("FA3TRT_MODEL_PRESET", raising=False)
    monkeypatch.delenv("FA3TRT_MODEL_LAYERS", raising=False)
    doc = yaml.safe_load(SHIPPED.read_text())
    (app,) = [a for a in doc["applications"] if a["import_path"] == APP_IMPORT_PATH]
    ((_, shipped),) = load_serve_config(SHIPPED)
    default = AppArgs()
    assert shipped == default, "serve_config.yaml spells out the defaults; a changed default must change it too"
    assert AppArgs.model_validate(app["args"]) == default
    build = BuildConfig()
    assert build.buckets == Buckets((128, 512, 2048)) == default.bucket_set()
    assert build.max_batch_tokens == 16384 == default.batching.max_batch_tokens
    assert ArtifactStore().uri == "./engines" == default.store
