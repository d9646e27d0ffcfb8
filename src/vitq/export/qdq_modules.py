"""How each vitq quantizer and layer is written as quantize/dequantize (QDQ) pairs: the module tree that
``torch.onnx`` (ONNX) and ``torch.export`` (PT2E) trace.

A pair is one fake-quantize op for ONNX (its exporter writes ``QuantizeLinear`` / ``DequantizeLinear``) or
torch's ``quantized_decomposed`` quantize and dequantize ops for PT2E (``decomposed``; Inductor's x86 passes
fuse them with the GEMMs and convolutions into oneDNN int8 kernels). Every quantizer is written so that the
graph computes the simulation's values:

* a uniform activation grid of 2-8 bits (per tensor, or per channel: PTF) is a ``QuantizeLinear`` /
  ``DequantizeLinear`` pair on the int8 (symmetric) or uint8 (asymmetric) grid with vitq's scale and zero
  point, after a clip to the grid's own range when it has fewer than 8 bits: the codes are then exactly
  vitq's, and ONNX Runtime's integer kernels still take the pair;
* per-position power-of-two factors (token shifts) divide the tensor before the pair and multiply it after
  (both exact in float);
* a two-region grid (OPT-m) is computed by the same float operations as the simulation (divide, round, clip,
  multiply, select at the boundary); when its levels fit the int8/uint8 grid of the fine step, a pair on that
  grid follows, so integer kernels run on it;
* weights are the simulation's quantized values; those on a per-channel or per-tensor grid whose codes fit
  int8 (uniform symmetric of at most 8 bits, power-of-two of at most 4 bits) are written as int8 codes with
  their scales, the others as float constants (still exact).

A power-of-two activation grid cannot be written this way (:func:`activation_exact` says why): the ONNX
export refuses it unless asked to approximate, and then leaves that tensor in float; the PT2E program runs
the simulation's own float operations for it (``simulate``), exact but without an integer kernel.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import quantizers as Q
from ..quant.layers import QuantConv2d, QuantLinear, TensorQuantizer


def activation_exact(q: TensorQuantizer, signed: bool = False) -> str:
    """Why an activation quantizer cannot be written exactly in ONNX ("" when it can); ``signed``: on signed
    int8 with zero point 0 only (TensorRT)."""
    if q.mode != "quant":
        return ""
    s = q.spec
    if s.scheme == "pot":
        return f"{s.bits}-bit power-of-two activation grid"
    if s.scheme not in ("uniform", "two_region"):
        return f"{s.scheme} activation grid"
    if signed and s.scheme == "two_region" and not two_region_fits(q, True):
        return f"{s.bits}-bit two-region grid with ratio 2^{int(q.region_m)}: over int8 on its fine step"
    if signed and s.scheme == "uniform" and not s.symmetric:
        z = q.zero_point.reshape(-1)
        if float(z.max()) > 128 or 2 ** s.bits - 1 - float(z.min()) > 127:
            return f"{s.bits}-bit asymmetric grid with zero point {int(z.max())}: outside signed int8 with zero point 0"
    return ""


def two_region_fits(q: TensorQuantizer, signed: bool = False) -> bool:
    """Whether a two-region grid's levels lie on the int8 (signed fine region, or ``signed``) or uint8 grid of
    its fine step."""
    n, _, fmin, _ = Q._two_region_grid(q.scale, int(q.region_m), q.spec.bits, q.spec.symmetric)
    top = (n - 1) * 2 ** int(q.region_m)
    return (top <= 127 and fmin >= -128) if (q.spec.symmetric or signed) else top <= 255


def activation_integer(q: TensorQuantizer) -> bool:
    """Whether the exported activation ends in a QDQ pair (so integer kernels can take it)."""
    if q.mode != "quant" or activation_exact(q):
        return False
    return two_region_fits(q) if q.spec.scheme == "two_region" else True


def _decomposed():
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    return torch.ops.quantized_decomposed


def qdq_per_tensor(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                   decomposed: bool = False) -> torch.Tensor:
    """``x`` through a per-tensor QDQ pair on ``[qmin, qmax]`` (int8 when ``qmin < 0``, else uint8)."""
    if not decomposed:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    qd, dtype = _decomposed(), torch.int8 if qmin < 0 else torch.uint8
    q = qd.quantize_per_tensor(x, scale, zero_point, qmin, qmax, dtype)
    return qd.dequantize_per_tensor(q, scale, zero_point, qmin, qmax, dtype)


def qdq_per_channel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, qmin: int,
                    qmax: int, decomposed: bool = False) -> torch.Tensor:
    """``x`` through a QDQ pair per slice along ``axis`` on ``[qmin, qmax]``."""
    if not decomposed:
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis, qmin, qmax)
    qd, dtype, z = _decomposed(), torch.int8 if qmin < 0 else torch.uint8, zero_point.to(torch.int64)
    q = qd.quantize_per_channel(x, scale, z, axis, qmin, qmax, dtype)
    return qd.dequantize_per_channel(q, scale, z, axis, qmin, qmax, dtype)


def _qdq_int8(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None,
              signed: bool = False, decomposed: bool = False) -> torch.Tensor:
    """``x`` on vitq's uniform grid ``[qmin, qmax]`` written as a clip and an int8/uint8 QDQ pair; ``signed``:
    on int8 with zero point 0 (the grid's codes minus its zero point, which :func:`activation_exact` checked
    fit)."""
    q8 = (-128, 127) if qmin < 0 or signed else (0, 255)
    if axis is None:
        s, z = float(scale), int(zero_point)  # Python numbers already when traced by torch.export
        x = x.clamp((qmin - z) * s, (qmax - z) * s) if (qmin, qmax) != q8 or signed else x
        return qdq_per_tensor(x, s, 0 if signed else z, *q8, decomposed=decomposed)
    axis = axis % x.dim()
    shape = [1] * x.dim()
    shape[axis] = -1
    s, z = scale.reshape(-1).float(), zero_point.reshape(-1).round().to(torch.int32)
    if (qmin, qmax) != q8 or signed:
        lo, hi = ((qmin - z) * s).reshape(shape), ((qmax - z) * s).reshape(shape)
        x = torch.minimum(torch.maximum(x, lo), hi)
    return qdq_per_channel(x, s, torch.zeros_like(z) if signed else z, axis, *q8, decomposed=decomposed)


class ExportQuantizer(TensorQuantizer):
    """A quantizer as an exporter sees it (module docstring); ``approximate`` quantizers pass their input
    through, ``simulate`` ones run the simulation's float operations. Every number the trace needs as a
    Python value is read once by :meth:`freeze` (``torch.export`` cannot read tensors while tracing)."""

    approximate = False
    simulate = False
    signed = False  # signed int8 with zero point 0 (TensorRT)
    decomposed = False  # torch.export's quantize/dequantize ops instead of fake-quantize

    def freeze(self) -> None:
        self.consts = {}
        if self.mode != "quant":
            return
        s, c = self.spec, self.consts
        c["negative"] = bool(self.range_min < 0) if s.scheme == "pot" else False
        if s.scheme == "two_region":
            c["m"] = int(self.region_m)
            c["fits"] = two_region_fits(self, self.signed)
            c["fine"] = float(self.scale) / 2 ** c["m"]
        elif self.scale.numel() == 1:
            c["scale"], c["zero_point"] = float(self.scale), int(self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode != "quant" or self.approximate:
            return x
        s, c = self.spec, self.consts
        if s.scheme == "pot":  # no QDQ form: the simulation's operations (activation_exact refuses otherwise)
            return Q.fake_quant_pot(x, self.scale, s.bits, signed=c["negative"])
        if s.scheme == "two_region":
            y = Q.fake_quant_two_region(x, self.scale, c["m"], self.boundary, s.bits, signed_fine=s.symmetric)
            if not c["fits"] or self.simulate:
                return y
            q8 = (-128, 127) if s.symmetric or self.signed else (0, 255)
            return qdq_per_tensor(y, c["fine"], 0, *q8, decomposed=self.decomposed)
        if self.simulate:
            return self.fake_quant(x)
        f = self.token_factor(x)
        xs = x if f is None else x / f
        scale, zero_point = (c["scale"], c["zero_point"]) if "scale" in c else (self.scale, self.zero_point)
        y = _qdq_int8(xs, scale, zero_point, *self._qrange(), self.channel_axis, self.signed, self.decomposed)
        return y if f is None else y * f


def weight_int8(m) -> tuple[torch.Tensor, int | None] | None:
    """The int8 step of a layer's quantized weight, per output channel (or one), or None when its codes do not
    fit int8 on one step per channel (per-group grids, power-of-two grids over 4 bits, asymmetric grids)."""
    q = m.w_quant
    s = q.spec
    if q.mode != "quant" or s.granularity not in ("per_channel", "per_tensor"):
        return None
    if s.scheme == "uniform":
        if not s.symmetric or s.bits > 8 or not bool((q.zero_point == 0).all()):
            return None
        return q.scale.reshape(-1).float(), (None if q.scale.numel() == 1 else 0)
    if s.scheme == "pot":
        levels = Q.pot_num_levels(s.bits, True)
        if 2 ** (levels - 1) > 127:
            return None
        # the smallest level 2^(p - (L-1)) is the step; every level is an integer multiple of it
        return torch.exp2(q.scale.reshape(-1).float() - (levels - 1)), (None if q.scale.numel() == 1 else 0)
    return None


def _int8_weight(w: torch.Tensor, grid: tuple[torch.Tensor, int | None], axis: int) -> torch.Tensor:
    """``w`` (already on the grid) under an int8 QDQ pair on its step, per channel along ``axis``."""
    scale, per_channel = grid
    if per_channel is None:
        return torch.fake_quantize_per_tensor_affine(w, float(scale), 0, -128, 127)
    return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), axis,
                                                  -128, 127)


def nbits_weight(q: TensorQuantizer) -> bool:
    """Whether a weight fits ONNX Runtime's weight-only ``MatMulNBits`` (4-bit codes, zero point 8):
    uniform symmetric, at most 4 bits, per group along the input with a power-of-two group >= 16."""
    s = q.spec
    g = s.group_size
    return (q.mode == "quant" and s.scheme == "uniform" and s.symmetric and s.bits <= 4
            and s.granularity == "per_group" and g >= 16 and g & (g - 1) == 0 and bool((q.zero_point == 0).all()))


def _dequantized_codes(m: nn.Module) -> torch.Tensor:
    """A layer's int8 weight codes (buffers that :func:`export_copy` set for PT2E) through torch.export's
    per-channel dequantize op along the output channels: Inductor's int8 GEMM and convolution patterns."""
    qd = _decomposed()
    return qd.dequantize_per_channel(m._wcodes, m._wscale, m._wzero, 0, -128, 127, torch.int8)


