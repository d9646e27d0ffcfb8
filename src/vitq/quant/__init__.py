"""Quantization engine: pure quantizers, observers, quantized layers, config and calibration."""
from .config import ConfigError, LayerRule, QuantConfig, TensorSpec
from .engine import apply_config, calibrate, model_stats, all_quantizers, prepare, quantize, tensor_table

__all__ = ["ConfigError", "LayerRule", "QuantConfig", "TensorSpec", "apply_config", "calibrate",
           "model_stats", "prepare", "quantize", "all_quantizers", "tensor_table"]
