"""What several passes share: capturing layers' inputs on calibration images, the min-max weight grid their
searches score with, and the per-row factors of token-scaled layers.

This module imports no pass, so every pass can import it (no import circle between the passes).
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant import quantizers as Q

# The buffer of a token-scaled Linear: one power-of-two exponent per token position (methods/token_scale.py).
TOKEN_SCALE_BUFFER = "token_scale_shift"


def collect_inputs(model: nn.Module, linears: list[nn.Module], calib: torch.Tensor, max_rows: int) -> list[torch.Tensor]:
    """Inputs (rows = tokens) of each Linear on the calibration images, one float pass.

    Args:
        model: the model to run (in whatever mode its quantizers are).
        linears: the layers whose inputs are wanted.
        calib: calibration images, run in batches of 32.
        max_rows: at most this many rows per layer, a seeded subset in their original order.

    Returns:
        One ``[rows, in_features]`` tensor per layer of ``linears``.
    """
    store: list[list[torch.Tensor]] = [[] for _ in linears]
    hooks = []
    for i, lin in enumerate(linears):
        def hook(mod, args, i=i):
            store[i].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for b in calib.split(32):
                model(b)
    finally:
        for h in hooks:
            h.remove()
    out = []
    g = torch.Generator().manual_seed(0)
    for rows in store:
        x = torch.cat(rows)
        if x.shape[0] > max_rows:  # a seeded subset keeps the searches fast (the ranges come from it too)
            x = x[torch.randperm(x.shape[0], generator=g, device="cpu")[:max_rows].sort().values]
        out.append(x)
    return out


def quant_weight(w: torch.Tensor, w_bits: int) -> torch.Tensor:
    """``w`` on its per-output-channel symmetric min-max grid (what the passes' searches score with)."""
    amax = w.abs().amax(dim=1)
    sw, zw = Q.uniform_params(-amax, amax, w_bits, symmetric=True)
    return Q.fake_quant_uniform(w, sw, zw, *Q.int_range(w_bits, True), axis=0)


def output_fn(wq: torch.Tensor, factor: torch.Tensor | None):
    """``v -> v wq^T``, each row multiplied by ``factor`` when given (token scaling's rows)."""
    return (lambda v: v @ wq.T) if factor is None else (lambda v: (v @ wq.T) * factor)


def token_factor(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``2^shift`` per position of a token-scaled layer, shaped ``[T, 1]`` to broadcast against ``x``
    ``[..., T, C]``.

    Raises:
        ValueError: ``x`` has another number of token positions than the layer was calibrated for.
    """
    shift = getattr(module, TOKEN_SCALE_BUFFER)
    if not torch.jit.is_tracing() and (x.dim() < 2 or x.shape[-2] != shift.shape[0]):
        raise ValueError(f"token scaling of {getattr(module, 'layer_name', 'a Linear')} was calibrated for "
                         f"{shift.shape[0]} token positions; got an input of shape {tuple(x.shape)}")
    return torch.pow(2.0, shift).to(x.dtype).unsqueeze(-1)  # pow, not exp2: ONNX has no exp2


def row_factor(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """For a token-scaled layer, ``2^b_t`` for each row of ``x.reshape(-1, C)`` as a ``[rows, 1]`` column
    (None otherwise): what turns the quantizer's divided rows back into the layer's true input scale."""
    if getattr(module, TOKEN_SCALE_BUFFER, None) is None:
        return None
    return token_factor(module, x).expand(*x.shape[:-1], 1).reshape(-1, 1)
