"""LeViT (timm ``Levit``, token layout; the ``levit_conv_*`` layout is refused): every BatchNorm folded into
the Linear or convolution beside it, and both matmuls of each attention and attention-downsample quantized."""
from __future__ import annotations

import torch
from timm.models.levit import Attention, AttentionDownsample, ConvNorm, Levit, LinearNorm, NormLinear
from torch import nn

from .base import Adapter, add_qk_av_matmuls, fold_batchnorm, morph, quantize_inputs_of


@torch.no_grad()
def _fold_linear_norm(m: LinearNorm) -> None:
    """``bn(linear(x))`` -> one Linear with a bias (exact in real arithmetic)."""
    bn, lin = m.bn, m.linear
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    fused = nn.Linear(lin.in_features, lin.out_features)
    fused.weight.copy_(lin.weight * s[:, None])
    fused.bias.copy_(bn.bias - bn.running_mean * s)
    m.linear, m.bn = fused, nn.Identity()


@torch.no_grad()
def _fold_norm_linear(m: NormLinear) -> None:
    """``linear(bn(x))`` -> one Linear: ``W diag(s) x + (W t + b)`` with ``s, t`` the BatchNorm's scale and shift."""
    bn, lin = m.bn, m.linear
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    t = bn.bias - bn.running_mean * s
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device))
    lin.bias.add_(lin.weight @ t)
    lin.weight.mul_(s[None, :])
    m.bn = nn.Identity()


class QuantLevitAttention(Attention):
    """timm's LeViT ``Attention.forward`` (token layout) with ``q @ k`` and ``attn @ v`` quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = self.matmul_qk(q, k) * self.scale + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, N, self.val_attn_dim)
        return self.proj(x)


class QuantLevitAttentionDownsample(AttentionDownsample):
    """timm's LeViT ``AttentionDownsample.forward`` (token layout) with both matmuls quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        q = self.q(x).view(B, -1, self.num_heads, self.key_dim).permute(0, 2, 1, 3)
        attn = self.matmul_qk(q, k) * self.scale + self.get_attention_biases(x.device)
        attn = attn.softmax(dim=-1)
        x = self.matmul_av(attn, v).transpose(1, 2).reshape(B, -1, self.val_attn_dim)
        return self.proj(x)


class LevitAdapter(Adapter):
    family = "levit"

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, Levit) and not getattr(model, "use_conv", False)

    def prepare(self, model: nn.Module) -> None:
        for m in list(model.modules()):
            if isinstance(m, LinearNorm) and isinstance(m.bn, nn.BatchNorm1d):
                _fold_linear_norm(m)
            elif isinstance(m, ConvNorm) and isinstance(m.bn, nn.BatchNorm2d):
                fold_batchnorm(m.linear, m.bn)
                m.bn = nn.Identity()
            elif isinstance(m, NormLinear) and isinstance(m.bn, nn.BatchNorm1d):
                _fold_norm_linear(m)

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [next(m for m in model.modules() if isinstance(m, nn.Conv2d))]

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) in (Attention, AttentionDownsample):
                add_qk_av_matmuls(m, names[m])
                morph(m, QuantLevitAttention if type(m) is Attention else QuantLevitAttentionDownsample)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        # the activations' inputs; the residual additions stay float (coverage table)
        quantize_inputs_of(model, names, (nn.Hardswish, nn.GELU))
