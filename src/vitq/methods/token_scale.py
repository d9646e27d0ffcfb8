"""Static power-of-two factors per token position on fc2's input (vitq's addition, "token scaling").

ViT-Tiny (augreg) creates its massive activations in block 7's MLP: at four fixed token positions (the
corner patches 1, 14, 183 and 196, in every image) one channel of fc2's post-GELU input reaches 215,
while no other position exceeds 5.2 (``benchmarks/token_scale_search.py vit_tiny``). fc2's input has one
per-tensor grid, so covering those four rows makes its step about 40 times coarser than the other 193
positions need; left in float, this one layer takes 44 % of ViT-Tiny's standard W4A4 KL away.

Token scaling divides a flagged position's row by ``2^b`` before the input quantizer (a forward pre-hook,
so calibration, OPT-m and reconstruction all see the divided rows) and multiplies the same row of the
layer's output, bias excluded, back (a forward hook):

    y_t = 2^b_t * (Q(x_t / 2^b_t) Q(W)^T) + bias

Exact in float. In integer hardware it is one shift of the accumulator per flagged row, and the
positions are static, like the full protocol's token shifts of the residual stream (``quant/quantizers.py``,
``token_shift_params``). Which positions: those whose largest magnitude on the calibration images is more
than ``2^TOKEN_FREE_LOG2`` (8) times the median position's (the same threshold as those token shifts). How
much: one exponent ``b`` in ``1..MAX_SHIFT`` for all flagged positions of the layer, the one with the
least quantized output error ``||2^b Q(x / 2^b) Q(W)^T - x W^T||^2`` (OPT-m's uniform clips and two-region
grids at the config's widths, per-channel min-max weights), kept only where it is lower than without.
DeiT-Tiny has no flagged position in any fc2 input, so it is unchanged. Another input length than the
calibrated one is refused with an error naming the layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant import quantizers as Q
from ..quant.config import QuantConfig
from .capture import TOKEN_SCALE_BUFFER, token_factor
from .rotation import _output_mse

MAX_SHIFT = 7
BUFFER = TOKEN_SCALE_BUFFER


def _scale_input(module: nn.Module, args):
    # runs before forward, so before QuantLinear's input quantizer: the quantizer sees x_t / 2^b_t
    return (args[0] / token_factor(module, args[0]),) + tuple(args[1:])


def _scale_output(module: nn.Module, args, out):
    f = token_factor(module, out)
    return out * f if module.bias is None else (out - module.bias) * f + module.bias


def attach_token_scale(linear: nn.Linear, shift: torch.Tensor) -> None:
    """Divide ``linear``'s input rows by ``2^shift`` (one exponent per token position) and multiply its
    output rows back; also used to restore a saved one (the buffer is part of the state dict)."""
    linear.register_buffer(BUFFER, shift.detach().float().clone())
    linear.register_forward_pre_hook(_scale_input)
    linear.register_forward_hook(_scale_output)


def restore_token_scales(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Re-create the token scaling that a saved state dict holds buffers for (artifact loading)."""
    modules = dict(model.named_modules())
    suffix = "." + BUFFER
    for key in state:
        if key.endswith(suffix):
            attach_token_scale(modules[key[: -len(suffix)]], state[key])


@dataclass
class TokenScaleLayer:
    """One layer with flagged positions: its exponent (0: left unscaled) and both output errors."""

    name: str
    positions: list[int]
    shift: int
    mse_before: float
    mse_scaled: float
    flagged_max: float = 0.0  # the largest magnitude at a flagged position
    other_max: float = 0.0  # ... and at any other position


@dataclass
class TokenScaleResult:
    layers: list[TokenScaleLayer] = field(default_factory=list)

    def to_dict(self) -> list[dict]:
        return [vars(layer) for layer in self.layers]


def flagged_positions(x: torch.Tensor, free_log2: float = Q.TOKEN_FREE_LOG2) -> torch.Tensor:
    """Positions of ``x`` ``[images, T, C]`` whose largest magnitude exceeds ``2^free_log2`` times the
    median position's (a boolean ``[T]``)."""
    peak = x.abs().amax(dim=(0, 2))
    return peak > peak.median() * 2.0**free_log2


@torch.no_grad()
def apply_token_scale(model: nn.Module, calib: torch.Tensor, config: QuantConfig, max_images: int = 8,
                      progress: bool = True) -> TokenScaleResult:
    """Scale the flagged token positions of every fc2 input where that lowers its quantized output error.

    Args:
        model: float model (modified in place; its outputs stay equal up to rounding).
        calib: calibration images; the first ``max_images`` are used.
        config: the default widths at which the choice is scored.
        max_images: images used for the positions and the search.
        progress: show a progress bar.

    Returns:
        Per fc2 input with flagged positions, the exponent chosen (0: none) and the output errors.
    """
    names = {m: n for n, m in model.named_modules()}
    todo = [m for m in adapter_for(model).post_gelu_linears(model) if getattr(m, BUFFER, None) is None]
    store: dict[int, list[torch.Tensor]] = {id(m): [] for m in todo}

    def grab(mod, args):
        store[id(mod)].append(args[0].detach().float())

    hooks = [m.register_forward_pre_hook(grab) for m in todo]
    try:
        model(calib[:max_images])
    finally:
        for h in hooks:
            h.remove()
    result = TokenScaleResult()
    for lin in tqdm(todo, desc="token scaling", disable=None if progress else True, leave=False):
        x = torch.cat(store[id(lin)]) if store[id(lin)] else None
        if x is None or x.dim() != 3:
            continue  # not a token tensor (or never run): nothing to scale
        flagged = flagged_positions(x)
        if not bool(flagged.any()):
            continue
        rows = x.reshape(-1, x.shape[-1])
        w = lin.weight.detach().float()
        ref = rows @ w.T
        errors = []
        for b in range(MAX_SHIFT + 1):
            f = torch.where(flagged, 2.0**b, 1.0).expand(x.shape[0], -1).reshape(-1, 1)
            # the quantizer sees rows / f, and fc2's output rows are multiplied back by f
            errors.append(_output_mse(rows / f, w, ref, config.a_bits, config.w_bits, two_region=True, factor=f))
        b = min(range(MAX_SHIFT + 1), key=lambda k: (errors[k], k))  # ties keep the smaller exponent
        if b > 0:
            attach_token_scale(lin, torch.where(flagged, float(b), 0.0))
        peak = x.abs().amax(dim=(0, 2))
        result.layers.append(TokenScaleLayer(names[lin], flagged.nonzero().flatten().tolist(), b, errors[0], errors[b],
                                             peak[flagged].max().item(), peak[~flagged].max().item()))
    return result
