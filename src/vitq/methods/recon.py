"""Block reconstruction of quantization step sizes (vitq's addition, not in MPTQ-ViT).

OPT-m chooses each activation's clip range on that layer's own output error, one tensor at a time,
with float inputs. At 4 bits the errors of ~10 quantized tensors per block compound, and a clip that is
best for one layer alone is not best for the block. This pass tunes the step sizes of a block's
quantizers *jointly*, by gradient descent on the block's output error (the block-wise objective of
BRECQ, Li et al. 2021; the step-size gradient of LSQ, Esser et al. 2020):

* stages (stem, each block, head) are visited in order; a stage's input is the output of the already
  tuned quantized stages before it, its target the float model's output for the float input, so each
  stage also corrects the error it inherits;
* learned: the step size of every per-tensor uniform or two-region activation quantizer in the stage
  (log-parametrized), and optionally each weight's per-channel scale with its integer codes frozen
  (so GPTQ's rounding is kept and the weight stays on its grid);
* in the full protocol, one step multiplier per PTF grid (the residual stream): every channel's step
  scales by it, so the channels stay power-of-two apart;
* never learned: bit-widths, zero points, region ratios ``m``, PTF shifts, PoT grids, other float
  parameters. Every result is an ordinary calibrated model: the exporters see a different scale, nothing
  else.

Needs a plain block sequence (``Adapter.trunk``: ViT/DeiT, Swin with each patch merging as its own step,
EfficientViT with its NCHW blocks seen channels-last); other families (the CNNs) are returned unchanged
with a note in the result.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..adapters import adapter_for
from ..quant.engine import all_quantizers, weight_layers
from ..quant.layers import QuantLinear


@dataclass
class ReconStage:
    name: str
    params: int  # learned scalars (step sizes, weight-scale channels)
    loss_before: float  # stage_loss against the float target, on all calibration images
    loss_after: float


@dataclass
class ReconResult:
    stages: list[ReconStage] = field(default_factory=list)
    skipped: str | None = None  # why nothing was done (e.g. no block sequence)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # apply_block_recon's arguments, for the report

    def to_dict(self) -> dict:
        return {"stages": [vars(s) for s in self.stages], "skipped": self.skipped, "seconds": self.seconds,
                "settings": self.settings}


def _batched(fn, x: torch.Tensor, bs: int = 8) -> torch.Tensor:
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def apply_block_recon(model: nn.Module, fp_model: nn.Module, calib: torch.Tensor, iters: int = 50,
                      batch: int = 8, lr: float = 4e-3, weight_scales: bool = True,
                      min_rows_per_channel: float = 4.0, drop_prob: float = 0.0, seed: int = 0,
                      progress: bool = True) -> ReconResult:
    """Tune step sizes block by block so each quantized block reproduces the float block (in place).

    Args:
        model: a prepared, calibrated model (after OPT-m and GPTQ, if used).
        fp_model: the float model it was made from (any float-exact rewrite of it, e.g. SQ-b, is fine:
            only stage outputs are compared).
        calib: calibration images (all are used; the evaluation images never are).
        iters: Adam steps per stage.
        batch: images per step.
        lr: Adam learning rate on the log step sizes (cosine-decayed to 0).
        weight_scales: also learn per-channel weight scales with frozen integer codes.
        min_rows_per_channel: layers whose calibration rows are fewer than this many times their inputs
            per output channel keep their weight scales.
        drop_prob: QDrop; during training each activation element of the stage stays float with this
            probability (0 = always quantized). How the defaults were chosen: docs/methods.md.
        seed: seeds the mini-batch order and the QDrop draws.

    Returns:
        Per stage, the number of learned scalars and :func:`stage_loss` before and after.
    """
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob is a probability in [0, 1), got {drop_prob}")
    if iters < 1 or batch < 1:
        raise ValueError(f"iters and batch must be at least 1, got iters={iters}, batch={batch}")
    t0 = time.perf_counter()
    result = ReconResult(settings={"iters": iters, "batch": batch, "lr": lr, "weight_scales": weight_scales,
                                   "drop_prob": drop_prob, "seed": seed})
    adapter = adapter_for(model)
    trunk_q, trunk_f = adapter.trunk(model), adapter_for(fp_model).trunk(fp_model)
    if trunk_q is None or trunk_f is None:
        result.skipped = f"{adapter.family}: no plain block sequence (Adapter.trunk)"
        return result
    stem_q, blocks_q, head_q = trunk_q
    stem_f, blocks_f, head_f = trunk_f
    stages = [("stem", stem_q, stem_f)]
    stages += [(f"blocks.{i}", bq, bf) for i, (bq, bf) in enumerate(zip(blocks_q, blocks_f))]
    stages.append(("head", head_q, head_f))
    quantizers = all_quantizers(model)
    layers_all = weight_layers(model)
    gen = torch.Generator(device=calib.device).manual_seed(seed)  # drop masks are drawn where they are used
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in requires:
        p.requires_grad_(False)
    model.eval()
    fp_model.eval()
    bar = tqdm(total=len(stages), desc="block reconstruction", disable=None if progress else True, leave=False)
    try:
        xq, xf = calib, calib
        for name, fq, ff in stages:
            rows: dict[int, int] = {}
            hooks = [m.register_forward_hook(_count_rows(rows)) for m in layers_all]
            with torch.no_grad():
                target = _batched(ff, xf)
                calls = [q.calls for q in quantizers]
                before = stage_loss(_batched(fq, xq), target).item()
            for h in hooks:
                h.remove()
            # the stage's quantizers are the ones its forward pass called (no name matching)
            used = [q for q, c in zip(quantizers, calls) if q.calls > c]
            act = [q for q in used if q.scale_learnable]
            eligible = _eligible_layers(layers_all, rows, {id(q) for q in used}, min_rows_per_channel)
            layers = eligible if weight_scales else []
            learned = _tune(fq, xq, target, act, layers, [q for q in used if not q.is_weight], iters, batch,
                            lr, drop_prob, gen)
            with torch.no_grad():
                out = _batched(fq, xq)
            after = stage_loss(out, target).item()
            result.stages.append(ReconStage(name, learned, before, after))
            xq, xf = out, target
            bar.update(1)
    finally:
        for p, r in requires.items():
            p.requires_grad_(r)
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _eligible_layers(layers_all: list[nn.Module], rows: dict[int, int], used_ids: set[int],
                     min_rows_per_channel: float) -> list[nn.Module]:
    # A layer that sees few rows per output channel (the classifier: one token per image) would fit its
    # per-class scales to the calibration images, so it keeps its weight scales.
    return [m for m in layers_all if id(m.in_quant) in used_ids
            and rows.get(id(m), 0) >= min_rows_per_channel * m.weight[0].numel()]


def _tune(fn, x: torch.Tensor, target: torch.Tensor, act: list, layers: list[nn.Module], acts_dropped: list,
          iters: int, batch: int, lr: float, drop_prob: float, gen: torch.Generator) -> int:
    """Learn ``act``'s step sizes and ``layers``' weight scales so ``fn(x)`` approaches ``target`` under
    :func:`stage_loss`; every quantizer is back in its frozen state afterwards. Returns the number of learned
    scalars."""
    params = [q.begin_scale_learning() for q in act]
    params += [p for m in layers if (p := m.begin_weight_scale_learning()) is not None]
    for q in acts_dropped:
        q.drop_prob, q.drop_generator = drop_prob, gen
    try:
        if params:
            _train(fn, x, target, [{"params": params, "lr": lr}], iters, batch, gen)
    finally:
        for q in acts_dropped:
            q.drop_prob, q.drop_generator = 0.0, None
        for q in act:
            q.end_scale_learning()
        for m in layers:
            m.end_weight_scale_learning()
    return sum(p.numel() for p in params)


def stage_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reconstruction loss of one stage.

    Token tensors ``[images, tokens, channels]`` or ``[images, H, W, channels]`` (the residual stream;
    ``Adapter.trunk`` promises channels-last) are compared after a per-token
    normalization without affine parameters, i.e. as the next LayerNorm sees them. Plain MSE on the
    stream is dominated by the few "massive activation" tokens and channels (ViT-Tiny's channel 41
    reaches 577 after blocks.7, benchmarks/block_error.py), whose absolute error the next LayerNorm
    divides away (docs/methods.md, "Block reconstruction"). Other outputs (logits) use plain MSE.
    """
    if target.dim() in (3, 4):
        out = F.layer_norm(out, out.shape[-1:])
        target = F.layer_norm(target, target.shape[-1:])
    return (out - target).pow(2).mean()


def _count_rows(rows: dict[int, int]):
    def hook(mod, args, out):
        c = out.shape[-1] if isinstance(mod, QuantLinear) else out.shape[1]
        rows[id(mod)] = rows.get(id(mod), 0) + out.numel() // c
    return hook


def _train(fn, x: torch.Tensor, target: torch.Tensor, groups: list[dict], iters: int, batch: int,
           gen: torch.Generator) -> None:
    """Adam on parameter groups (``{"params": [...], "lr": base}``), each cosine-decayed from its base."""
    opt = torch.optim.Adam(groups)
    base = [g["lr"] for g in opt.param_groups]
    n = len(x)
    order = torch.randperm(n, generator=gen, device=gen.device)
    pos = 0
    for it in range(iters):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen, device=gen.device), 0
        idx = order[pos:pos + min(batch, n)]
        pos += batch
        # the input must carry a gradient flag so every quantizer in the stage takes its differentiable path
        xb = x[idx].clone().requires_grad_(True)
        loss = stage_loss(fn(xb), target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / iters))
        opt.step()
