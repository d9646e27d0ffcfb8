"""EfficientFormer-V2 (timm ``EfficientFormerV2``): every convolution's BatchNorm folded, and both matmuls of
each ``Attention2d`` and ``Attention2dDownsample`` quantized (the attention biases and talking heads run in
float between them)."""
from __future__ import annotations

import torch
from timm.layers import ConvNormAct
from timm.layers.activations import GELU as TimmGELU
from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample, ConvNorm, EfficientFormerV2
from torch import nn

from .base import Adapter, add_qk_av_matmuls, bn_remainder, fold_batchnorm, morph, quantize_inputs_of


class QuantAttention2d(Attention2d):
    """timm's ``Attention2d.forward`` with ``q @ k`` and ``attn @ v`` quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if self.stride_conv is not None:
            x = self.stride_conv(x)
        q = self.q(x).reshape(B, self.num_heads, -1, self.N).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, self.N).permute(0, 1, 2, 3)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, self.N).permute(0, 1, 3, 2)
        attn = self.matmul_qk(q, k) * self.scale + self.get_attention_biases(x.device)
        attn = self.talking_head2(self.talking_head1(attn).softmax(dim=-1))
        x = self.matmul_av(attn, v).transpose(2, 3)
        x = x.reshape(B, self.dh, self.resolution[0], self.resolution[1]) + v_local
        if self.upsample is not None:
            x = self.upsample(x)
        return self.proj(self.act(x))


class QuantAttention2dDownsample(Attention2dDownsample):
    """timm's ``Attention2dDownsample.forward`` with ``q @ k`` and ``attn @ v`` quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.q(x).reshape(B, self.num_heads, -1, self.N2).permute(0, 1, 3, 2)
        k = self.k(x).reshape(B, self.num_heads, -1, self.N).permute(0, 1, 2, 3)
        v = self.v(x)
        v_local = self.v_local(v)
        v = v.reshape(B, self.num_heads, -1, self.N).permute(0, 1, 3, 2)
        attn = (self.matmul_qk(q, k) * self.scale + self.get_attention_biases(x.device)).softmax(dim=-1)
        x = self.matmul_av(attn, v).transpose(2, 3)
        x = x.reshape(B, self.dh, self.resolution2[0], self.resolution2[1]) + v_local
        return self.proj(self.act(x))


class EfficientFormerV2Adapter(Adapter):
    family = "efficientformerv2"

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, EfficientFormerV2)

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, (ConvNormAct, ConvNorm)) and isinstance(m.bn, nn.BatchNorm2d):
                fold_batchnorm(m.conv, m.bn)
                m.bn = bn_remainder(m.bn)  # the activation fused into timm's BatchNormAct2d stays

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [next(m for m in model.modules() if isinstance(m, nn.Conv2d))]

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) in (Attention2d, Attention2dDownsample):
                add_qk_av_matmuls(m, names[m])
                morph(m, QuantAttention2d if type(m) is Attention2d else QuantAttention2dDownsample)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        # the activations' inputs; the residual additions, layer scales and final norm stay float
        quantize_inputs_of(model, names, (nn.GELU, TimmGELU))
