"""MobileViT v1 and v2 (timm ``ByobNet`` with ``MobileVitBlock`` or ``MobileVitV2Block``): convolution stages
with BatchNorm folded; v1's attention is timm's ``Attention``, given both quantized matmuls as in ViT; v2's
separable linear attention gets its two activation products as quantized matmuls."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.layers.attention import Attention
from timm.models.byobnet import ByobNet
from timm.models.mobilevit import LinearSelfAttention, MobileVitBlock, MobileVitV2Block
from torch import nn

from ..quant.layers import QuantMatMul
from .base import PLACEHOLDER, Adapter, bn_remainder, fold_batchnorm, morph, quantize_inputs_of
from .vit import QuantViTAttention, attach_attention_matmuls


class QuantLinearSelfAttention(LinearSelfAttention):
    """MobileViT-v2's separable self-attention with both of its activation products quantized.

    ``(key * softmax(query)).sum(-1)`` is a matmul over the N patches of each position (``matmul_context``:
    key, context scores), and ``relu(value) * context`` a product with inner size 1 (``matmul_out``: value,
    context vector); written as matmuls they equal timm's forward in real arithmetic and run on the same
    integer engine as ViT's attention.
    """

    def _forward_self_attn(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv_proj(x).split([1, self.embed_dim, self.embed_dim], dim=1)
        scores = self.attn_drop(F.softmax(query, dim=-1))  # [B, 1, P, N]
        # [B, P, d, N] @ [B, P, N, 1] -> [B, P, d, 1] -> [B, d, P, 1]
        context = self.matmul_context(key.transpose(1, 2), scores.permute(0, 2, 3, 1)).transpose(1, 2)
        # [B, d, P, N, 1] @ [B, d, P, 1, 1] -> [B, d, P, N]
        out = self.matmul_out(F.relu(value).unsqueeze(-1), context.unsqueeze(-1)).squeeze(-1)
        return self.out_drop(self.out_proj(out))


class MobileViTAdapter(Adapter):
    family = "mobilevit"

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, ByobNet) and any(isinstance(m, (MobileVitBlock, MobileVitV2Block))
                                                  for m in model.modules())

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
            elif type(m) is LinearSelfAttention:
                m.matmul_context = QuantMatMul(f"{names[m]}.matmul_context", "k", "attn", PLACEHOLDER, PLACEHOLDER)
                m.matmul_out = QuantMatMul(f"{names[m]}.matmul_out", "v", "context", PLACEHOLDER, PLACEHOLDER)
                morph(m, QuantLinearSelfAttention)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        # the activations' inputs; the residual additions and norms stay float (coverage table)
        quantize_inputs_of(model, names, (nn.SiLU, nn.GELU))
