"""Which tensors cost the accuracy: KL from FP on calibration images with one class of tensors left in float.

Groups quantizers by role (weights, each Linear's input kind such as `input.fc2`, matmul operands q/k/attn/v,
residual inputs, ...) or, with --by layer, by layer name. Prints one row per group: the mean KL(FP || model)
on the first --images calibration images when that group is not quantized (lower = that group hurts more).

    python benchmarks/sensitivity.py vit_tiny --w-bits 8 --a-bits 8

With --artifact DIR it measures a model `vitq quantize --out DIR` saved (e.g. a Greedy MP model; the bits and
options then come from the artifact), and --by role-bits also splits each role by bit-width.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from vitq.evaluation import kl_from_reference
import vitq
from vitq.methods.mptq import MethodOptions
from vitq.quant import QuantConfig, calibrate, prepare
from vitq.quant.engine import all_quantizers, left_in_float
from vitq.zoo import load_model

from _models import load_calib32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--w-bits", type=int, default=8)
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--protocol", default="standard")
    ap.add_argument("--observer", default="minmax")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--by", choices=["role", "role-bits", "layer"], default="role")
    ap.add_argument("--artifact", help="a folder written by `vitq quantize --out` to measure instead of building one")
    ap.add_argument("--method", choices=["none", "mptq", "mptq-all"], default="none",
                    help="mptq: SQ-b + OPT-m before measuring (what is left after the paper's methods); "
                         "mptq-all: what `vitq quantize --method mptq` runs now (adds GPTQ and reconstruction)")
    args = ap.parse_args()
    assets = Path(args.assets)
    loaded = load_model(args.model)
    calib = load_calib32(assets, loaded.entry.transform)
    probe = calib[: args.images]
    cfg = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits, protocol=args.protocol, observer=args.observer)
    if args.artifact:
        from vitq.artifact import load_artifact
        q, _ = load_artifact(args.artifact)
    elif args.method != "none":
        full = args.method == "mptq-all"
        opts = MethodOptions(sq_b=True, opt_m=True, gptq=full, recon=full)
        q = vitq.quantize(loaded.model, calib, cfg, recipe="minmax", options=opts, progress=False).model
    else:
        q = prepare(loaded.model, cfg)
        calibrate(q, cfg, calib, progress=False)
    with torch.inference_mode():
        ref = loaded.model(probe)

    def kl() -> float:
        with torch.inference_mode():
            return kl_from_reference(ref, q(probe)).mean().item()

    groups: dict[str, list] = {}
    for t in all_quantizers(q):
        key = t.layer if args.by == "layer" else (f"input.{t.layer.split('.')[-1]}" if t.role == "input" else t.role)
        if args.by == "role-bits":
            key += f" @{t.spec.bits}"
        groups.setdefault(key, []).append(t)
    what = (f"artifact {args.artifact}" if args.artifact else
            f"W{args.w_bits}A{args.a_bits} {args.protocol} {args.observer} method={args.method}")
    print(f"# {loaded.entry.timm_name} {what}: "
          f"KL on {len(probe)} calibration images, all quantized = {kl():.4f}")
    print("| left in float | tensors | KL |")
    print("|---|---|---|")
    for key, ts in sorted(groups.items()) if args.by == "role-bits" else groups.items():
        with left_in_float(ts):
            print(f"| {key} | {len(ts)} | {kl():.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
