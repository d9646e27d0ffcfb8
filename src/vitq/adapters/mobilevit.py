"""MobileViT (v1; timm ``ByobNet`` with ``MobileVitBlock``): convolution stages with BatchNorm folded, and
transformer blocks whose attention is timm's ``Attention``, given both quantized matmuls as in ViT."""
from __future__ import annotations

from timm.layers import ConvNormAct
from timm.layers.attention import Attention
from timm.models.byobnet import ByobNet
from timm.models.mobilevit import MobileVitBlock
from torch import nn

from .base import Adapter, bn_remainder, fold_batchnorm, morph, quantize_inputs_of
from .vit import QuantViTAttention, attach_attention_matmuls


class MobileViTAdapter(Adapter):
    family = "mobilevit"

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, ByobNet) and any(isinstance(m, MobileVitBlock) for m in model.modules())

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, ConvNormAct) and isinstance(m.bn, nn.BatchNorm2d):
                fold_batchnorm(m.conv, m.bn)
                m.bn = bn_remainder(m.bn)  # the activation fused into timm's BatchNormAct2d stays
            if isinstance(m, Attention):
                m.fused_attn = False  # the explicit matmuls are what gets quantized

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [model.stem.conv] if isinstance(getattr(model.stem, "conv", None), nn.Conv2d) else []

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) is Attention:
                attach_attention_matmuls(m, names[m])
                morph(m, QuantViTAttention)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        # the activations' inputs; the residual additions and LayerNorms stay float (coverage table)
        quantize_inputs_of(model, names, (nn.SiLU, nn.GELU))
