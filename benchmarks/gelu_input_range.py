"""Range of every GELU input (fc1 output) in float, and the time of OPT-m's GELU-input clip search on it.

Why the GELU-input clip on the GELU output (``--opt-m-nonlin-objective output``, docs/methods.md, OPT-m):
prints, per GELU on the first --images calibration images, the min, max and 0.01 % / 1 % / 99 % / 99.99 %
quantiles and the largest channel max, then the seconds ``optm.search_gelu_clip`` takes on the rows OPT-m
would sample (tokens of those images, at most 4096) and on the strided subset of about ``optm.GELU_ROWS``
rows that ``apply_optm`` passes it (the same rows when there are fewer than ``2 * GELU_ROWS``).

    python benchmarks/gelu_input_range.py vit_tiny

``--positions`` prints instead, per GELU, what the GELU-input token shifts (``QuantConfig.gelu_token_shift``,
docs/methods.md) see: the positions ``quantizers.token_shift_params`` flags on the positions' largest positive
values and their exponents, the largest value at a flagged position and elsewhere, the median position's
largest value, and the most negative value overall and at the median position.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vitq.methods.optm import GELU_ROWS, search_gelu_clip
from vitq.quant import quantizers as Q
from vitq.zoo import load_model

from _models import load_calib32, module_inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--bits", type=int, default=6, help="width of the timed clip search")
    ap.add_argument("--positions", action="store_true", help="the token positions' ranges and shifts instead")
    args = ap.parse_args()
    loaded = load_model(args.model)
    x = load_calib32(Path(args.assets), loaded.entry.transform)[: args.images]
    gelus = [(name, m) for name, m in loaded.model.named_modules() if isinstance(m, nn.GELU)]
    inputs = module_inputs(loaded.model, dict(gelus), x)
    if args.positions:
        return print_positions(loaded.entry.timm_name, gelus, inputs, args.images)
    gen = torch.Generator().manual_seed(0)
    probs = torch.tensor([1e-4, 1e-2, 0.99, 0.9999])
    print(f"# {loaded.entry.timm_name}: GELU inputs on {args.images} calibration images; "
          f"search time at {args.bits} bits")
    print("| GELU | min | q0.01% | q1% | q99% | q99.99% | max | largest channel max / median | rows sampled | "
          "search s, sampled rows | rows searched | search s, searched rows |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, _ in gelus:
        rows = inputs[name].reshape(-1, inputs[name].shape[-1])
        flat = rows.flatten()
        sample = flat[torch.randperm(flat.numel(), generator=gen)[:1_000_000]]  # quantile needs < 16M values
        q = torch.quantile(sample, probs).tolist()
        cmax = rows.amax(0)
        sub = rows[torch.randperm(rows.shape[0], generator=gen)[:4096].sort().values]
        times = []
        searched = sub[:: max(1, sub.shape[0] // GELU_ROWS)]  # as apply_optm strides them
        for part in (sub, searched):
            t = time.perf_counter()
            search_gelu_clip(part, args.bits, F.gelu)
            times.append(time.perf_counter() - t)
        print(f"| {name} | {rows.min():.2f} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {q[3]:.2f} | {rows.max():.2f} | "
              f"{cmax.max():.1f} / {cmax.median():.2f} | {sub.shape[0]} | {times[0]:.2f} | {searched.shape[0]} | "
              f"{times[1]:.2f} |")
    return 0


def print_positions(model_name: str, gelus, inputs: dict, n_images: int) -> int:
    """The per-position table of ``--positions`` (the token shifts' view of each GELU input)."""
    print(f"# {model_name}: GELU inputs by token position on {n_images} calibration images "
          f"(flagged: token_shift_params on each position's largest positive value)")
    print("| GELU | flagged positions | exponents | largest value flagged / elsewhere | median position's largest "
          "value | min / median position's min |")
    print("|---|---|---|---|---|---|")
    for name, _ in gelus:
        v = inputs[name]
        if v.dim() != 3:
            continue  # not a token tensor
        hi = v.amax(dim=0).clamp(min=0.0)  # per position and channel, as the observer keeps them
        shift = Q.token_shift_params(torch.zeros_like(hi), hi)
        peak, low = v.amax(dim=(0, 2)), v.amin(dim=(0, 2))
        flagged = shift > 0
        top = f"{peak[flagged].max():.2f}" if bool(flagged.any()) else "-"
        print(f"| {name} | {flagged.nonzero().flatten().tolist() or '-'} | "
              f"{sorted({int(b) for b in shift[flagged].tolist()}) or '-'} | {top} / {peak[~flagged].max():.2f} | "
              f"{peak.median():.2f} | {low.min():.2f} / {low.median():.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
