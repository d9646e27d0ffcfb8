"""Where the residual stream's large values sit by token position, and the token shifts they would get.

Why token shifts (``--token-shift``, docs/methods.md, "Full protocol and the residual stream"): prints, for
each block's input (the residual stream, float, first --images calibration images), the median over token
positions of each position's largest magnitude, the largest positions (index: magnitude), and the shifts
``quantizers.token_shift_params`` gives on the per-position, per-channel min-max ranges; with --grids, every
quantizer a full-protocol W8A8 calibration on the same images gives token shifts.

    python benchmarks/token_range.py vit_tiny --grids
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from vitq.quant import QuantConfig, all_quantizers, quantize
from vitq.quant.quantizers import token_shift_params
from vitq.zoo import load_model

from _models import load_calib32, module_inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--grids", action="store_true",
                    help="also calibrate the full protocol at W8A8 on the same images and list every grid that "
                         "gets token shifts, with its shifted positions")
    args = ap.parse_args()
    loaded = load_model(args.model)
    model = loaded.model
    x = load_calib32(Path(args.assets), loaded.entry.transform)[: args.images]
    inputs = module_inputs(model, dict(enumerate(model.blocks)), x)
    print(f"# {loaded.entry.timm_name}: block inputs on {args.images} calibration images, by token position "
          f"(0 = class token)")
    print("| block input | median position max | largest positions (index: max) | shifted positions (index: shift) |")
    print("|---|---|---|---|")
    for i, t in sorted(inputs.items()):
        if t.dim() != 3:
            raise SystemExit(f"block {i} input has shape {tuple(t.shape)}: expected [images, tokens, channels]")
        lo, hi = t.amin(0), t.amax(0)  # per position and channel
        amax = torch.maximum(lo.abs(), hi.abs()).amax(-1)
        top = amax.topk(args.top)
        shift = token_shift_params(lo, hi)
        shifted = ", ".join(f"{j}: {int(shift[j])}" for j in shift.nonzero().flatten().tolist()) or "none"
        largest = ", ".join(f"{j}: {v:.1f}" for v, j in zip(top.values.tolist(), top.indices.tolist()))
        print(f"| blocks.{i} | {amax.median().item():.2f} | {largest} | {shifted} |")
    if args.grids:
        q = quantize(model, x, QuantConfig(w_bits=8, a_bits=8, protocol="full"), progress=False)
        grids = [(t.name, t.token_shift_or_none) for t in all_quantizers(q) if t.token_shift_or_none is not None]
        print(f"\n# grids with token shifts after a full-protocol W8A8 calibration on the same images: {len(grids)}")
        print("| grid | shifted positions (index: shift) |")
        print("|---|---|")
        for name, shift in grids:
            print(f"| {name} | {', '.join(f'{j}: {int(shift[j])}' for j in shift.nonzero().flatten().tolist())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
