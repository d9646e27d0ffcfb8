"""Quantizers as pure tensor functions (no state, no modules).

Conventions
-----------
* Uniform, symmetric: signed integers in ``[-(2^(b-1)-1), 2^(b-1)-1]`` (the most negative code is
  left unused so the grid is symmetric and ``-max`` maps exactly), zero point 0.
* Uniform, asymmetric: unsigned integers in ``[0, 2^b-1]`` with an integer zero point; the range is
  widened to contain 0 so that 0 is exactly representable (padding, ReLU zeros, masked attention).
* Rounding is round-half-to-even (``torch.round``), the same as ``torch.fake_quantize_*`` and ONNX.
* Power-of-two (PoT): levels are 0 or ``±2^(p-k)`` with ``k = 0 .. L-1``; ``2^p`` is the scale (itself a
  power of two). Signed (weights) spends one bit on the sign: ``L = 2^(b-1) - 1``; unsigned
  (non-negative activations) ``L = 2^b - 1``. Code 0 is zero, code ``c >= 1`` is exponent ``k = c-1``,
  so a product with an integer activation ``a`` is ``a << (p0 - k)``: decoding is exactly a shift.
* Additive power-of-two (APoT, weights): levels are 0 or ``±s (2^-i + 2^-j)`` with a real-valued scale ``s``
  per channel (:func:`apot_terms`); the scale folds into the output's requantization, so every product is
  still shifts and one add.
* Two-region: one ``b``-bit format whose top bit selects the region; values below ``boundary`` use
  scale ``delta / 2^m`` and values at or above it use ``delta`` (see :func:`fake_quant_two_region`).

Scales and zero points broadcast against ``x``: pass scalars (0-d tensors) for per-tensor
quantization, or tensors shaped like ``x`` reduced on all but the channel axis for per-channel.
"""
from __future__ import annotations

import functools
import math

import torch

EPS = 1e-12  # smallest scale; a constant tensor (zero range) gets this instead of a division by zero


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range for a uniform grid (symmetric signed grids leave the most negative code unused)."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bit-width must be an integer in [2, 16], got {bits!r}")


def _float_tensor(v) -> torch.Tensor:
    """``v`` as a float32 tensor; a tensor keeps its device (a number goes to the default device)."""
    if isinstance(v, torch.Tensor):
        return v.to(torch.float32)
    return torch.as_tensor(v, dtype=torch.float32)


def uniform_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a uniform grid covering ``[xmin, xmax]``.

    Returns:
        ``(scale, zero_point)``; zero_point is a float tensor holding integers.
    """
    xmin, xmax = _float_tensor(xmin), _float_tensor(xmax)
    if symmetric:
        _, qmax = int_range(bits, True)
        amax = torch.maximum(xmin.abs(), xmax.abs())
        scale = (amax / qmax).clamp_min(EPS)
        return scale, torch.zeros_like(scale)
    qmin, qmax = int_range(bits, False)
    xmin = xmin.clamp(max=0.0)
    xmax = xmax.clamp(min=0.0)
    scale = ((xmax - xmin) / (qmax - qmin)).clamp_min(EPS)
    zero_point = (qmin - torch.round(xmin / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as float tensor) ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Multiplies by the reciprocal of the scale, exactly as PyTorch's fused fake-quant kernels do, so
    the reference formula and the fast path give bit-identical results.
    """
    return torch.clamp(torch.round(x * (1.0 / scale)) + zero_point, qmin, qmax)


