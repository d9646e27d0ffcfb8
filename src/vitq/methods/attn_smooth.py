"""Attention smoothing: float-exact per-channel rescaling inside self-attention (vitq's addition).

Not part of MPTQ-ViT. SQ-b smooths the inputs of the Linears a LayerNorm feeds; inside attention two more
operands are quantized per tensor, and the standard-protocol W4A4 sensitivity table (docs/results.md,
session 9) found them costly on DeiT-Tiny: with ``q`` left in float the KL fell from 0.302 to 0.217, with
the attention output (proj's input) in float to 0.177. Both can be smoothed with nothing left to run at
inference, because every factor folds into the weights of ``qkv`` and ``proj``:

* **q/k**: per channel ``j`` of the head dimension, ``q'_j = q_j / t_j`` and ``k'_j = (k_j - c_j) t_j``.
  ``q' k'^T = q k^T - q c^T``: the second term is constant along each row of the attention logits, and
  softmax ignores a per-row constant, so the attention weights are unchanged. The shift ``c_j`` (the
  centre of k's calibration range, SQ-b's ``b``) removes k's asymmetry; ``t_j = qmax_j^alpha /
  kabs_j^(1-alpha)`` balances the two operands' ranges as SmoothQuant balances activation and weight.
  Folded into the q and k rows of ``qkv``'s weight and bias. The weights are quantized per output channel,
  so scaling a row does not change its relative rounding error.
* **v/proj**: scale only, ``v'_c = v_c / s_c`` and ``W'_proj = W_proj diag(s)``: each attention-output
  channel is a convex combination of the same v channel, so it is divided by ``s_c`` too, and proj
  multiplies it back. ``s_c = xmax_c^alpha / wmax_c^(1-alpha)`` as in SQ-b, with ``x`` the attention
  output. (A shift would also fold, since softmax rows sum to 1, but once the softmax output is quantized
  its rows no longer sum exactly to 1 and the shift would leave an error of its own; so no shift.)

``alpha`` is searched per attention module on SQ-b's grid, plus "leave unchanged", minimizing the MSE of
the quantized product against the float one (min-max grids at the config's default widths, as SQ-b's
search): the attention logits for q/k, proj's output for v/proj. So a module is only changed where that
lowers the error. Modules with a q/k norm, an output norm or a gate (timm options) are skipped: the
factors would not pass through them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant import quantizers as Q
from ..quant.config import QuantConfig
from .sqb import DEFAULT_ALPHAS, _quant_output_mse, smoothing_factors


@dataclass
class AttnSmoothLayer:
    """What the search chose for one attention module (``None``: left unchanged)."""

    name: str
    qk_alpha: float | None
    qk_mse_before: float  # quantized-logit MSE unchanged
    qk_mse_after: float
    v_alpha: float | None
    v_mse_before: float  # quantized proj-output MSE unchanged
    v_mse_after: float


@dataclass
class AttnSmoothResult:
    layers: list[AttnSmoothLayer] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [vars(layer) for layer in self.layers]


def _minmax_quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    s, z = Q.uniform_params(x.min(), x.max(), bits, symmetric=False)
    return Q.fake_quant_uniform(x, s, z, *Q.int_range(bits, False))


def _logit_mse(q: torch.Tensor, k: torch.Tensor, ref: torch.Tensor, bits: int) -> float:
    """MSE of ``Q(q) Q(k)^T`` (per-tensor min-max grids) against ``ref``; q, k: [B, H, N, d]."""
    return (_minmax_quant(q, bits) @ _minmax_quant(k, bits).transpose(-2, -1) - ref).pow(2).mean().item()


def _capture(model: nn.Module, attns: list[nn.Module], calib: torch.Tensor):
    """Per attention module: qkv's output [B, N, 3C] and proj's input [B*N, C] on ``calib`` (float)."""
    qkv_out: list[list[torch.Tensor]] = [[] for _ in attns]
    proj_in: list[list[torch.Tensor]] = [[] for _ in attns]
    hooks = []
    for i, a in enumerate(attns):
        hooks.append(a.qkv.register_forward_hook(lambda m, args, out, i=i: qkv_out[i].append(out.detach())))
        hooks.append(a.proj.register_forward_pre_hook(
            lambda m, args, i=i: proj_in[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    try:
        with torch.inference_mode():
            for b in calib.split(8):
                model(b)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(x) for x in qkv_out], [torch.cat(x) for x in proj_in]


def _search_qk(out: torch.Tensor, heads: int, bits: int, alphas) -> tuple[float, float, float | None, tuple | None]:
    """Best (t, c) for one module from qkv's output; returns (mse unchanged, mse best, alpha, (t, c))."""
    c3 = out.shape[-1]
    dim = c3 // 3
    q, k = out[..., :dim], out[..., dim:2 * dim]

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, H, N, d], timm's layout
        return x.reshape(x.shape[0], x.shape[1], heads, dim // heads).transpose(1, 2)

    before = _logit_mse(heads_first(q), heads_first(k), heads_first(q) @ heads_first(k).transpose(-2, -1), bits)
    best = (before, None, None)
    qmax = q.abs().amax(dim=(0, 1))
    kmax, kmin = k.amax(dim=(0, 1)), k.amin(dim=(0, 1))
    c = (kmax + kmin) / 2
    kabs = (kmax - kmin) / 2
    ref = heads_first(q) @ heads_first(k - c).transpose(-2, -1)  # softmax sees the same rows up to a constant
    for alpha in alphas:
        t = smoothing_factors(qmax, kabs, alpha)
        err = _logit_mse(heads_first(q / t), heads_first((k - c) * t), ref, bits)
        if err < best[0]:
            best = (err, alpha, (t, c))
    return before, best[0], best[1], best[2]


def _search_v(x: torch.Tensor, w: torch.Tensor, a_bits: int, w_bits: int, alphas):
    """Best scale-only ``s`` for proj's input; returns (mse unchanged, mse best, alpha, s)."""
    ref = x @ w.T
    before = _quant_output_mse(x, w, ref, a_bits, w_bits)
    best = (before, None, None)
    x_absmax, w_absmax = x.abs().amax(0), w.abs().amax(0)
    for alpha in alphas:
        s = smoothing_factors(x_absmax, w_absmax, alpha)
        err = _quant_output_mse(x / s, w * s[None, :], ref, a_bits, w_bits)
        if err < best[0]:
            best = (err, alpha, s)
    return before, best[0], best[1], best[2]


@torch.no_grad()
def fold_qk(attn: nn.Module, t: torch.Tensor, c: torch.Tensor) -> None:
    """q rows of ``qkv`` divided by ``t``; k rows shifted by ``-c`` and multiplied by ``t``."""
    qkv = attn.qkv
    dim = qkv.weight.shape[0] // 3
    if qkv.bias is None:
        qkv.bias = nn.Parameter(torch.zeros(qkv.weight.shape[0], dtype=qkv.weight.dtype))
    qkv.weight[:dim].div_(t[:, None])
    qkv.bias[:dim].div_(t)
    qkv.weight[dim:2 * dim].mul_(t[:, None])
    qkv.bias[dim:2 * dim].sub_(c).mul_(t)


@torch.no_grad()
def fold_v(attn: nn.Module, s: torch.Tensor) -> None:
    """v rows of ``qkv`` divided by ``s``; proj's input columns multiplied by ``s``."""
    qkv = attn.qkv
    dim = qkv.weight.shape[0] // 3
    qkv.weight[2 * dim:].div_(s[:, None])
    if qkv.bias is not None:
        qkv.bias[2 * dim:].div_(s)
    attn.proj.weight.mul_(s[None, :])


PARTS = ("qk", "v")


def apply_attn_smooth(model: nn.Module, calib: torch.Tensor, config: QuantConfig, alphas=DEFAULT_ALPHAS,
                      max_images: int = 8, progress: bool = True, parts=PARTS) -> AttnSmoothResult:
    """Smooth q/k and v/proj of every attention module the family adapter lists, in place, in float.

    Args:
        model: float model (modified in place; its outputs stay equal up to rounding).
        calib: calibration images; the first ``max_images`` are used.
        config: the default bit-widths at which alpha is scored (``a_bits`` for q, k and proj's input,
            ``w_bits`` for proj's weight).
        alphas: the alpha grid; "unchanged" is always a candidate as well.
        max_images: images used for the statistics and the search.
        progress: show a progress bar.
        parts: which transforms to search, a subset of ``("qk", "v")``; the others are left unchanged.

    Returns:
        Per module, the chosen alphas (None = unchanged) and the quantized MSEs before and after.
    """
    if not set(parts) <= set(PARTS):
        raise ValueError(f"attention smoothing parts must be among {PARTS}, got {tuple(parts)}")
    attns = adapter_for(model).qkv_attentions(model)
    if not attns:
        return AttnSmoothResult()
    names = {m: n for n, m in model.named_modules()}
    qkv_out, proj_in = _capture(model, attns, calib[:max_images])
    result = AttnSmoothResult()
    for a, out, x in tqdm(list(zip(attns, qkv_out, proj_in)), desc="attention smoothing", disable=None if progress else True,
                          leave=False):
        qk_before, qk_after, qk_alpha, tc = _search_qk(out, a.num_heads, config.a_bits,
                                                       alphas if "qk" in parts else ())
        if tc is not None:
            fold_qk(a, *tc)
        if hasattr(a.proj, "sqb_shift") or "v" not in parts:
            # not asked for, or --sq-b-unnormed already put an explicit (x - b) / s in front of proj (a
            # factor folded into v would not pass through its shift)
            v_before = v_after = float("nan")
            v_alpha = None
        else:
            w = a.proj.weight.detach().float()
            v_before, v_after, v_alpha, s = _search_v(x, w, config.a_bits, config.w_bits, alphas)
            if s is not None:
                fold_v(a, s)
        result.layers.append(AttnSmoothLayer(names[a], qk_alpha, qk_before, qk_after, v_alpha, v_before, v_after))
    return result
