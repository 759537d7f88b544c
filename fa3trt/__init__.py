"""fa3trt: FlashAttention-3 inside TensorRT engines, served on Ray.

Importing this package needs neither TensorRT, CUDA nor FA3: those are imported lazily by the
modules that use them (``fa3trt.trt._trt`` alone imports TensorRT; ``fa3trt.attention.kernels.fa3`` alone FA3).
"""

from fa3trt.attention.compiled import compile_routed
from fa3trt.attention.op import attention
from fa3trt.attention.routing import RoutingReport, route_attention
from fa3trt.errors import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    BuildItemError,
    ConfigError,
    CudnnGraphUnsupportedError,
    DeadlineError,
    EngineBuildError,
    EngineCorruptError,
    EngineExecutionError,
    EngineMismatchError,
    EngineNotFoundError,
    ExportError,
    Fa3TrtError,
    InvalidInputError,
    MissingDependencyError,
    PluginNotRegisteredError,
    RayUnavailableError,
    RequestError,
)
from fa3trt.models.reference import ModelConfig, build_model, save_weights
from fa3trt.onnx.export import export_onnx
from fa3trt.serving.backends import load_backend
from fa3trt.trt import available as tensorrt_available

__all__ = [
    "attention",
    "route_attention",
    "compile_routed",
    "RoutingReport",
    "tensorrt_available",
    "ModelConfig",
    "build_model",
    "save_weights",
    "export_onnx",
    "load_backend",
    "Fa3TrtError",
    "InvalidInputError",
    "RequestError",
    "ConfigError",
    "DeadlineError",
    "MissingDependencyError",
    "ArtifactNotFoundError",
    "ArtifactCorruptError",
    "EngineNotFoundError",
    "EngineMismatchError",
    "EngineCorruptError",
    "EngineBuildError",
    "EngineExecutionError",
    "BuildItemError",
    "RayUnavailableError",
    "PluginNotRegisteredError",
    "ExportError",
    "CudnnGraphUnsupportedError",
]
__version__ = "0.1.0"
