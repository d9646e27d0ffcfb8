"""One adapter per model family; :func:`adapter_for` picks the one that understands a model."""
from __future__ import annotations

from torch import nn

from .base import Adapter
from .cnn import CNNAdapter
from .efficientvit import EfficientViTAdapter
from .swin import SwinAdapter
from .vit import ViTAdapter

# Order matters: the CNN adapter is the fallback for anything with convolutions.
ADAPTERS: tuple[Adapter, ...] = (ViTAdapter(), SwinAdapter(), EfficientViTAdapter(), CNNAdapter())


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of ``model``'s family.

    Raises:
        ValueError: no adapter understands the model.
    """
    for a in ADAPTERS:
        if a.applies_to(model):
            return a
    raise ValueError(f"no vitq adapter supports {type(model).__name__} (supported: ViT/DeiT, Swin, EfficientViT, CNNs)")


__all__ = ["Adapter", "ADAPTERS", "adapter_for"]
