"""GPTQ weight rounding (Frantar et al., 2023), run after calibration on a quantized model.

Round-to-nearest quantizes every weight independently. GPTQ quantizes one input column at a time and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian ``H = XᵀX`` of the layer's inputs, which minimizes ``‖X Wᵀ - X Q(W)ᵀ‖²`` far better than
rounding to nearest. The grid (per-channel or per-tensor scale from calibration) is kept; only the
integer chosen for each weight changes. The result is written back as the layer's weight: it lies on
the grid, so the layer's fake-quantized weight equals it and every exporter packs the same integers.

vitq runs it *sequentially*: layers are processed in execution order and each layer's ``X`` is its
quantized input in the model whose upstream layers are already quantized and rounded, so a layer also
compensates for the error its inputs carry. For models with a plain block sequence (``Adapter.trunk``)
the block inputs are cached, so each layer costs one partial pass through its own block.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant import quantizers as Q
from ..quant.engine import weight_layers
from ..quant.layers import QuantConv2d, QuantLinear
from .capture import row_factor


@dataclass
class GPTQLayer:
    name: str
    rows: int  # input rows (tokens or conv positions) in the Hessian
    err_rtn: float  # ||X W^T - X RTN(W)^T||^2 / ||X W^T||^2 on the same rows, round to nearest
    err_gptq: float  # the same with the GPTQ weights


@dataclass
class GPTQResult:
    layers: list[GPTQLayer] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # layers GPTQ cannot handle (PoT, grouped conv, ...)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"layers": [vars(x) for x in self.layers], "skipped": self.skipped, "seconds": self.seconds}


FIT_BIAS = ("none", "norm_fed", "all")


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def _supported(m: nn.Module, max_bits: int) -> bool:
    q = m.w_quant
    if q.spec.bits > max_bits:
        return False
    if q.spec.scheme not in ("uniform", "apot", "mixed") or q.spec.granularity not in ("per_channel", "per_tensor"):
        return False
    return isinstance(m, QuantLinear) or (isinstance(m, QuantConv2d) and m.groups == 1)


def _as_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's (quantized) input as a matrix whose rows multiply the flattened weight."""
    if isinstance(m, QuantLinear):
        f = row_factor(m, x)  # token scaling: the rows at the true scale their outputs are multiplied back to
        rows = x.reshape(-1, x.shape[-1])
        return rows if f is None else rows * f
    if m.same_padding:
        x = pad_same(x, m.weight.shape[-2:], m.stride, m.dilation)
        padding = 0
    else:
        padding = m.padding
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, quant, damp: float = 0.01, act_order: bool = True,
                  block: int = 128, keep_last: bool = False) -> torch.Tensor:
    """GPTQ on one weight matrix.

    Args:
        w: ``[out, in]`` float weights.
        h: ``[in, in]`` Hessian ``XᵀX`` of the layer's inputs.
        quant: fake-quantizes one column ``[out, 1]`` on the layer's grid (per-row scales broadcast).
        damp: added to the diagonal, as a fraction of its mean (numerical stability).
        act_order: quantize columns in order of decreasing ``H_jj`` (large inputs first).
        block: columns updated together (speed only; the result is the same up to rounding).
        keep_last: the last column is a bias (its input is all ones): processed last and never quantized,
            so it takes the compensation of every other column's error.

    Returns:
        The quantized weights ``[out, in]`` (on the grid), in the original column order.
    """
    w = w.clone().double()
    h = h.clone().double()
    # Inputs that were always zero on the calibration data: a unit diagonal decouples them, so their
    # weights are simply rounded to nearest (not zeroed as in the paper: they may be non-zero later).
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    n_q = w.shape[1] - int(keep_last)
    perm = torch.argsort(torch.diag(h)[:n_q], descending=True, stable=True) if act_order else torch.arange(n_q, device=h.device)
    if keep_last:
        perm = torch.cat([perm, torch.tensor([n_q], device=h.device)])
    w, h = w[:, perm], h[perm][:, perm]
    # Damping relative to the inputs' own scale: a bias column (all ones) must not set it.
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * damp * torch.diag(h)[:n_q].mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    n = w.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i:i + 1]
            q = col if i1 + i >= n_q else quant(col.float()).double()
            out[:, i1 + i] = q[:, 0]
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return out[:, inv]


CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0 .. 0.5