def _pt2e_weight(m: nn.Module) -> torch.Tensor:
    """The weight a PT2E layer multiplies by: its int8 codes dequantized, or the quantized float values."""
    return _dequantized_codes(m) if "_wcodes" in m._buffers else m._wq


class ExportLinear(QuantLinear):
    decomposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decomposed:
            return F.linear(self.in_quant(x), _pt2e_weight(self), self.bias)
        if x.dim() == 2:  # ONNX Runtime fuses a 2-D MatMul and its bias into a float Gemm before its QDQ fusions
            return self.forward(x.unsqueeze(1)).squeeze(1)
        x = self.in_quant(x)
        grid = weight_int8(self)
        if grid is not None:  # x @ W^T with W^T under an int8 pair: ONNX Runtime's integer MatMul pattern
            y = torch.matmul(x, _int8_weight(self._wq.t().contiguous(), grid, 1))
            return y + self.bias if self.bias is not None else y
        if nbits_weight(self.w_quant):  # a MatMul on the float weight; replaced by MatMulNBits afterwards
            y = torch.matmul(x, self._wq.t().contiguous())
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self._wq, self.bias)


class ExportConv(QuantConv2d):
    decomposed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_quant(x)
        if self.same_padding:
            from timm.layers.padding import pad_same

            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        if self.decomposed:
            return self._conv_forward(x, _pt2e_weight(self), self.bias)
        w = self._wq
        grid = weight_int8(self)
        if grid is not None:
            w = _int8_weight(w, grid, 0)
        return self._conv_forward(x, w, self.bias)


