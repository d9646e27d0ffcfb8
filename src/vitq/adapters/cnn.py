"""Plain CNNs, with timm's EfficientNet family (MBConv blocks) as the worked case: BatchNorm folded into
the convolutions, residual additions and activation inputs quantized in the full protocol."""
from __future__ import annotations

import torch
from timm.models._efficientnet_blocks import ConvBnAct, DepthwiseSeparableConv, EdgeResidual, InvertedResidual
from torch import nn

from .base import Adapter, QuantAdd, attention_modules, bn_remainder, fold_batchnorm, morph, quantize_inputs_of

# (conv, bn) attribute pairs of timm's EfficientNet building blocks, in forward order.
BN_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    EdgeResidual: (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
    ConvBnAct: (("conv", "bn1"),),
}
MODEL_BN_PAIRS = (("conv_stem", "bn1"), ("conv_head", "bn2"))
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)


def _skip_forward(self, x: torch.Tensor, body) -> torch.Tensor:
    shortcut = x
    x = body(self, x)
    if self.has_skip:
        x = self.residual.b_quant(self.drop_path(x)) + self.residual.x_quant(shortcut)
    return x


class QuantDepthwiseSeparableConv(DepthwiseSeparableConv):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def body(m, x):
            return m.bn2(m.conv_pw(m.se(m.aa(m.bn1(m.conv_dw(x))))))
        return _skip_forward(self, x, body)


class QuantInvertedResidual(InvertedResidual):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def body(m, x):
            x = m.bn2(m.conv_dw(m.bn1(m.conv_pw(x))))
            return m.bn3(m.conv_pwl(m.se(m.aa(x))))
        return _skip_forward(self, x, body)


QUANT_BLOCKS = {DepthwiseSeparableConv: QuantDepthwiseSeparableConv, InvertedResidual: QuantInvertedResidual}


class CNNAdapter(Adapter):
    """Fallback for convolutional models; knows timm's EfficientNet blocks."""

    family = "cnn"

    def applies_to(self, model: nn.Module) -> bool:
        # a convolutional model with attention modules is a hybrid: its attention matmuls need an adapter
        return any(isinstance(m, nn.Conv2d) for m in model.modules()) and not attention_modules(model)

    def prepare(self, model: nn.Module) -> None:
        owners = [(model, MODEL_BN_PAIRS)] + [(m, BN_PAIRS[type(m)]) for m in model.modules() if type(m) in BN_PAIRS]
        for owner, pairs in owners:
            for conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name, None), getattr(owner, bn_name, None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    if getattr(owner, "conv_s2d", None) is not None:
                        raise NotImplementedError("space-to-depth EfficientNet blocks are not supported")
                    fold_batchnorm(conv, bn)
                    setattr(owner, bn_name, bn_remainder(bn))

    def first_layers(self, model: nn.Module) -> list[nn.Module]:
        return [next(m for m in model.modules() if isinstance(m, nn.Conv2d))]

    def attach_full(self, model: nn.Module, names: dict[nn.Module, str]) -> None:
        for m in list(model.modules()):
            if type(m) in QUANT_BLOCKS and m.has_skip:
                m.residual = QuantAdd(f"{names[m]}.residual")
                morph(m, QUANT_BLOCKS[type(m)])
        quantize_inputs_of(model, names, ACTIVATIONS)
