"""How much the attention heads' ranges differ: would per-head grids for q, k, v and the softmax input help?

Each head's q @ k^T and attn @ v is a separate product, so an integer kernel could give every head its own
step. That only pays where the heads' ranges differ: a per-tensor grid wastes log2(widest / narrowest) bits
on the narrowest head, and a power-of-two factor per head (PTF on the head axis) recovers only whole bits.
This prints, per block, the ratio of the widest head's min-max range to the narrowest's for the float model
in vitq's full protocol (quantizers off), on the first --images calibration images:

    python benchmarks/head_ranges.py deit_tiny
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from vitq.quant import QuantConfig, prepare
from vitq.quant.engine import all_quantizers
from vitq.quant.observers import minmax_range
from vitq.zoo import load_model

from _models import load_calib32

# the column names of the tensors the ViT adapter gives a head axis (TensorQuantizer.head_axis), by their role
KINDS = {"q": "q", "k": "k", "v": "v", "input": "softmax input"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    loaded = load_model(args.model)
    model = prepare(loaded.model.eval(), QuantConfig(protocol="full"))
    for q in all_quantizers(model):
        q.mode = "off"
    ranges: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for q in all_quantizers(model):
        if q.head_axis is None:
            continue
        block = int(q.layer.split(".")[1])  # "blocks.<i>.attn.<op>"

        def hook(mod, inputs, out, key=(block, KINDS[q.role]), axis=q.head_axis):
            lo, hi = minmax_range(inputs[0].detach(), axis)
            old = ranges.get(key)
            ranges[key] = [lo, hi] if old is None else [torch.minimum(old[0], lo), torch.maximum(old[1], hi)]

        hooks.append(q.register_forward_hook(hook))
    images = load_calib32(Path(args.assets), loaded.entry.transform)[: args.images]
    with torch.inference_mode():
        model(images)
    for h in hooks:
        h.remove()
    kinds = list(KINDS.values())
    print(f"# {args.model}: widest / narrowest head range (min-max), float model, {args.images} calibration images")
    print("| block | " + " | ".join(kinds) + " |")
    print("|---" * (len(kinds) + 1) + "|")
    blocks = sorted({b for b, _ in ranges})
    ratios = {}
    for (b, k), (lo, hi) in ranges.items():
        r = (hi - lo).clamp_min(1e-12)
        ratios[(b, k)] = float(r.max() / r.min())
    for b in blocks:
        print(f"| {b} | " + " | ".join(f"{ratios[(b, k)]:.2f}" for k in kinds) + " |")
    top = max(ratios.values())
    print(f"\n{sum(r >= 2 for r in ratios.values())} of {len(ratios)} tensors have a ratio of 2 or more; the largest is "
          f"{top:.2f} ({math.log2(top):.2f} bits). A per-head power-of-two factor saves at most floor(log2(ratio)) "
          "bits on the narrowest head.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
