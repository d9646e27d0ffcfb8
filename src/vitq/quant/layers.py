"""Quantized layers: the modules that hold quantization parameters and apply the pure quantizers.

* :class:`TensorQuantizer` (``tensor_quantizer.py``, re-exported here) quantizes one tensor (a weight, or an
  activation seen at run time).
* :class:`QuantLinear` / :class:`QuantConv2d` are ``nn.Linear`` / ``nn.Conv2d`` with a weight quantizer
  and an input quantizer. Existing modules are converted in place (:func:`to_quant_linear`), so they
  keep their names, parameters and ``isinstance`` relations.
* :class:`QuantMatMul` is an activation x activation matmul with both operands quantized.
* :func:`add_input_quantizer` quantizes the input of any module (LayerNorm, GELU, Softmax, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same
from torch import nn

from . import quantizers as Q
from .config import TensorSpec
from .tensor_quantizer import MODES, TensorQuantizer

__all__ = ["MODES", "TensorQuantizer", "QuantLinear", "QuantConv2d", "QuantMatMul", "to_quant_linear",
           "to_quant_conv", "add_input_quantizer"]


class _WeightQuantMixin:
    """Shared by QuantLinear and QuantConv2d: a cached fake-quantized weight and MAC counting."""

    w_quant: TensorQuantizer
    in_quant: TensorQuantizer

    def _init_quant(self, name: str, w_spec: TensorSpec, a_spec: TensorSpec) -> None:
        self.layer_name = name
        self.w_quant = TensorQuantizer(name, "weight", w_spec, is_weight=True)
        self.in_quant = TensorQuantizer(name, "input", a_spec)
        self.macs = 0  # accumulated while observing; divided by the number of images by the engine
        self._wq: torch.Tensor | None = None
        self._w_codes: torch.Tensor | None = None  # integer codes while the weight scale is learned
        self.w_log_scale: torch.Tensor | None = None

    def begin_weight_scale_learning(self) -> torch.Tensor | None:
        """Freeze the weight's integer codes and make its (per-channel) scale learnable.

        Returns the log-scale tensor for the optimizer, or None where the grid is not a symmetric
        uniform per-channel / per-tensor one."""
        q = self.w_quant
        if q.mode != "quant" or q.spec.scheme != "uniform" or q.spec.granularity not in ("per_channel", "per_tensor"):
            return None
        with torch.no_grad():
            shape = [-1] + [1] * (self.weight.dim() - 1) if q.scale.numel() > 1 else []
            scale, zero_point = q.scale.reshape(shape), q.zero_point.reshape(shape)
            self._w_codes = Q.quantize_uniform(self.weight, scale, zero_point, *q._qrange()) - zero_point
        self.w_log_scale = scale.log().clone().requires_grad_(True)
        return self.w_log_scale

    def end_weight_scale_learning(self) -> None:
        """Write the weight back on the learned grid (same integers, new scale)."""
        if self.w_log_scale is None:
            return
        with torch.no_grad():
            scale = self.w_log_scale.exp()
            self.weight.copy_(self._w_codes * scale)
            self.w_quant.set_uniform_scale(scale)
        self._w_codes = self.w_log_scale = None
        self.refresh()

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight, computed once after calibration and cached (it never changes
        during evaluation, so evaluation pays only for the activation quantizers)."""
        if self.w_log_scale is not None:
            return self._w_codes * self.w_log_scale.exp()
        if self.w_quant.mode != "quant":
            return self.weight
        if self._wq is None:
            with torch.no_grad():
                self._wq = self.w_quant.fake_quant(self.weight)
        return self._wq

    def refresh(self) -> None:
        """Drop the cached quantized weight (after the weight or its quantizer changed)."""
        self._wq = None


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """``nn.Linear`` with quantized weight and input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x)
        if self.in_quant.mode == "observe":
            self.macs += x.numel() // x.shape[-1] * self.in_features * self.out_features
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, _WeightQuantMixin):
    """``nn.Conv2d`` with quantized weight and input."""

    same_padding = False  # set for timm's Conv2dSame (TensorFlow 'SAME' padding computed per input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x)
        if self.same_padding:
            # Padding adds exact zeros after quantization, as an integer kernel with zero-point padding would.
            x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        y = self._conv_forward(x, self.quantized_weight(), self.bias)
        if self.in_quant.mode == "observe":
            k = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]  # in/groups * kh * kw
            self.macs += y.numel() * k
        return y


class QuantMatMul(nn.Module):
    """Activation x activation matmul ``a @ b`` with both operands quantized."""

    def __init__(self, name: str, a_role: str, b_role: str, a_spec: TensorSpec, b_spec: TensorSpec):
        super().__init__()
        self.layer_name = name
        self.a_quant = TensorQuantizer(name, a_role, a_spec)
        self.b_quant = TensorQuantizer(name, b_role, b_spec)
        self.macs = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.a_quant(a), self.b_quant(b)
        if self.a_quant.mode == "observe":
            self.macs += a.numel() * b.shape[-1]
        return a @ b


def to_quant_linear(m: nn.Linear, name: str, w_spec: TensorSpec, a_spec: TensorSpec) -> QuantLinear:
    """Convert an ``nn.Linear`` in place (same parameters, same module path)."""
    m.__class__ = QuantLinear
    m._init_quant(name, w_spec, a_spec)
    weight = m.weight
    # The layer-output MSE objective needs the layer's own weight applied to a sample of inputs.
    m.in_quant.output_fn = lambda x: F.linear(x, weight)
    return m


def to_quant_conv(m: nn.Conv2d, name: str, w_spec: TensorSpec, a_spec: TensorSpec) -> QuantConv2d:
    """Convert an ``nn.Conv2d`` (or timm's ``Conv2dSame``) in place."""
    same = isinstance(m, Conv2dSame)
    m.__class__ = QuantConv2d
    m.same_padding = same
    m._init_quant(name, w_spec, a_spec)
    return m


def _quantize_first_arg(module: nn.Module, args):
    return (module.in_quant(args[0]),) + tuple(args[1:])


def add_input_quantizer(module: nn.Module, name: str, spec: TensorSpec) -> TensorQuantizer:
    """Quantize the (first) input of any module, e.g. a LayerNorm, GELU or Softmax in the full protocol.

    The quantizer is registered as ``module.in_quant`` and applied by a forward pre-hook, so the
    module's own code and parameters stay untouched.
    """
    module.in_quant = TensorQuantizer(name, "input", spec)
    module.register_forward_pre_hook(_quantize_first_arg)
    return module.in_quant
