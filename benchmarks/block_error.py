"""Where a quantized ViT/DeiT loses its accuracy, block by block, on calibration images.

For each block of the trunk: the error of its input (inherited from the quantized blocks before it), of
its output, of the *float* block run on the same quantized input (what the block would add if it were not
quantized), and of the block with only its weights quantized; plus the channel with the largest error
and the largest magnitude that channel reaches in float.
Errors are MSE against the float model's block output (raw, and normalized per token as the next
LayerNorm sees it). Uses `--method mptq` (SQ-b, OPT-m, GPTQ; block reconstruction at <= 5 bits unless
`--no-recon`).

    python benchmarks/block_error.py vit_tiny --bits 4
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from vitq.adapters import adapter_for
from vitq.evaluation import kl_from_reference
import vitq
from vitq.methods.mptq import MethodOptions
from vitq.methods.recon import stage_loss
from vitq.quant import QuantConfig
from vitq.quant.engine import all_quantizers, left_in_float
from vitq.zoo import load_model

from _models import load_calib32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4, help="W and A bits")
    ap.add_argument("--images", type=int, default=16, help="calibration images measured (the first N)")
    ap.add_argument("--no-recon", action="store_true")
    args = ap.parse_args()
    assets = Path(args.assets)
    loaded = load_model(args.model)
    calib = load_calib32(assets, loaded.entry.transform)
    cfg = QuantConfig(w_bits=args.bits, a_bits=args.bits, observer="mse")
    opts = MethodOptions(sq_b=True, opt_m=True, gptq=True, recon=not args.no_recon)
    q = vitq.quantize(loaded.model, calib, cfg, recipe="minmax", options=opts, progress=False).model
    trunk_q, trunk_f = adapter_for(q).trunk(q), adapter_for(loaded.model).trunk(loaded.model)
    if trunk_q is None:
        print(f"{args.model}: no plain block sequence", file=sys.stderr)
        return 2
    (stem, blocks, head), (fstem, fblocks, fhead) = trunk_q, trunk_f
    x = calib[: args.images]
    print(f"# {loaded.entry.timm_name} W{args.bits}A{args.bits} mptq{' (no recon)' if args.no_recon else ''}: "
          f"MSE against the float block output on {len(x)} calibration images")
    print("| block | input | output | float block, quant input | weights only | top channel (MSE) | "
          "its float max abs | output, token-normalized |")
    print("|---|---|---|---|---|---|---|---|")
    def mse(a, b):
        return (a - b).pow(2).mean().item()

    with torch.no_grad():
        xq, xf = stem(x), fstem(x)
        for i, (bq, bf) in enumerate(zip(blocks, fblocks)):
            target, out, out_f = bf(xf), bq(xq), bf(xq)
            with left_in_float(t for t in all_quantizers(bq) if not t.is_weight):
                out_w = bq(xq)
            err = (out - target).pow(2)
            ch = int(err.mean((0, 1)).argmax())
            print(f"| {i} | {mse(xq, xf):.4g} | {err.mean().item():.4g} | {mse(out_f, target):.4g} | "
                  f"{mse(out_w, target):.4g} | {ch} ({err.mean((0, 1))[ch].item():.4g}) | "
                  f"{target[..., ch].abs().max().item():.4g} | "
                  f"{stage_loss(out, target).item():.4g} |")
            xq, xf = out, target
        kl = kl_from_reference(fhead(xf), head(xq)).mean().item()
    print(f"logit KL on these images: {kl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
