"""Serving: the backends that run a batch (torch, TensorRT, identity), CUDA graphs, and batch
assembly."""

from fa3trt.serving.backends import load_backend

__all__ = ["load_backend"]
