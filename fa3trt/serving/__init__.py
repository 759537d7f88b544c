"""Serving: the backends that run a batch of any model (torch, TensorRT, identity), batch
assembly, CUDA graphs, and what a replica runs before it takes traffic.

- ``backends``: the ``Backend`` protocol, ``load_backend`` and the identity backend;
- ``torch_backend`` and ``tensorrt_backend``: the model under routing, and this GPU's engine;
- ``batch``: checked requests to a batch on the device (pinned staging, conversion and NaN/Inf
  on the device) and its output back to answers;
- ``graphs``: CUDA graphs of any model that qualifies;
- ``warmup``: warm-up batches, the health request and the padding check.
"""

from fa3trt.serving.backends import Backend, IdentityBackend, load_backend

__all__ = ["Backend", "IdentityBackend", "load_backend"]
