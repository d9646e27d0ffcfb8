"""One adapter per model family; :func:`adapter_for` picks the one that understands a model."""
from __future__ import annotations

from torch import nn

from .base import Adapter, attention_modules, attention_ops
from .cnn import CNNAdapter
from .efficientformer import EfficientFormerV2Adapter
from .efficientvit import EfficientViTAdapter
from .levit import LevitAdapter
from .mobilevit import MobileViTAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

# Order matters: the CNN adapter is the fallback for anything with convolutions.
ADAPTERS: tuple[Adapter, ...] = (ViTAdapter(), SwinAdapter(), EfficientViTAdapter(), LevitAdapter(), MobileViTAdapter(),
                                   EfficientFormerV2Adapter(), CNNAdapter())


class UnsupportedModel(ValueError):
    """A model no adapter covers, with what it looked like and what is missing."""


def adapter_for(model: nn.Module, what: str = "") -> Adapter:
    """The adapter of ``model``'s family, found by the model's module types (``what`` names the model in
    the error).

    Raises:
        UnsupportedModel: no adapter covers the model; the message names the model's class, the family it
            looked like and what is missing.
    """
    for a in ADAPTERS:
        if a.applies_to(model):
            return a
    name = f"{what}: {type(model).__name__}" if what else type(model).__name__
    attn = attention_modules(model)
    if attn:
        kinds = ", ".join(sorted({type(m).__name__ for m in attn}))
        raise UnsupportedModel(
            f"{name} looks like a vision transformer or a conv-transformer hybrid (attention modules: {kinds}), "
            f"but no vitq adapter places quantizers on its attention matmuls; supported: {SUPPORTED}")
    raise UnsupportedModel(f"{name} has neither convolutions nor attention vitq knows; supported: {SUPPORTED}")


def check_supported(model: nn.Module, what: str = "", input_size: tuple[int, ...] | None = None) -> Adapter:
    """:func:`adapter_for`, and for the convolutional fallback also one forward pass on a random image that
    must run no attention (softmax, or a matmul of two activations): a hybrid whose attention modules hold no
    head count (a linear attention no adapter knows) is refused here instead of being quantized as a CNN with
    its attention left in float.

    Raises:
        UnsupportedModel: as :func:`adapter_for`, or the fallback would leave attention in float.
    """
    what = what or f"model '{getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)}'"
    adapter = adapter_for(model, what)
    if adapter.family == "cnn":
        size = input_size or tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        ops = attention_ops(model, size)
        if ops:
            name = f"{what}: {type(model).__name__}"
            runs = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
            raise UnsupportedModel(f"{name} looks like a conv-transformer hybrid (its forward runs {runs}), but no "
                                   f"vitq adapter places quantizers on its attention; supported: {SUPPORTED}")
    return adapter


SUPPORTED = "ViT/DeiT/DeiT-III (VisionTransformer), Swin, EfficientViT (MIT), LeViT, MobileViT v1 and v2, EfficientFormer-V2, CNNs without attention"

__all__ = ["Adapter", "ADAPTERS", "SUPPORTED", "UnsupportedModel", "adapter_for", "check_supported"]
