"""Quantization engine: pure quantizers, observers, quantized layers, config and calibration.

Names are imported on first use, so the adapters can import ``quant.config`` without pulling in the
engine, which imports the adapters.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {"ConfigError": ".config", "LayerRule": ".config", "QuantConfig": ".config", "TensorSpec": ".config",
         **{n: ".engine" for n in ("apply_config", "calibrate", "model_stats", "all_quantizers", "prepare",
                                   "quantize", "tensor_table")}}
__all__ = ["ConfigError", "LayerRule", "QuantConfig", "TensorSpec", "apply_config", "calibrate",
           "model_stats", "prepare", "quantize", "all_quantizers", "tensor_table"]

__getattr__ = lazy_exports(__name__, _LAZY)
