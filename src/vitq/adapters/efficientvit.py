"""MIT EfficientViT-B (timm ``efficientvit_b*``): MBConv/DSConv convolutions with folded BatchNorm, and
LiteMLA's ReLU linear attention: the two matmuls (k^T v, then q (k^T v)) and the normalizing division."""
from __future__ import annotations

import torch
from timm.models.efficientvit_mit import ConvNormAct, EfficientVit, LiteMLA, ResidualBlock
from torch import nn

from ..quant.layers import QuantMatMul
from .base import PLACEHOLDER, Adapter, QuantAdd, bn_remainder, fold_batchnorm, morph, quantize_inputs_of


class QuantLiteMLA(LiteMLA):
    """LiteMLA with quantized matmul operands; in the full protocol the division's numerator and
    denominator are quantized too (``div``: ``x`` the numerator, ``branch`` the denominator)."""

    def _attn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = v.dtype
        q, k, v = q.float(), k.float(), v.float()
        kv = self.matmul_kv(k.transpose(-1, -2), v)
        out = self.matmul_qkv(q, kv)
        num, den = out[..., :-1], out[..., -1:]
        if self.div is not None:
            num, den = self.div.x_quant(num), self.div.b_quant(den)
        return (num / (den + self.eps)).to(dtype)


class QuantResidualBlock(ResidualBlock):
    """EfficientViT ``ResidualBlock`` with both inputs of the addition quantized (full protocol)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self.main(self.pre_norm(x))
        if self.shortcut is not None:
            res = self.residual.b_quant(res) + self.shortcut(self.residual.x_quant(x))
        return res


class ChannelsLast(nn.Module):
    """Runs an NCHW block on the trunk's channels-last features (``Adapter.trunk`` promises NHWC).

    The input is made contiguous NCHW again, so the block computes exactly what it computes inside the
    model (same memory layout, same float rounding)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)


class EfficientViTAdapter(Adapter):
    family = "efficientvit"

    def trunk(self, model: nn.Module):
        # timm's EfficientVit is stem, stages (each only a sequence of blocks: MBConv/DSConv ResidualBlocks,
        # then EfficientVitBlocks of LiteMLA context + MBConv local module), head; each block is a step.
        # Features are NCHW: the steps see and return NHWC so that the reconstruction loss normalizes per
        # pixel over channels (docs/methods.md, "Block reconstruction").
        def stem(x):
            return model.stem(x).permute(0, 2, 3, 1)

        def head(x):
            return model.forward_head(x.permute(0, 3, 1, 2).contiguous())

        return stem, [ChannelsLast(b) for stage in model.stages for b in stage.blocks], head

    def applies_to(self, model: nn.Module) -> bool:
        return isinstance(model, EfficientVit)

    def prepare(self, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, ConvNormAct) and isinstance(m.norm, nn.BatchNorm2d):
                fold_batchnorm(m.conv, m.norm)
                m.norm = bn_remainder(m.norm)

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [next(m for m in model.modules() if isinstance(m, nn.Conv2d))]

    def attach_matmuls(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) is LiteMLA:
                m.matmul_kv = QuantMatMul(f"{names[m]}.matmul_kv", "k", "v", PLACEHOLDER, PLACEHOLDER)
                m.matmul_qkv = QuantMatMul(f"{names[m]}.matmul_qkv", "q", "kv", PLACEHOLDER, PLACEHOLDER)
                # v is padded with a ones column, so the last output column is the normalizer that the
                # other columns are divided by (the hardware cost model counts these divisions).
                m.matmul_qkv.divides_output = True
                m.div = None
                morph(m, QuantLiteMLA)

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if isinstance(m, QuantLiteMLA):
                m.div = QuantAdd(f"{names[m]}.div")  # two inputs, like an addition
            if type(m) is ResidualBlock and m.shortcut is not None:
                m.residual = QuantAdd(f"{names[m]}.residual")
                morph(m, QuantResidualBlock)
        # Activation inputs (the conv outputs) and the head's LayerNorm. LiteMLA's kernel ReLU is applied to
        # q and to k separately; its outputs are already quantized as matmul operands, so it is skipped.
        kernels = {id(m.kernel_func) for m in model.modules() if isinstance(m, LiteMLA)}
        quantize_inputs_of(model, names, (nn.Hardswish, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LayerNorm), kernels)
