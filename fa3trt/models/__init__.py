"""Models: the reference transformer and every model source, described by its signature."""

from fa3trt.models.reference import ModelConfig, Transformer, build_model, save_weights

__all__ = ["ModelConfig", "Transformer", "build_model", "save_weights"]
