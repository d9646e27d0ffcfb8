"""How much OPT-m's PTF search lowers the error of the full protocol's residual-stream grids.

Quantizes the model in the full protocol (calib32, MSE observers, no other method), captures each PTF
grid's float input on 8 calibration images (OPT-m's data) and prints, per grid, the squared error of the
min-max PTF grid and of the searched one (``vitq.methods.optm.search_ptf``), plus the search time.

    python benchmarks/ptf_search_error.py vit_tiny --bits 6

With ``--layernorm`` (ViT/DeiT only), it prints instead, for each grid that feeds a LayerNorm (a block's
``x`` grids feed norm1/norm2, the final norm's input grid), the mean squared error of that LayerNorm's
*output* with the min-max grid and with the grid searched on each objective of ``optm.PTF_OBJECTIVES``:
whether the first-order "normalized" objective tracks what the LayerNorm sees.

    python benchmarks/ptf_search_error.py vit_tiny --bits 6 --layernorm
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vitq.data import load_tensors, make_dataset
from vitq.methods.optm import PTF_OBJECTIVES, _capture, search_ptf
from vitq.quant import QuantConfig, quantize
from vitq.quant import quantizers as Q
from vitq.quant.engine import all_quantizers
from vitq.zoo import load_model


@torch.no_grad()
def layernorm_table(q, calib, bits: int, model_name: str) -> None:
    """LayerNorm-output error of each LayerNorm-feeding grid: min-max vs each search objective."""
    feeds = [(b.residual1.x_quant, b.norm1) for b in q.blocks] + [(b.residual2.x_quant, b.norm2) for b in q.blocks]
    feeds.append((q.norm.in_quant, q.norm))
    weights: dict[int, torch.Tensor] = {}
    found = _capture(q, calib[:8], 4096, weights)
    qmin, qmax = Q.int_range(bits, False)
    print(f"# {model_name}, full protocol, {bits}-bit PTF grids feeding a LayerNorm: MSE of the LayerNorm output, 8 calibration images")
    print("| grid | min-max | " + " | ".join(f"searched: {o}" for o in PTF_OBJECTIVES) + " |")
    print("|---|---|" + "---|" * len(PTF_OBJECTIVES))
    totals = [0.0] * (1 + len(PTF_OBJECTIVES))
    for t, norm in sorted(feeds, key=lambda f: f[0].name):
        x = found[id(t)][0]

        def ln(v, norm=norm):
            return F.layer_norm(v, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

        ref = ln(x)
        grids = [Q.ptf_params(t.range_min, t.range_max, bits, 7)[:2]]
        for obj in PTF_OBJECTIVES:
            scale, zp, _, _ = search_ptf(x, t.range_min, t.range_max, bits,
                                         row_weight=weights[id(t)] if obj == "normalized" else None)
            grids.append((scale, zp))
        errs = []
        for scale, zp in grids:
            xq = Q.fake_quant_uniform(x, scale, zp, qmin, qmax, axis=-1)
            errs.append((ln(xq) - ref).pow(2).mean().item())
        totals = [a + b for a, b in zip(totals, errs)]
        print(f"| {t.name} | " + " | ".join(f"{e:.5f}" for e in errs) + " |", flush=True)
    print("| **sum** | " + " | ".join(f"**{e:.4f}**" for e in totals) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=6)
    ap.add_argument("--layernorm", action="store_true",
                    help="LayerNorm-output error of the min-max and searched grids (ViT/DeiT)")
    args = ap.parse_args()
    assets = Path(args.assets)
    loaded = load_model(args.model)
    calib, _ = load_tensors(make_dataset(assets / "imagenet-sample", loaded.entry.transform, assets / "calib32.txt"))
    q = quantize(loaded.model, calib, QuantConfig(w_bits=args.bits, a_bits=args.bits, protocol="full", observer="mse"))
    if args.layernorm:
        if not hasattr(q, "blocks") or not hasattr(q, "norm"):
            raise SystemExit(f"--layernorm knows ViT/DeiT blocks only; {args.model} has no .blocks/.norm")
        layernorm_table(q, calib, args.bits, args.model)
        return 0
    found = _capture(q, calib[:8], 4096)
    grids = [t for t in all_quantizers(q) if t.spec.granularity == "ptf" and t.ptf_axis == -1 and id(t) in found]
    print(f"# {args.model}, full protocol, {args.bits}-bit PTF grids, error on 8 calibration images")
    print("| grid | max abs | min-max grid MSE | searched MSE | lower by |")
    print("|---|---|---|---|---|")
    t0 = time.perf_counter()
    for t in grids:
        x = found[id(t)][0]
        _, _, err, err0 = search_ptf(x, t.range_min, t.range_max, args.bits)
        print(f"| {t.name} | {x.abs().max():.1f} | {err0:.5f} | {err:.5f} | {1 - err / err0:.0%} |", flush=True)
    print(f"# {len(grids)} grids searched in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
