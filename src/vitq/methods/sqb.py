"""SQ-b: SmoothQuant with a per-channel bias shift (MPTQ-ViT, Tai & Wu 2024), folded into LayerNorm.

For a Linear fed by a LayerNorm, with calibration inputs ``X`` (tokens x channels) and weight ``W``
(out x in):

* centre each channel: ``b_j = (max_t X_tj + min_t X_tj) / 2`` (removes the asymmetry);
* migrate difficulty: ``s_j = max_t |X_tj - b_j|^alpha / max_k |W_kj|^(1-alpha)``;
* fold exactly: LayerNorm ``gamma' = gamma / s``, ``beta' = (beta - b) / s``; ``W' = W diag(s)``;
  ``bias' = bias + W b``. In float the model is unchanged.

``alpha`` is searched per layer on a grid, minimizing that layer's quantized-output MSE on the
calibration data at the configured bit-widths. A channel whose calibration range is zero (a LayerNorm
channel with gamma = 0 outputs the constant beta) gets ``s_j = 1``: after centring it is exactly 0, so
any scale is exact, and dividing by its zero range would produce inf.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant import quantizers as Q
from ..quant.config import QuantConfig
from .capture import collect_inputs, output_fn, quant_weight
from .optm import default_m_max, search_two_region

DEFAULT_ALPHAS = tuple(round(0.2 + 0.05 * i, 2) for i in range(16))  # 0.20 .. 0.95


@dataclass
class SQBLayer:
    """What SQ-b chose for one Linear."""

    name: str
    alpha: float
    mse_before: float  # quantized-output MSE without SQ-b (alpha = none)
    mse_after: float


@dataclass
class SQBResult:
    layers: list[SQBLayer] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [vars(layer) for layer in self.layers]


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = a_j^alpha / w_j^(1-alpha)``, with ``s_j = 1`` where either range is zero."""
    ok = (x_absmax > 0) & (w_absmax > 0)
    s = x_absmax.clamp_min(1e-12).pow(alpha) / w_absmax.clamp_min(1e-12).pow(1 - alpha)
    return torch.where(ok, s, torch.ones_like(s))


def _two_region_output_mse(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, a_bits: int, w_bits: int,
                           factor: torch.Tensor | None = None) -> float:
    """MSE of ``Q2(x) Q(w)^T`` against the float output ``ref``, ``Q2`` the best two-region grid for ``x``
    (signed fine region: GELU dips below zero) chosen the way OPT-m chooses it, through ``Q(w)``; with
    ``factor`` (a ``[rows, 1]`` column) each output row is multiplied by it first."""
    out = output_fn(quant_weight(w, w_bits), factor)
    delta, m, boundary, _ = search_two_region(x, a_bits, default_m_max(a_bits), True, out)
    xq = Q.fake_quant_two_region(x, torch.tensor(delta, device=x.device), m, torch.tensor(boundary, device=x.device), a_bits, True)
    return (out(xq) - ref).pow(2).mean().item()


def _quant_output_mse(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, a_bits: int, w_bits: int) -> float:
    """MSE of ``Q(x) Q(w)^T`` against the float output (min-max grids: per-tensor x, per-channel w)."""
    sx, zx = Q.uniform_params(x.min(), x.max(), a_bits, symmetric=False)
    xq = Q.fake_quant_uniform(x, sx, zx, *Q.int_range(a_bits, False))
    return (xq @ quant_weight(w, w_bits).T - ref).pow(2).mean().item()


@torch.no_grad()
def fold(norm: nn.LayerNorm, linear: nn.Linear, b: torch.Tensor, s: torch.Tensor) -> None:
    """Fold shift ``b`` and scale ``s`` into ``norm`` and ``linear`` (exact in real arithmetic)."""
    w = linear.weight
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
    linear.bias.add_(w @ b)  # uses the original W: W x = W (x - b) + W b
    w.mul_(s[None, :])
    norm.weight.div_(s)
    norm.bias.sub_(b).div_(s)


def apply_sqb(model: nn.Module, calib: torch.Tensor, config: QuantConfig, alphas=DEFAULT_ALPHAS,
              max_rows: int = 4096, progress: bool = True) -> SQBResult:
    """Apply SQ-b in place to every LayerNorm -> Linear pair the family adapter names.

    Args:
        model: float model (modified in place; still float, equal to the original up to rounding).
        calib: calibration images.
        config: bit-widths used by the per-layer alpha search (each layer's own W/A bits).
        alphas: the alpha grid.
        max_rows: tokens per layer used by the search.

    Returns:
        The chosen alpha and quantized-output MSE before/after, per layer.
    """
    adapter = adapter_for(model)
    pairs = list(adapter.norm_linear_pairs(model))
    names = {m: n for n, m in model.named_modules()}
    linears = [lin for _, lin in pairs]
    inputs = collect_inputs(model, linears, calib, max_rows)
    result = SQBResult()
    for (norm, lin), x in tqdm(list(zip(pairs, inputs)), desc="SQ-b", disable=None if progress else True, leave=False):
        name = names[lin]
        bits = config.layer_settings(name)
        xmax, xmin = x.amax(0), x.amin(0)
        b = (xmax + xmin) / 2
        x_absmax = (xmax - xmin) / 2
        w = lin.weight.detach().float()
        w_absmax = w.abs().amax(dim=0)
        before = _quant_output_mse(x, w, x @ w.T, bits["a_bits"], bits["w_bits"])
        centred_ref = (x - b) @ w.T
        best = (float("inf"), None, None)
        for alpha in alphas:
            s = smoothing_factors(x_absmax, w_absmax, alpha)
            # X' W'^T = (X - b) W^T exactly; the constant W b moved into the bias is not quantized.
            err = _quant_output_mse((x - b) / s, w * s[None, :], centred_ref, bits["a_bits"], bits["w_bits"])
            if err < best[0]:
                best = (err, alpha, s)
        fold(norm, lin, b, best[2])
        result.layers.append(SQBLayer(name, best[1], before, best[0]))
    return result
