"""What each compute layer of a quantized model asks of the hardware, from one real forward pass.

A :class:`Workload` holds one layer's real shapes (per image) and its bit-widths and weight scheme:
MACs, weight count, input operand sizes and output size. Linears and convolutions (dense, grouped,
depthwise) carry weights; activation x activation matmuls (attention's q k^T and softmax v, LiteMLA's
k^T v and q (k^T v)) carry two activation operands; LiteMLA's normalizing division is its own workload.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..quant.config import SHIFT_SCHEMES
from ..quant.engine import all_quantizers
from ..quant.layers import QuantConv2d, QuantLinear, QuantMatMul

POT_OPS = ("linear", "conv", "gconv", "dwconv")  # weight ops that run on the shift-add engine when (A)PoT


@dataclass(frozen=True)
class Workload:
    """One layer, per image.

    Attributes:
        name: the layer name (as in QuantConfig rules).
        op: ``linear``, ``conv`` (dense, any kernel), ``gconv`` (grouped), ``dwconv`` (depthwise),
            ``matmul`` (activation x activation) or ``div`` (elementwise division).
        macs: multiply-accumulates (for ``div``: one multiply per element).
        weight_elems: weight values (0 for matmul and div).
        in_elems: values of the activation operand(s): one entry for weight layers, two for matmuls.
        out_elems: output values.
        w_bits: weight bits (for a matmul: the second operand's bits).
        a_bits: activation bits (for a matmul: the first operand's bits).
        scheme: weight scheme, ``uniform``, ``pot``, ``apot`` or ``mixed`` (per output channel uniform or
            APoT; ``shift_share`` of the channels on APoT).
        kernel: convolution kernel size (1 for linears and matmuls).
        shift_share: the fraction of the MACs on the shift-add engine (1 for ``pot``/``apot`` weight layers).
    """

    name: str
    op: str
    macs: int
    weight_elems: int
    in_elems: tuple[int, ...]
    out_elems: int
    w_bits: int
    a_bits: int
    scheme: str = "uniform"
    kernel: int = 1
    shift_share: float = 0.0

    @property
    def share(self) -> float:
        """The fraction of this layer's MACs on the shift-add engine."""
        if self.op not in POT_OPS:
            return 0.0
        if self.scheme in SHIFT_SCHEMES:
            return 1.0
        return self.shift_share if self.scheme == "mixed" else 0.0

    @property
    def engine(self) -> str:
        """``shift`` for (A)PoT weights on a linear or conv, ``split`` for a layer whose output channels are
        divided between the engines, else ``mac``."""
        share = self.share
        return "mac" if share == 0 else ("shift" if share == 1 else "split")

    @property
    def pot_eligible(self) -> bool:
        """M2-ViT's rule: linears and 1x1 dense convs may take PoT weights; depthwise, grouped and
        larger-kernel convs stay uniform (few weights, wide distributions)."""
        return self.op == "linear" or (self.op == "conv" and self.kernel == 1)

    def with_bits(self, w_bits: int | None = None, a_bits: int | None = None, scheme: str | None = None,
                  shift_share: float | None = None) -> Workload:
        return replace(self, w_bits=self.w_bits if w_bits is None else w_bits,
                       a_bits=self.a_bits if a_bits is None else a_bits,
                       scheme=self.scheme if scheme is None else scheme,
                       shift_share=self.shift_share if shift_share is None else shift_share)


def _shift_share(q) -> float:
    """The fraction of a weight quantizer's output channels on the APoT grid (``mixed``), else 0."""
    mask = q.apot_mask
    if q.spec.scheme != "mixed" or mask is None:
        return 0.0
    return float(mask.float().mean())


def _conv_op(m: nn.Conv2d) -> str:
    if m.groups == 1:
        return "conv"
    return "dwconv" if m.groups == m.in_channels else "gconv"


@torch.inference_mode()
def extract_workloads(model: nn.Module, input_size: tuple[int, int, int]) -> list[Workload]:
    """Run one image of ``input_size`` (C, H, W) through a prepared model and describe every compute layer.

    Quantizers are switched off for the pass (shapes do not depend on them; observers must not see a
    dummy image) and restored afterwards. Bits and schemes come from the quantizers' specs.
    """
    quantizers = all_quantizers(model)
    modes = [q.mode for q in quantizers]
    found: list[Workload] = []
    hooks = []

    def on_linear(m, args, out):
        x = args[0]
        found.append(Workload(m.layer_name, "linear", x.numel() // m.in_features * m.in_features * m.out_features,
                              m.weight.numel(), (x.numel(),), out.numel(), m.w_quant.spec.bits,
                              m.in_quant.spec.bits, m.w_quant.spec.scheme, shift_share=_shift_share(m.w_quant)))

    def on_conv(m, args, out):
        k = m.weight.shape[1] * m.weight.shape[2] * m.weight.shape[3]
        found.append(Workload(m.layer_name, _conv_op(m), out.numel() * k, m.weight.numel(), (args[0].numel(),),
                              out.numel(), m.w_quant.spec.bits, m.in_quant.spec.bits, m.w_quant.spec.scheme,
                              kernel=int(m.weight.shape[-1]), shift_share=_shift_share(m.w_quant)))

    def on_matmul(m, args, out):
        a, b = args
        found.append(Workload(m.layer_name, "matmul", a.numel() * b.shape[-1], 0, (a.numel(), b.numel()),
                              out.numel(), m.b_quant.spec.bits, m.a_quant.spec.bits))
        if getattr(m, "divides_output", False):  # the adapter marks matmuls whose last column normalizes
            n = out[..., :-1].numel()
            found.append(Workload(m.layer_name + ".div", "div", n, 0, (out.numel(),), n, 0, 0))

    for m in model.modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_hook(on_linear))
        elif isinstance(m, QuantConv2d):
            hooks.append(m.register_forward_hook(on_conv))
        elif isinstance(m, QuantMatMul):
            hooks.append(m.register_forward_hook(on_matmul))
    try:
        for q in quantizers:
            q.mode = "off"
        p = next(model.parameters())
        model(torch.zeros(1, *input_size, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        for q, mode in zip(quantizers, modes):
            q.mode = mode
    return found
