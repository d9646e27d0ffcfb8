"""OPT-m: data-driven search of the scaling-factor ratio of the two-region quantizer (MPTQ-ViT).

Post-GELU values (the fc2 input) and post-softmax values (the attn·v input) are heavily skewed: most
values are tiny, a few are large. They get the engine's two-region quantizer: one b-bit format, values
below a boundary at step ``Δ/2^m``, values above it at step ``Δ`` (decoding the fine region is a shift
by ``m``). For each such tensor OPT-m searches ``m`` in ``0..m_max`` jointly with ``Δ`` and the
boundary, minimizing the error of the *layer output* on calibration data (``Q(x) W^T`` for fc2,
``Q(attn) v`` for the matmul). ``m = 0`` means the plain b-bit uniform grid, so OPT-m can never be
worse than ``m = 0`` on its own objective.

Every other activation quantizer gets its clip range from the same kind of search (the clip factor
``r`` of ``r·[min, max]`` minimizing the error of the output of the layer it feeds; for tensors that
feed no Linear or matmul, the tensor's own error). The full protocol's per-channel PTF grids on the
residual stream get their base step and per-channel shifts from the same kind of search
(:func:`search_ptf`, on the error as the next LayerNorm sees it, to first order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant import quantizers as Q
from ..quant.engine import all_quantizers
from ..quant.layers import QuantLinear, QuantMatMul
from .capture import row_factor

# Clip ratios 0.30 .. 0.90 in steps of 0.05, then 0.90 .. 1.00 in steps of 0.01: at 8 bits the rounding
# error is small, so the best clip lies close to the max and a 0.05 step is too coarse there.
CLIP_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(12)) + tuple(round(0.9 + 0.01 * i, 2) for i in range(11))


@dataclass(frozen=True)
class TwoRegionGrid:
    """The candidates OPT-m's two-region search tries besides ``m``.

    Attributes:
        deltas: coarse step ``Δ`` as a fraction of ``max / (n - 1)`` (1.0 = the min-max step).
        boundaries: region boundary as a fraction of the fine region's reach.
    """

    deltas: tuple[float, ...]
    boundaries: tuple[float, ...]


# The default since session 2: 7 x 3 candidates per m.
STANDARD_GRID = TwoRegionGrid(deltas=tuple(round(0.4 + 0.1 * i, 1) for i in range(7)), boundaries=(0.25, 0.5, 1.0))


@dataclass
class OptMChoice:
    name: str
    scheme: str  # uniform (m = 0), two_region, or ptf (a searched PTF grid; m unused)
    m: int
    # best output error with m = 0 (uniform); for ptf: the min-max PTF grid's error
    error_m0: float
    error: float  # best output error overall (<= error_m0)


@dataclass
class OptMResult:
    choices: list[OptMChoice] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [vars(c) for c in self.choices]


def _capture(model: nn.Module, calib: torch.Tensor, max_rows: int,
             row_weights: dict[int, torch.Tensor] | None = None,
             token_weights: dict[int, torch.Tensor] | None = None) -> dict[int, tuple[torch.Tensor, object]]:
    """Float inputs of every activation quantizer and a function giving the output it feeds.

    Args:
        row_weights: if given, filled with ``id(quantizer) -> weight per sample row`` for the channel-last
            PTF grids: ``1 / var`` of the residual stream at that token (over channels), the factor by
            which the next LayerNorm scales an error there. A LayerNorm's input grid and a residual
            addition's ``x`` grid use their own input's variance; the ``branch`` grid that of ``x + branch``.
        token_weights: if given, filled with ``id(quantizer) -> 4^b_t per sample row`` for the grids with
            token shifts (``QuantConfig.residual_token_shift``), whose samples are captured divided by
            ``2^b_t`` (what the channel grid sees): an error there is ``2^b_t`` times larger in ``x``.

    Returns ``id(quantizer) -> (sample, output_fn or None)``.
    """
    saved_modes = {q: q.mode for q in all_quantizers(model)}
    for q in saved_modes:
        q.mode = "off"
    found: dict[int, tuple[torch.Tensor, object]] = {}
    hooks = []
    g = torch.Generator().manual_seed(0)
    # branch quantizer -> x quantizer of the same residual addition (QuantAdd has x_quant and b_quant)
    stream_of = {id(m.b_quant): id(m.x_quant) for m in model.modules() if hasattr(m, "x_quant") and hasattr(m, "b_quant")}
    x_grids = set(stream_of.values())
    streams: dict[int, torch.Tensor] = {}  # x quantizer -> its float input, for the branch grid after it

    def pick(x):
        """Row indices to keep (None: all); a tensor's rows are its entries over the last axis."""
        n = x.numel() // x.shape[-1]
        return torch.randperm(n, generator=g, device="cpu")[:max_rows].sort().values if n > max_rows else None

    def rows(x, idx=None):
        x = x.detach().reshape(-1, x.shape[-1])
        return x if idx is None else x[idx]

    def lin_hook(mod, args):
        w = mod.weight.detach()
        idx = pick(args[0])
        f = row_factor(mod, args[0])  # token scaling: rows divided by 2^b_t, whose output is multiplied back
        if f is None:
            found[id(mod.in_quant)] = (rows(args[0], idx), lambda v, w=w: v @ w.T)
        else:
            found[id(mod.in_quant)] = (rows(args[0], idx), lambda v, w=w, f=rows(f, idx): (v @ w.T) * f)

    def mm_hook(mod, args):
        a, b = args[0].detach()[:4], args[1].detach()[:4]  # a few images keep the pairing of a and b
        found[id(mod.a_quant)] = (a, lambda v, b=b: v @ b)
        found[id(mod.b_quant)] = (b, lambda v, a=a: a @ v)

    def act_hook(mod, args, out):
        x = args[0].detach()
        idx = pick(x)  # drawn even when already captured, so every other sample stays as it was
        if id(mod) in found:
            return
        f = mod.token_factor(x)  # None unless the grid has token shifts
        found[id(mod)] = (rows(x if f is None else x / f, idx), None)
        if f is not None and token_weights is not None:
            token_weights[id(mod)] = rows(f.square().expand(*x.shape[:-1], 1), idx).squeeze(-1)
        if row_weights is None or getattr(mod, "ptf_axis", None) != -1:
            return
        if id(mod) in x_grids:
            streams[id(mod)] = x
        before = streams.get(stream_of.get(id(mod)))  # for a branch grid: the x it is added to
        stream = before + x if before is not None and before.shape == x.shape else x
        w = 1.0 / stream.float().var(-1, unbiased=False).clamp_min(1e-6)
        row_weights[id(mod)] = rows(w.unsqueeze(-1), idx).squeeze(-1)

    for m in model.modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.register_forward_pre_hook(lin_hook))
        elif isinstance(m, QuantMatMul):
            hooks.append(m.register_forward_pre_hook(mm_hook))
    for q in saved_modes:
        if not q.is_weight:
            hooks.append(q.register_forward_hook(act_hook))
    try:
        with torch.inference_mode():
            model(calib)
    finally:
        for h in hooks:
            h.remove()
        for q, mode in saved_modes.items():
            q.mode = mode
    return found


