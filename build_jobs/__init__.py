"""Ray tasks that build engines in parallel, one per (GPU type, engine spec), and their CLI.

``build_all(config)`` plans one item per (fa3trt application of the serve config, GPU type of
the Ray cluster), skips those already in the store, and runs the rest as Ray tasks (one GPU
each) that register the TensorRT plugin and build the engine, or, with the torch backend,
export and verify the ONNX. ``python -m build_jobs`` is the CLI.
"""

from build_jobs.plan import BuildItem, compute_plan, gpu_types
from build_jobs.runner import BuildResult, build_all, load_specs
from fa3trt.errors import BuildItemError

__all__ = ["build_all", "BuildResult", "BuildItem", "BuildItemError", "compute_plan", "gpu_types", "load_specs"]
