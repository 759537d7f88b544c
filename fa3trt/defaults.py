"""Every default of the project, in one place.

Contract: the serve config schema (``fa3trt.config``), the engine build (``fa3trt.trt.build``), the
backend loader (``fa3trt.serving.backends``), the store and the build jobs take their defaults from
here, so a value left out anywhere means the same thing everywhere: ``load_backend("tensorrt")``
without buckets looks for the engines that the shipped ``serve_config.yaml`` builds. Plain
constants only; this module imports nothing.
"""

from __future__ import annotations

from typing import Literal

# ----------------------------------------------------------------- model
MODEL_PRESET: Literal["tiny", "seed"] = "tiny"
"""Model preset when none is named: the tiny model runs on a CPU."""
ATTN_MODE: Literal[0, 1] = 0
"""0: attention in the model dtype; 1: FP8 attention."""
SEED = 0
"""Seed of the weight init when no weights file is given."""

# ----------------------------------------------------------------- buckets and batching
BUCKETS: tuple[int, ...] = (128, 512, 2048)
"""Sequence-length bucket edges: one batch queue and one TensorRT profile each."""
MAX_BATCH_TOKENS = 16384
"""Token budget per batch: a bucket's largest batch is this divided by its edge."""
BATCH_WAIT_TIMEOUT_S = 0.005
"""Longest wait for a batch to fill, in seconds."""
MAX_CONCURRENT_BATCHES = 1
"""Batches of one bucket that may run at once."""

# ----------------------------------------------------------------- backend and artifacts
BACKEND: Literal["auto", "tensorrt", "torch", "identity"] = "auto"
"""auto: TensorRT when it imports and a GPU is present, else torch."""
STORE = "./engines"
"""Artifact store (engines, ONNX exports, weights, timing caches): a folder or an fsspec URI."""
BUILD_IF_MISSING = False
"""Whether a replica builds its GPU's engine at start when the store lacks it."""
SERVE_CONFIG = "serve_config.yaml"
"""The Serve config the build jobs read when none is given."""
BUILD_HINT = f"python -m build_jobs --config {SERVE_CONFIG}"
"""The command that builds what a replica or a check finds missing (named in their errors)."""
BUILD_RETRIES = 2
"""Retries of a failed build task."""

# ----------------------------------------------------------------- replicas
REPLICAS: Literal["auto"] = "auto"
INGRESS_REPLICAS = 0
"""auto: one replica per GPU in the cluster (one CPU replica without GPUs)."""
REPLICA_CPUS: Literal["auto"] = "auto"
"""CPUs reserved per GPU replica; ``auto`` is ``REPLICA_CPUS_AUTO``."""
REPLICA_CPUS_AUTO = 1
"""What ``replica_cpus: auto`` reserves: a GPU replica's threads only stage batches, and one
thread keeps up (docs/benchmarks.md, "Scale-out", the ``replica_cpus`` passes)."""
CPU_REPLICA_CPUS = 0.25
"""What a CPU replica reserves with ``replica_cpus: auto``: a share of a CPU, so several apps
fit on one small machine; its PyTorch threads are set apart (``deploy.app.cpu_threads``)."""
NUMA_AFFINITY = True
"""Keep each GPU replica's threads on the CPUs of its GPU's NUMA node."""
CUDA_GRAPHS = False
"""Torch backend on a GPU: run batches as CUDA graphs."""
COMPILE = False
"""Torch backend: run the model under torch.compile."""
STREAM_PER_BUCKET = True
"""GPU replicas: each bucket's batches on a CUDA stream of their own."""

# ----------------------------------------------------------------- requests
MAX_QUEUED_REQUESTS = 512
"""Requests queued per handle before Serve answers 503."""
MAX_BODY_BYTES = 64 << 20
"""Largest HTTP request body; larger ones get 413."""
REJECT_NONFINITE = True
"""Refuse inputs holding NaN or Inf (422)."""
REQUEST_TIMEOUT_S = 60.0
"""Longest time a request may take end to end, in seconds."""