def export_copy(model: nn.Module, approximate=frozenset(), simulate=frozenset(), signed: bool = False,
                decomposed: bool = False) -> nn.Module:
    """A CPU copy of ``model`` with every quantizer and layer as its exporter should trace it.

    Args:
        model: the quantized model (left as it is).
        approximate: names of quantizers written as their float input.
        simulate: names of quantizers that run the simulation's own float operations.
        signed: activation pairs on signed int8 with zero point 0 (TensorRT).
        decomposed: torch.export's quantize/dequantize ops (PT2E); weights whose grid fits int8 are then held
            as int8 code buffers, not float values.
    """
    m = copy.deepcopy(model).eval().cpu()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (QuantLinear, QuantConv2d)):
                # computed now, so the exporter sees constants, not the fake-quant arithmetic
                mod._wq = (mod.w_quant.fake_quant(mod.weight) if mod.w_quant.mode == "quant" else mod.weight).detach()
                grid = weight_int8(mod) if decomposed else None
                if grid is not None:
                    n = mod._wq.shape[0]
                    scale = grid[0].reshape(-1).expand(n).contiguous() if grid[0].numel() == 1 else grid[0]
                    shape = (n,) + (1,) * (mod._wq.dim() - 1)
                    mod.register_buffer("_wcodes", torch.round(mod._wq / scale.reshape(shape)).to(torch.int8))
                    mod.register_buffer("_wscale", scale.float())
                    mod.register_buffer("_wzero", torch.zeros(n, dtype=torch.int64))
                    del mod._parameters["weight"]  # the file holds the codes only
                    mod.weight, mod._wq = None, None
    for mod in m.modules():
        if type(mod) is TensorQuantizer:
            mod.__class__ = ExportQuantizer
            mod.approximate, mod.simulate = mod.name in approximate, mod.name in simulate
            mod.signed, mod.decomposed = signed, decomposed
            mod.freeze()
        elif type(mod) in (QuantLinear, QuantConv2d):
            mod.__class__ = ExportLinear if type(mod) is QuantLinear else ExportConv
            mod.decomposed = decomposed
    return m
