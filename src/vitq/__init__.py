"""vitq: post-training quantization of vision transformers (MPTQ-ViT, M2-ViT) on timm models.

The public names are imported on first use, so ``vitq --help`` and the command line's start-up do not
wait for torch.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"
_LAZY = {"EvalResult": ".evaluation", "evaluate": ".evaluation", "LayerRule": ".quant", "QuantConfig": ".quant",
         "quantize": ".api", "QuantizeResult": ".api", "CostBudget": ".api", "SearchOptions": ".api",
         "Budget": ".methods.greedy_mp", "MethodOptions": ".methods.mptq", "load_model": ".zoo"}
__all__ = ["Budget", "CostBudget", "EvalResult", "LayerRule", "MethodOptions", "QuantConfig", "QuantizeResult",
           "SearchOptions", "evaluate", "load_model", "quantize", "__version__"]

__getattr__ = lazy_exports(__name__, _LAZY)