def dequantize_uniform(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real values of integer codes: ``(q - zero_point) * scale``."""
    return (q - zero_point) * scale


def _along_axis(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D per-channel ``scale``/``zero_point`` reshaped to broadcast along ``axis`` of ``x`` (else as given)."""
    if axis is not None and scale.dim() == 1 and x.dim() > 1:
        shape = [1] * x.dim()
        shape[axis % x.dim()] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return scale, zero_point


def fake_quant_uniform(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                       axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize on a uniform grid: ``dequantize_uniform(quantize_uniform(x))``, bit-identical.

    Because the zero point is an integer, ``clamp(round(x/s) + z, qmin, qmax) - z`` equals
    ``clamp(round(x/s), qmin - z, qmax - z)``; this form needs four passes over ``x`` instead of six and
    runs them in place on one temporary. (PyTorch's ``fake_quantize_per_tensor_affine`` was measured
    6x slower on this CPU because it also builds a gradient mask.)

    Args:
        axis: channel axis of a per-channel ``scale``/``zero_point`` (1-D); None for per-tensor or for
            parameters already shaped to broadcast.
    """
    scale, zero_point = _along_axis(x, scale, zero_point, axis)
    y = x * (1.0 / scale)
    y.round_()
    if zero_point.numel() == 1:
        z = float(zero_point)
        y.clamp_(qmin - z, qmax - z)
    else:
        y = torch.maximum(torch.minimum(y, qmax - zero_point), qmin - zero_point)
    return y.mul_(scale)


def ptf_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, max_shift: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Power-of-two-factor (PTF, FQ-ViT) parameters for a per-channel asymmetric grid.

    Every channel ``c`` uses scale ``s * 2^a_c`` with one shared base scale ``s`` and a per-channel shift
    ``a_c`` in ``0..max_shift``, so an integer LayerNorm or residual adder can align channels with shifts.
    ``s`` is set so that the widest channel fits at the largest shift; each channel takes the smallest
    shift whose grid covers its range.

    Returns:
        ``(scale, zero_point, shift)``, one value per channel.
    """
    qmin, qmax = int_range(bits, False)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    rng = (hi - lo).clamp_min(EPS)
    base = (rng.max() / (qmax - qmin) / 2**max_shift).clamp_min(EPS)
    shift = torch.ceil(torch.log2(rng / (base * (qmax - qmin)))).clamp(0, max_shift)
    scale = base * torch.exp2(shift)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point, shift


def ptf_window_params(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points of a per-channel grid with fixed steps ``scale`` over the ranges ``[lo, hi]``.

    Where a channel's range is wider than its grid's window (``scale * (qmax - qmin)``), the window is
    the range shrunk about zero by the same factor at both ends (the clip ``r·[min, max]`` used for
    per-tensor grids); otherwise it starts at ``lo``, as in :func:`ptf_params`.
    """
    qmin, qmax = int_range(bits, False)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    rng = (hi - lo).clamp_min(EPS)
    shrink = (scale * (qmax - qmin) / rng).clamp(max=1.0)
    return (qmin - torch.round(lo * shrink / scale)).clamp(qmin, qmax)


# A token position keeps shift 0 unless its range is more than 2^TOKEN_FREE_LOG2 times the median
# position's: ordinary spread between tokens (the class token, bright patches) stays on the channel grid,
# and only positions with massive activations (ViT-Tiny's four corner patches, about 120x the median from
# block 8 on) get a coarser grid of their own (docs/methods.md, "Token shifts").
TOKEN_FREE_LOG2 = 3


def token_shift_params(lo: torch.Tensor, hi: torch.Tensor, max_shift: int = 7,
                       free_log2: float = TOKEN_FREE_LOG2) -> torch.Tensor:
    """Static power-of-two factor per token position of a residual-stream grid.

    Position ``t`` is quantized on the per-channel grid with every step multiplied by ``2^b_t``, i.e.
    ``x_t / 2^b_t`` goes through the channel grid and the result is multiplied back; both are shifts in
    integer arithmetic, and a LayerNorm is unchanged by a per-token factor. ``b_t`` is the smallest shift
    that brings the position's largest magnitude within ``2^free_log2`` times the median position's.

    Args:
        lo, hi: ranges per position and channel, shaped ``[positions..., channels]``.

    Returns:
        ``b``, shaped ``[positions...]``, integers in ``0..max_shift`` (as floats).
    """
    amax = torch.maximum(lo.abs(), hi.abs()).amax(-1)
    ref = amax.flatten().median().clamp_min(EPS)
    return torch.ceil(torch.log2(amax.clamp_min(EPS) / ref) - free_log2).clamp(0, max_shift)


def token_factor(x: torch.Tensor, token_shift: torch.Tensor) -> torch.Tensor:
    """``2^token_shift`` shaped to broadcast against a channel-last ``x`` = ``[batch, positions..., channels]``.

    Raises:
        ValueError: ``x``'s positions differ from the calibrated ones (another input size).
    """
    if tuple(x.shape[1:-1]) != tuple(token_shift.shape):
        raise ValueError(f"token shifts were calibrated for positions {tuple(token_shift.shape)}, got a tensor "
                         f"of shape {tuple(x.shape)}; quantize again at this input size")
    return torch.exp2(token_shift).unsqueeze(-1)


# ----------------------------------------------------------------------------------------- power of two


def pot_num_levels(bits: int, signed: bool) -> int:
    """Number of non-zero magnitudes ``L`` of a PoT grid."""
    check_bits(bits)
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def pot_scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Smallest integer ``p`` with ``2^p >= amax`` (the top PoT level covers the range)."""
    return torch.ceil(torch.log2(_float_tensor(amax).clamp_min(EPS)))


def quantize_pot(x: torch.Tensor, scale_exp: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PoT codes: ``(sign, code)`` with code 0 for zero and code ``c >= 1`` for ``2^(p-(c-1))``.

    Rounds to the nearest level in the linear domain (this minimizes the squared error; rounding the
    exponent in the log domain does not).

    Raises:
        ValueError: ``signed=False`` with negative inputs.
    """
    levels_n = pot_num_levels(bits, signed)
    if not signed and bool((x < 0).any()):
        raise ValueError("unsigned power-of-two quantization got negative values")
    # Magnitudes relative to the scale: exact, since 2^p is a power of two.
    rel = x.abs() / torch.exp2(scale_exp)
    # Ascending levels [0, 2^-(L-1), ..., 2^-1, 1]; midpoints between neighbours decide the rounding.
    levels = torch.cat([torch.zeros(1, device=x.device),
                        torch.exp2(-torch.arange(levels_n - 1, -1, -1, dtype=torch.float32, device=x.device))])
    mids = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(rel, mids, right=False)  # 0 -> zero, levels_n -> the top level 2^0
    code = torch.where(idx == 0, torch.zeros_like(idx), levels_n - idx + 1)  # top level -> code 1 (k = 0)
    sign = torch.where(x < 0, -torch.ones_like(rel), torch.ones_like(rel))
    return sign, code


def dequantize_pot(sign: torch.Tensor, code: torch.Tensor, scale_exp: torch.Tensor) -> torch.Tensor:
    """Real values of PoT codes."""
    k = (code - 1).clamp_min(0).to(torch.float32)
    mag = torch.where(code == 0, torch.zeros_like(k), torch.exp2(scale_exp - k))
    return sign * mag


def fake_quant_pot(x: torch.Tensor, scale_exp: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Quantize-dequantize onto the PoT grid with scale ``2^scale_exp`` (per tensor or broadcast per channel)."""
    sign, code = quantize_pot(x, scale_exp, bits, signed)
    return dequantize_pot(sign, code, scale_exp)


def pot_shift_product(a: torch.Tensor, sign: torch.Tensor, code: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer product of integer activations ``a`` with PoT weight codes, using only shifts.

    The result is ``a * w / 2^(p - (L-1))``: the smallest level has weight 1, so every product is an
    integer ``a << (L-1-k)``. This is what the shift-add engine computes.
    """
    levels_n = pot_num_levels(bits, signed=True)
    a = a.to(torch.int64)
    shift = (levels_n - code).clamp_min(0).to(torch.int64)  # code c -> k = c-1 -> shift L-1-k = L-c
    prod = torch.bitwise_left_shift(a, shift)
    return torch.where(code == 0, torch.zeros_like(prod), prod * sign.to(torch.int64))


# ----------------------------------------------------------------------------- additive power of two


@functools.lru_cache(maxsize=None)
def _apot_pairs(bits: int) -> tuple[tuple[float, float], ...]:
    check_bits(bits)
    k2 = (bits - 1) // 2
    k1 = bits - 1 - k2
    first = [0.0] + [2.0 ** (-2 * i) for i in range(2 ** k1 - 1)]
    second = [0.0] + [2.0 ** (-(2 * i + 1)) for i in range(2 ** k2 - 1)]
    return tuple((a, b) for _, a, b in sorted((a + b, a, b) for a in first for b in second))


def apot_terms(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two power-of-two terms of every magnitude of a signed ``bits``-bit additive power-of-two (APoT)
    grid, in ascending order of their sum.

    One bit is the sign; the other ``bits - 1`` split into a first term from ``{0, 2^0, 2^-2, 2^-4, ...}``
    (``2^k1`` values) and a second from ``{0, 2^-1, 2^-3, ...}`` (``2^k2`` values), ``k1 = ceil((bits-1)/2)``,
    ``k2 = floor((bits-1)/2)`` (Li, Dong and Wang, ICLR 2020, with two additive terms). Even and odd
    exponents never collide, so the ``2^(bits-1)`` sums are distinct; the largest is 1.5 (1 for 2 bits).
    A product with an integer activation is two shifts and an add.

    Returns:
        ``(first, second)``, each of ``2^(bits-1)`` values (float64, CPU); the magnitudes are ``first + second``.
    """
    pairs = _apot_pairs(bits)
    return (torch.tensor([a for a, _ in pairs], dtype=torch.float64, device="cpu"),
            torch.tensor([b for _, b in pairs], dtype=torch.float64, device="cpu"))


@functools.lru_cache(maxsize=None)
def apot_max_shift(bits: int) -> int:
    """The largest shift an APoT product takes: the exponent of the smallest non-zero term."""
    return max(int(-math.log2(t)) for pair in _apot_pairs(bits) for t in pair if t > 0)


def apot_levels(bits: int, device=None) -> torch.Tensor:
    """The non-negative magnitudes of the ``bits``-bit APoT grid, ascending, before its scale."""
    return torch.tensor([a + b for a, b in _apot_pairs(bits)], dtype=torch.float32, device=device)


def apot_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """The real-valued scale that puts the top APoT level at ``amax``."""
    top = max(a + b for a, b in _apot_pairs(bits))
    return (_float_tensor(amax) / top).clamp_min(EPS)


def quantize_apot(x: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """APoT codes ``(sign, index)``: the index into :func:`apot_levels` of the magnitude nearest ``|x| / scale``
    (in the linear domain, which minimizes the squared error)."""
    levels = apot_levels(bits, x.device)
    idx = torch.bucketize(x.abs() / scale, (levels[1:] + levels[:-1]) / 2, right=False)
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x)), idx


def fake_quant_apot(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize onto the signed APoT grid with real-valued ``scale`` (per tensor or broadcast per
    channel): ``sign x scale x (2^-i + 2^-j)``."""
    sign, idx = quantize_apot(x, scale, bits)
    return sign * apot_levels(bits, x.device)[idx] * scale


def split_channels(err_uniform: torch.Tensor, err_apot: torch.Tensor, share: float | None = None) -> torch.Tensor:
    """Which output channels of a layer take the APoT grid (True) rather than the uniform one.

    Args:
        err_uniform / err_apot: each channel's error on either grid (at its own best clip).
        share: None: every channel whose APoT error is lower (M2-ViT's per-kernel rule); a fraction: that
            share of the channels (rounded), those that lose least by moving (ties: the lower index).
    """
    if share is None:
        return err_apot < err_uniform
    n = err_uniform.numel()
    k = min(n, max(0, round(float(share) * n)))
    mask = torch.zeros(n, dtype=torch.bool, device=err_uniform.device)
    mask[torch.argsort((err_apot - err_uniform).reshape(-1), stable=True)[:k]] = True
    return mask.reshape(err_uniform.shape)


# ----------------------------------------------------------------------------------------- two-region


def _two_region_grid(delta: torch.Tensor, m: int, bits: int, signed_fine: bool):
    """Codes per region ``n``, the fine step and the fine region's code range (checks the arguments)."""
    check_bits(bits)
    if not 0 <= m <= 16:
        raise ValueError(f"two-region ratio exponent m must be in [0, 16], got {m}")
    n = 2 ** (bits - 1)
    fmin, fmax = (-(n // 2), n // 2 - 1) if signed_fine else (0, n - 1)
    return n, delta / (2**m), fmin, fmax


def two_region_codes(x: torch.Tensor, delta: torch.Tensor, m: int, boundary: torch.Tensor, bits: int,
                     signed_fine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode with the two-region quantizer: ``(region, code)``, region 0 fine, region 1 coarse.

    One ``bits``-bit format: the top bit is the region, the other ``bits-1`` bits the code. Region 0
    (``x < boundary``) has scale ``delta / 2^m``; region 1 (``x >= boundary``) has scale ``delta``.
    Region 0 codes are unsigned ``[0, 2^(b-1)-1]`` or, with ``signed_fine`` (post-GELU values, which
    dip below zero), signed ``[-2^(b-2), 2^(b-2)-1]``; region 1 codes are unsigned.
    """
    n, fine, fmin, fmax = _two_region_grid(delta, m, bits, signed_fine)
    region = (x >= boundary).to(torch.int64)
    code = torch.where(region == 0, torch.clamp(torch.round(x / fine), fmin, fmax),
                       torch.clamp(torch.round(x / delta), 0, n - 1))
    return region, code


def two_region_decode(region: torch.Tensor, code: torch.Tensor, delta: torch.Tensor, m: int) -> torch.Tensor:
    """Real values of two-region codes: the fine region is the coarse scale shifted right by ``m``."""
    return torch.where(region == 0, code * (delta / (2**m)), code * delta)


def fake_quant_two_region(x: torch.Tensor, delta: torch.Tensor, m: int, boundary: torch.Tensor, bits: int,
                          signed_fine: bool = False) -> torch.Tensor:
    """Quantize-dequantize with the two-region quantizer (see :func:`two_region_codes`).

    Computes ``decode(codes(x))`` without the integer intermediates: the same float operations in the
    same order, so the result is bit-identical, at about half the cost (it runs on every post-GELU and
    post-softmax tensor of every probe in Greedy MP).
    """
    coarse, fine = two_region_grids(x, delta, m, bits, signed_fine)
    return torch.where(x >= boundary, coarse, fine)


def two_region_grids(x: torch.Tensor, delta: torch.Tensor, m: int, bits: int,
                     signed_fine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` fake-quantized on the coarse grid and on the fine grid of the two-region quantizer.

    :func:`fake_quant_two_region` picks between them at the boundary; neither depends on it, so a search
    over boundaries (OPT-m) computes them once per ``(delta, m)``, bit-identically.
    """
    n, fine, fmin, fmax = _two_region_grid(delta, m, bits, signed_fine)
    coarse = torch.round(x / delta).clamp_(0, n - 1).mul_(delta)
    return coarse, torch.round(x / fine).clamp_(fmin, fmax).mul_(fine)


# ----------------------------------------------------------------------------------------- granularity


def reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...]:
    """Dimensions to reduce for statistics: all (per tensor) or all but ``axis`` (per channel)."""
    if axis is None:
        return tuple(range(x.dim()))
    axis = axis % x.dim()
    return tuple(d for d in range(x.dim()) if d != axis)


def to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a weight ``[out, in, ...]`` as ``[out * in/group, group]`` for per-group quantization.

    Groups run along the input dimension (the reduction dimension of the matmul), as in weight-only
    int4 kernels such as ONNX Runtime's MatMulNBits.
    """
    flat = w.reshape(w.shape[0], -1)
    if flat.shape[1] % group_size:
        raise ValueError(f"input size {flat.shape[1]} is not a multiple of group size {group_size}")
    return flat.reshape(-1, group_size)


# ----------------------------------------------------------------------------------------- differentiable


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_uniform_ste(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                           qmax: int, axis: int | None = None) -> torch.Tensor:
    """:func:`fake_quant_uniform` with gradients (LSQ, Esser et al. 2020): ``x`` gets the straight-through
    gradient inside the grid and none where it is clipped; ``scale`` gets ``round(x/s) - x/s`` inside and
    the clip level outside. The forward value equals :func:`fake_quant_uniform` up to float rounding.
    ``axis`` as in :func:`fake_quant_uniform`."""
    scale, zero_point = _along_axis(x, scale, zero_point, axis)
    return (torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def fake_quant_two_region_ste(x: torch.Tensor, delta: torch.Tensor, m: int, boundary: torch.Tensor, bits: int,
                              signed_fine: bool = False) -> torch.Tensor:
    """:func:`fake_quant_two_region` with LSQ gradients for ``delta`` (both regions' steps follow it)."""
    n, fine, fmin, fmax = _two_region_grid(delta, m, bits, signed_fine)
    coarse = torch.clamp(round_ste(x / delta), 0, n - 1) * delta
    return torch.where(x >= boundary, coarse, torch.clamp(round_ste(x / fine), fmin, fmax) * fine)