@torch.no_grad()
def hessian_clip(w: torch.Tensor, h: torch.Tensor, wq, ratios=CLIP_RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip range of a weight grid chosen on the layer's *output* error, ``(W - Q(W)) H (W - Q(W))^T``.

    The weight observers choose a clip on the weight's own error, which treats every input alike. A
    weight that multiplies a rare, huge input (the input of ViT-Tiny's "massive activation" in
    blocks.7.mlp.fc2, docs/methods.md) is an outlier of its row, so the weight-MSE clip cuts it and the
    huge output it exists to produce is lost. Weighting the error by the input's second moment
    ``H = X^T X`` keeps it (tested).

    Args:
        w: ``[out, in]`` float weight.
        h: ``[in, in]`` input second moment.
        wq: the layer's weight quantizer (its spec decides the grid; its range is not changed here).
        ratios: candidate clips as fractions of the per-row (or per-tensor) min and max.

    A ``mixed`` grid also chooses each row's grid (uniform or APoT) on this output error and sets it on
    ``wq`` (:func:`~vitq.quant.quantizers.split_channels`).

    Returns:
        ``(lo, hi)`` to pass to ``wq.set_range``: per row for per-channel grids, scalars per tensor.
    """
    per_row = wq.spec.granularity == "per_channel"
    w = w.float()
    h = h.float()
    if wq.spec.scheme == "mixed":  # each row's grid by output error too, each at its own best clip
        (err_u, lo_u, hi_u), (err_a, lo_a, hi_a) = (_best_clip(w, h, wq, s, per_row, ratios) for s in ("uniform", "apot"))
        mask = Q.split_channels(err_u, err_a, wq.spec.apot_share)
        wq.set_apot_channels(mask)
        return torch.where(mask, lo_a, lo_u), torch.where(mask, hi_a, hi_u)
    return _best_clip(w, h, wq, wq.spec.scheme, per_row, ratios)[1:]


def _best_clip(w, h, wq, scheme: str, per_row: bool, ratios) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(output error, lo, hi)`` at the best clip ratio of ``scheme``'s grid (``uniform`` or ``apot``)."""
    lo0 = w.amin(1) if per_row else w.min()
    hi0 = w.amax(1) if per_row else w.max()
    qmin, qmax = Q.int_range(wq.spec.bits, wq.spec.symmetric)
    best_err = best_lo = best_hi = None
    for r in ratios:
        lo, hi = lo0 * r, hi0 * r
        if scheme == "apot":
            scale = Q.apot_scale(torch.maximum(lo.abs(), hi.abs()), wq.spec.bits)
            e = w - Q.fake_quant_apot(w, scale.reshape(-1, 1) if per_row else scale, wq.spec.bits)
        else:
            scale, zp = Q.uniform_params(lo, hi, wq.spec.bits, wq.spec.symmetric)
            e = w - Q.fake_quant_uniform(w, scale, zp, qmin, qmax, axis=0 if per_row else None)
        err = ((e @ h) * e).sum(1)
        if not per_row:
            err = err.sum()
        if best_err is None:
            best_err, best_lo, best_hi = err, lo, hi
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo, best_hi = torch.where(better, lo, best_lo), torch.where(better, hi, best_hi)
    return best_err, best_lo, best_hi


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()


@torch.no_grad()
def apply_gptq(model: nn.Module, calib: torch.Tensor, n_images: int = 32, damp: float = 0.01,
               act_order: bool = True, fit_bias: str = "norm_fed", min_rows_per_input: float = 4.0,
               max_bits: int = 8, clip_search: bool = True, progress: bool = True) -> GPTQResult:
    """Re-round every supported weight of a calibrated model with GPTQ (in place).

    Args:
        model: a prepared and calibrated model (activation quantizers on: each layer sees the
            quantized inputs it will see at inference).
        calib: calibration images; the first ``n_images`` build the Hessians.
        damp: diagonal damping as a fraction of the mean of ``diag(H)``.
        act_order: process columns by decreasing ``H_jj``.
        fit_bias: which Linears also re-fit their bias: ``norm_fed`` (those a LayerNorm feeds, the default),
            ``all`` or ``none``.
        min_rows_per_input: layers with fewer Hessian rows per input column keep round-to-nearest.
        max_bits: layers with wider weights keep round-to-nearest (not listed as skipped).
        clip_search: first re-choose the grid's clip range on the output error (:func:`hessian_clip`).

    Returns:
        Per layer, the relative output error with round-to-nearest and with GPTQ on its Hessian rows.
    """
    t0 = time.perf_counter()
    x = calib[:n_images]
    layers = weight_layers(model)
    result = GPTQResult()
    todo = []
    for m in layers:
        if _supported(m, max_bits):
            todo.append(m)
        elif m.w_quant.spec.bits <= max_bits:
            result.skipped.append(m.layer_name)
    adapter = adapter_for(model)
    # Bias fitting only where a LayerNorm feeds the Linear (qkv, fc1): fitted on proj/fc2 too, which write
    # into the residual stream, it made ViT-Tiny W4A4 worse on the calibration images themselves
    # (benchmarks/gptq_variants.py, docs/methods.md).
    if fit_bias not in FIT_BIAS:
        raise ValueError(f"fit_bias must be one of {', '.join(FIT_BIAS)}, got {fit_bias!r}")
    bias_fit_ids = {id(lin) for _, lin in adapter.norm_linear_pairs(model)} if fit_bias == "norm_fed" else set()
    trunk = adapter.trunk(model)
    stages = [model] if trunk is None else [trunk[0], *trunk[1], trunk[2]]
    done: set[int] = set()
    captured: dict = {}

    def hook(mod, args, out):
        if id(mod) not in done and "layer" not in captured:
            captured["layer"] = owners[id(mod)]
            captured["x"] = out.detach()
            raise _Stop

    owners = {id(m.in_quant): m for m in todo}
    handles = [m.in_quant.register_forward_hook(hook) for m in todo]

    def run(stage, inp):
        """Run one stage; returns (layer, its input) at the first layer not done yet, else (None, output)."""
        captured.clear()
        try:
            return None, stage(inp)
        except _Stop:
            return captured["layer"], captured["x"]

    bar = tqdm(total=len(todo), desc="GPTQ", disable=None if progress else True, leave=False)
    try:
        model.eval()
        for stage in stages:
            while True:
                m, xq = run(stage, x)
                if m is None:  # this stage has no layer left: its output feeds the next stage
                    x = xq
                    break
                rows = _as_rows(m, xq).double()
                done.add(id(m.in_quant))
                if rows.shape[0] < min_rows_per_input * rows.shape[1]:
                    # Too few rows (e.g. a classifier head sees one token per image): the Hessian is
                    # rank-deficient and GPTQ would fit the calibration images, not the layer.
                    result.skipped.append(m.layer_name)
                    bar.update(1)
                    continue
                w = m.weight.detach().reshape(m.weight.shape[0], -1).double()
                if clip_search:
                    # the grid's clip, re-chosen on the output error now that the layer's inputs are known
                    m.w_quant.set_range(*hessian_clip(w, rows.T @ rows, m.w_quant))
                bias = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                ref = rows @ w.T + bias
                fb = fit_bias == "all" or id(m) in bias_fit_ids
                if fb:
                    # The bias is one more input column (all ones) that is never quantized: quantized last,
                    # it receives the compensation of every column's error, i.e. an optimal bias correction.
                    rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
                    w_aug = torch.cat([w, bias[:, None]], 1)
                else:
                    w_aug = w
                h = rows.T @ rows
                # the weight quantizer takes a [out, 1] column as it takes the weight: per-row scales broadcast
                qw = gptq_quantize(w_aug, h, m.w_quant.fake_quant, damp=damp, act_order=act_order, keep_last=fb)
                rtn = m.w_quant.fake_quant(m.weight.detach()).reshape(w.shape).double()
                sel = slice(None, None, max(1, rows.shape[0] // 8192))
                base = ref[sel]
                err_rtn = _rel_err(base, rows[sel, : w.shape[1]] @ rtn.T + bias)
                err_new = _rel_err(base, rows[sel] @ qw.T + (0 if fb else bias))
                result.layers.append(GPTQLayer(m.layer_name, int(rows.shape[0]), err_rtn, err_new))
                m.weight.copy_(qw[:, : w.shape[1]].reshape(m.weight.shape).to(m.weight.dtype))
                if fb:
                    if m.bias is None:
                        m.bias = nn.Parameter(qw[:, -1].to(m.weight.dtype))
                    else:
                        m.bias.copy_(qw[:, -1])
                m.refresh()
                bar.update(1)
    finally:
        for hd_ in handles:
            hd_.remove()
        bar.close()
    missed = [m.layer_name for m in todo if id(m.in_quant) not in done]
    result.skipped += missed  # layers the forward pass never reached (unused heads)
    result.seconds = time.perf_counter() - t0
    return result


@torch.no_grad()
def input_hessians(model: nn.Module, calib: torch.Tensor, layers: list[nn.Module],
                   fit_bias_ids: set[int]) -> dict[int, tuple[torch.Tensor, int]]:
    """``(X^T X, rows of X)`` of each layer's input on ``calib``, in one pass of the model as it is (with its
    quantizers off, the float inputs), with the all-ones bias column appended to ``X`` for the layers in
    ``fit_bias_ids``; keyed by ``id(layer)``."""
    hess: dict[int, tuple[torch.Tensor, int]] = {}

    def hook(mod, args, out):
        rows = _as_rows(mod, args[0].detach()).double()
        if id(mod) in fit_bias_ids:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
        h, n = hess.get(id(mod), (0.0, 0))
        hess[id(mod)] = (h + rows.T @ rows, n + rows.shape[0])

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        for b in calib.split(8):
            model(b)
    finally:
        for hd_ in handles:
            hd_.remove()
    return hess


@torch.no_grad()
def gptq_rounded(m: nn.Module, h: torch.Tensor, fit_bias: bool, damp: float = 0.01,
                 act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`apply_gptq` would write into one layer for Hessian ``h`` (augmented by the bias column
    when ``fit_bias``), without writing it: ``(weight, fitted bias or None)``. The weight quantizer's
    clip range is re-chosen on ``h`` (:func:`hessian_clip`) and left set, as apply_gptq leaves it."""
    w = m.weight.detach().reshape(m.weight.shape[0], -1).double()
    m.w_quant.set_range(*hessian_clip(w, h[: w.shape[1], : w.shape[1]], m.w_quant))
    if fit_bias:
        bias = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        w = torch.cat([w, bias[:, None]], 1)
    qw = gptq_quantize(w, h, m.w_quant.fake_quant, damp=damp, act_order=act_order, keep_last=fit_bias)
    weight = qw[:, : m.weight[0].numel()].reshape(m.weight.shape).to(m.weight.dtype)
    return weight, (qw[:, -1].to(m.weight.dtype) if fit_bias else None)
