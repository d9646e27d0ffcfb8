"""vitq: post-training quantization of vision transformers (MPTQ-ViT, M2-ViT) on timm models."""
from .evaluate import EvalResult, evaluate
from .quant import LayerRule, QuantConfig, quantize
from .zoo import load_model

__version__ = "0.1.0"
__all__ = ["EvalResult", "LayerRule", "QuantConfig", "evaluate", "load_model", "quantize", "__version__"]