def _error(out_fn, ref, xq) -> float:
    return (out_fn(xq) - ref).pow(2).mean().item() if out_fn is not None else (xq - ref).pow(2).mean().item()


def search_uniform_clip(x: torch.Tensor, bits: int, out_fn=None, ref: torch.Tensor | None = None
                        ) -> tuple[float, float, float]:
    """Best asymmetric uniform clip ``r·[min, max]`` on the output objective. Returns (lo, hi, error).

    ``ref`` is ``out_fn(x)`` when the caller already has it (it is computed otherwise)."""
    if ref is None:
        ref = out_fn(x) if out_fn is not None else x
    lo0, hi0 = x.min(), x.max()
    qmin, qmax = Q.int_range(bits, False)
    best = (lo0.item(), hi0.item(), float("inf"))
    for r in CLIP_GRID:
        s, z = Q.uniform_params(lo0 * r, hi0 * r, bits, False)
        err = _error(out_fn, ref, Q.fake_quant_uniform(x, s, z, qmin, qmax))
        if err < best[2]:
            best = ((lo0 * r).item(), (hi0 * r).item(), err)
    return best


def search_two_region(x: torch.Tensor, bits: int, m_max: int, signed_fine: bool, out_fn=None,
                      grid: TwoRegionGrid = STANDARD_GRID):
    """Best (delta, m, boundary) for m in 1..m_max over ``grid``. Returns (delta, m, boundary, error)."""
    ref = out_fn(x) if out_fn is not None else x
    n = 2 ** (bits - 1)
    top = x.max().clamp_min(1e-8)
    best = (None, None, None, float("inf"))
    for m in range(1, m_max + 1):
        for r in grid.deltas:
            delta = top * r / (n - 1)
            fine = delta / 2**m
            fine_top = ((n // 2 if signed_fine else n) - 0.5) * fine  # reach of the fine codes
            # both grids once per (delta, m): only the choice between them depends on the boundary
            coarse_q, fine_q = Q.two_region_grids(x, delta, m, bits, signed_fine)
            for c in grid.boundaries:
                boundary = fine_top * c
                xq = torch.where(x >= boundary, coarse_q, fine_q)  # = Q.fake_quant_two_region(x, ...)
                err = _error(out_fn, ref, xq)
                if err < best[3]:
                    best = (delta.item(), m, boundary.item(), err)
    return best


# Base-step multipliers of the PTF search: eighths of an octave over two octaves. Within one octave they
# move where each channel's power-of-two steps fall; below 0.5 they trade the widest channel's clip (its
# shift is capped) for finer steps in the narrow channels (whose shift cannot go below 0).
PTF_BASE_GRID = tuple(2 ** (-j / 8) for j in range(16))


def search_ptf(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, max_shift: int = 7,
               row_weight: torch.Tensor | None = None):
    """Data-driven steps for a PTF (power-of-two-factor) per-channel grid.

    The calibrated grid (:func:`~vitq.quant.quantizers.ptf_params`) takes the base step that covers the
    widest channel at the largest shift, then the smallest covering shift per channel. This searches the
    base over :data:`PTF_BASE_GRID` and, per channel, any shift in ``0..max_shift`` (a smaller shift clips
    that channel's range, :func:`~vitq.quant.quantizers.ptf_window_params`), keeping the least total
    squared error of ``x``, each row weighted by ``row_weight`` if given. The steps stay one base times
    powers of two, so integer LayerNorms and adders still align channels with shifts. The calibrated grid is
    one of the candidates: never worse on this error.

    Args:
        x: samples, channels last (rows x channels).
        lo, hi: each channel's calibrated range.
        row_weight: optional non-negative weight per row (:func:`apply_optm` gives ``1 / var`` of the
            residual stream at that token).

    Returns:
        ``(scale, zero_point, error, error_minmax)``: one step and zero point per channel, the (weighted)
        mean squared error of that grid and of the min-max grid.
    """
    qmin, qmax = Q.int_range(bits, False)
    w = None if row_weight is None else row_weight.reshape(-1, 1).to(x.dtype)
    norm = x.numel() if w is None else w.sum().item() * x.shape[-1]

    def channel_error(scale, zp):
        e = (Q.fake_quant_uniform(x, scale, zp, qmin, qmax, axis=-1) - x).pow(2)
        return (e if w is None else e * w).sum(0)

    scale0, zp0, _ = Q.ptf_params(lo, hi, bits, max_shift)
    best_err = channel_error(scale0, zp0)
    best = (scale0.clone(), zp0.clone(), best_err.sum().item())
    err_minmax = best[2] / norm
    rng = (hi.clamp(min=0.0) - lo.clamp(max=0.0)).clamp_min(Q.EPS)
    base0 = (rng.max() / (qmax - qmin) / 2**max_shift).clamp_min(Q.EPS)
    for r in PTF_BASE_GRID:
        ch_err = torch.full_like(best_err, float("inf"))
        ch_scale, ch_zp = torch.zeros_like(scale0), torch.zeros_like(zp0)
        for a in range(max_shift + 1):
            scale = torch.full_like(scale0, float(base0 * r * 2**a))
            zp = Q.ptf_window_params(lo, hi, scale, bits)
            err = channel_error(scale, zp)
            better = err < ch_err
            ch_err = torch.where(better, err, ch_err)
            ch_scale, ch_zp = torch.where(better, scale, ch_scale), torch.where(better, zp, ch_zp)
        if ch_err.sum().item() < best[2]:
            best = (ch_scale, ch_zp, ch_err.sum().item())
    return best[0], best[1], best[2] / norm, err_minmax


def default_m_max(bits: int) -> int:
    """Largest ratio exponent searched at ``bits`` when none is given: ``max(4, bits - 1)``.

    With ``b - 1`` code bits per region, ``m = b - 1`` puts the fine region's reach at about one coarse
    step. A fixed limit of 4 cost accuracy at 6 and 8 bits: ViT-Tiny W6A6/W8A8 with SQ-b + OPT-m gained
    when the limit was raised (docs/lab/results-log.md, MPTQ-ViT ablation).
    """
    return max(4, bits - 1)


def apply_optm(model: nn.Module, calib: torch.Tensor, m_max: int | None = None, max_rows: int = 4096,
               n_images: int = 8, progress: bool = True) -> OptMResult:
    """Run OPT-m on a calibrated model (in place).

    Args:
        model: a prepared and calibrated model.
        calib: calibration images (the first ``n_images`` are used for the search).
        m_max: largest ratio exponent tried for the two-region tensors; ``None`` means
            :func:`default_m_max` of each tensor's bit-width; ``0`` keeps every tensor uniform (only the
            clip search runs), which is what an integer runtime without two-region kernels can execute.

    Returns:
        Per two-region tensor, the chosen ``m`` and the errors with ``m = 0`` and overall; per searched PTF
        grid, its error before and after the search.
    """
    adapter = adapter_for(model)
    targets = {id(q): signed for q, signed in adapter.two_region_targets(model)}
    # The PTF grids' errors are weighted per token by 1 / var of the residual stream there: every use of
    # the residual stream goes through a LayerNorm, which divides token t by its standard deviation, so to
    # first order this is the error the next LayerNorm's output sees (tokens with massive activations count
    # for less). The tensor's own error measured worse (docs/lab/decisions.md, R10).
    row_weights: dict[int, torch.Tensor] = {}
    token_weights: dict[int, torch.Tensor] = {}
    found = _capture(model, calib[:n_images], max_rows, row_weights, token_weights)
    result = OptMResult()
    acts = [q for q in all_quantizers(model) if not q.is_weight and id(q) in found]
    for q in tqdm(acts, desc="OPT-m", disable=None if progress else True, leave=False):
        # the output each clip is scored on: a Linear's or matmul's (q, k, v) from the capture
        x, out_fn = found[id(q)]
        # the samples are channel-last rows, so only grids whose channels are the last axis are searched
        if q.spec.granularity == "ptf" and q.spec.scheme == "uniform" and q.ptf_axis == -1:
            weight = row_weights[id(q)]
            if id(q) in token_weights:  # samples divided by their token factors: weigh errors back
                weight = weight * token_weights[id(q)]
            scale, zp, err, err0 = search_ptf(x, q.range_min, q.range_max, q.spec.bits, row_weight=weight)
            q.set_ptf(scale, zp)
            result.choices.append(OptMChoice(q.name, "ptf", 0, err0, err))
            continue
        if q.spec.scheme != "uniform" or q.spec.granularity != "per_tensor":
            continue  # PoT, two-region and other PTF grids keep their own calibration
        if q.layer in getattr(model, "vitq_first_layers", []) and q.role == "input":
            continue  # the 8-bit image input keeps its min-max range
        lo, hi, err0 = search_uniform_clip(x, q.spec.bits, out_fn)
        q.set_range(torch.tensor(lo, device=x.device), torch.tensor(hi, device=x.device))
        top_m = default_m_max(q.spec.bits) if m_max is None else m_max
        if id(q) in targets and top_m > 0:
            delta, m, boundary, err = search_two_region(x, q.spec.bits, top_m, targets[id(q)], out_fn)
            choice = OptMChoice(q.name, "two_region", m, err0, err) if err < err0 else OptMChoice(
                q.name, "uniform", 0, err0, err0)
            if err < err0:
                q.set_two_region(delta, m, boundary, targets[id(q)])
            result.choices.append(choice)
    return result

