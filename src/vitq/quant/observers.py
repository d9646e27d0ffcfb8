"""Observers: range statistics that decide a quantizer's clipping range (kept apart from the quantizers).

* ``minmax``: the exact minimum and maximum seen.
* ``percentile``: the ``p``-th and ``(100-p)``-th percentiles of the values seen.
* ``mse``: the clip range ``r * [min, max]`` (``r`` on a grid in (0, 1]) that minimizes the mean squared
  error of the quantized tensor, or, when an ``output_fn`` is given, of the layer output it feeds.

Activations are observed batch by batch. ``minmax`` is exact over all data; ``percentile`` and ``mse``
work on a seeded random sample of rows (at most ``max_elements`` values) so memory and time stay
bounded on big activations such as attention maps.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import quantizers as Q

OBSERVERS = ("minmax", "percentile", "mse")
MSE_GRID = torch.linspace(0.05, 1.0, 96)  # shrink factors of the min-max range tried by the MSE search


def minmax_range(x: torch.Tensor, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over all values (``axis=None``) or per channel along ``axis``."""
    dims = Q.reduce_dims(x, axis)
    return x.amin(dim=dims), x.amax(dim=dims)


def percentile_range(x: torch.Tensor, pct: float, axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(100-pct)``-th and ``pct``-th percentiles, per tensor or per channel along ``axis``."""
    if not 50.0 < pct <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {pct}")
    rows = _channel_rows(x, axis).float()
    k_hi = max(1, min(rows.shape[1], int(round(rows.shape[1] * pct / 100.0))))
    k_lo = max(1, rows.shape[1] - k_hi + 1)
    hi = rows.kthvalue(k_hi, dim=1).values
    lo = rows.kthvalue(k_lo, dim=1).values
    return (lo[0], hi[0]) if axis is None else (lo, hi)


def _channel_rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``[channels, values]`` view: one row for per-tensor, one row per channel along ``axis``."""
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def mse_range(
    x: torch.Tensor, quantize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    axis: int | None = None, output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    grid: torch.Tensor = MSE_GRID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Search the clip range ``r * [min, max]`` minimizing the quantization error.

    Args:
        x: the values (a sample for activations, the whole tensor for weights).
        quantize: ``quantize(x, lo, hi)`` returns the fake-quantized ``x`` for clip range ``[lo, hi]``
            (``lo``/``hi`` shaped for broadcasting against ``x``).
        axis: channel axis for a per-channel search (each channel keeps its own best ``r``).
        output_fn: when given, the error is measured on ``output_fn(x)`` (the layer output), per tensor.
        grid: the shrink factors tried.

    Returns:
        The best ``(lo, hi)``, scalars or per-channel vectors.
    """
    lo0, hi0 = minmax_range(x, axis)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis % x.dim()] = -1
    dims = Q.reduce_dims(x, axis)
    ref = output_fn(x) if output_fn is not None else None
    best_err = torch.full_like(lo0, float("inf"))
    best_r = torch.ones_like(lo0)
    for r in grid.tolist():
        lo, hi = (lo0 * r).reshape(shape), (hi0 * r).reshape(shape)
        xq = quantize(x, lo, hi)
        if ref is not None:
            err = (output_fn(xq) - ref).pow(2).mean()
        else:
            err = (xq - x).pow(2).mean(dim=dims)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return lo0 * best_r, hi0 * best_r


class ActivationObserver:
    """Accumulates statistics of one activation tensor over calibration batches.

    Args:
        method: one of :data:`OBSERVERS`.
        max_elements: cap on the values kept for ``percentile``/``mse``.
        seed: seed of the row sampling, so calibration is reproducible.
        axis: channel axis of a per-channel (PTF) grid; its min/max are kept per channel.
        per_position: keep min/max per position and channel (token shifts), for a PTF grid (``axis=-1``)
            or a per-tensor one (``axis=None``; its kept rows remember their positions, so the clip search
            can run on the rows divided by their positions' factors).
    """

    def __init__(self, method: str = "minmax", max_elements: int = 1 << 20, seed: int = 0, axis: int | None = None,
                 per_position: bool = False):
        if method not in OBSERVERS:
            raise ValueError(f"unknown observer '{method}', choose from {', '.join(OBSERVERS)}")
        if per_position and axis not in (None, -1):
            raise ValueError("per-position ranges need channel-last tensors (axis=-1 or a per-tensor grid)")
        self.method = method
        self.axis = axis  # when set, min/max are kept per channel along this axis (PTF grids)
        # when set, min/max are kept per position and channel (reduced over the batch axis only), for
        # token shifts (quantizers.token_shift_params)
        self.per_position = per_position
        self.max_elements = max_elements
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []  # per kept row, its flat position index (per_position only)
        self.n_rows = 0
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.per_position:
            lo, hi = x.amin(dim=0), x.amax(dim=0)
            if self.min is not None and lo.shape != self.min.shape:
                raise ValueError(f"per-position ranges need one input size: saw positions x channels "
                                 f"{tuple(self.min.shape)}, then {tuple(lo.shape)}")
        elif self.axis is not None:
            dims = Q.reduce_dims(x, self.axis)
            lo, hi = x.amin(dim=dims), x.amax(dim=dims)
        else:
            lo, hi = x.amin(), x.amax()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        if self.method == "minmax" or self.axis is not None:
            return
        # Keep whole rows (last dimension = channels of a linear input), so that the layer-output
        # objective can push the sample through the layer's weight.
        rows = x.reshape(-1, x.shape[-1])
        # flat position of each row: rows run over the batch, then the positions
        pos = torch.arange(rows.shape[0], device=rows.device) % (rows.shape[0] // x.shape[0]) if self.per_position else None
        budget = max(1, self.max_elements // max(1, rows.shape[1]) // 8)  # ~8 batches' worth each
        if rows.shape[0] > budget:
            idx = torch.randperm(rows.shape[0], generator=self.generator, device="cpu")[:budget].sort().values
            rows = rows[idx]
            pos = pos[idx] if pos is not None else None
        self.rows.append(rows.clone())
        if pos is not None:
            self.positions.append(pos)
        self.n_rows += rows.shape[0]

    @property
    def seen(self) -> bool:
        return self.min is not None

    def sample(self, token_shift: torch.Tensor | None = None) -> torch.Tensor:
        """The kept rows, cut to ``max_elements`` values by a seeded choice; with ``token_shift`` (per
        position, a per-position per-tensor observer only), each row divided by its position's factor."""
        rows = torch.cat(self.rows)
        pos = torch.cat(self.positions) if token_shift is not None else None
        cap = max(1, self.max_elements // rows.shape[1])
        if rows.shape[0] > cap:
            idx = torch.randperm(rows.shape[0], generator=self.generator, device="cpu")[:cap].sort().values
            rows, pos = rows[idx], (pos[idx] if pos is not None else None)
        if pos is not None:
            rows = rows / torch.exp2(token_shift.flatten())[pos].unsqueeze(-1)
        return rows

    def compute_range(self, quantize=None, percentile: float = 99.99,
                      output_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      token_shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip range from what was observed.

        Args:
            token_shift: a per-position per-tensor observer only: the positions' power-of-two exponents;
                the range is that of the values divided by their positions' factors.

        Raises:
            RuntimeError: nothing was observed (the tensor never ran during calibration).
        """
        if not self.seen:
            raise RuntimeError("observer saw no data")
        if self.axis is not None:
            return self.min, self.max
        if self.method == "minmax":
            if not self.per_position:
                return self.min, self.max
            f = 1.0 if token_shift is None else torch.exp2(token_shift).unsqueeze(-1)
            return (self.min / f).amin(), (self.max / f).amax()
        sample = self.sample(token_shift if self.per_position else None)
        if self.method == "percentile":
            return percentile_range(sample, percentile)
        return mse_range(sample, quantize, output_fn=output_fn)
