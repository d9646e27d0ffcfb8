"""KL from FP on calibration images for the full protocol's token options: GELU-input token shifts and token scaling.

Builds the model at one width in the full protocol for each ``GTS,TS,OBJ`` variant (GELU token shifts 0/1,
token scaling of fc2's input 0/1, OPT-m's GELU-input objective ``tensor``/``output``) and prints the mean KL
and top-1 agreement against FP on the first --images calibration images (in-sample: the images calibration
used; a quick view of what the options do together, not an evaluation). ``--pipeline sqb-optm`` runs SQ-b and
OPT-m only, ``all`` adds GPTQ and block reconstruction (what ``--method mptq`` runs).

    python benchmarks/full_token_options.py vit_tiny --bits 5 --pipeline sqb-optm \\
        --variants 0,0,tensor 1,0,tensor 0,1,tensor 1,1,tensor 1,1,output
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from vitq.evaluation import kl_from_reference
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.methods.optm import NONLIN_OBJECTIVES
from vitq.quant import QuantConfig
from vitq.zoo import load_model

from _models import load_calib32


def parse_variant(text: str) -> tuple[bool, bool, str]:
    """``GTS,TS,OBJ`` -> (GELU token shifts, token scaling, OPT-m's GELU-input objective)."""
    try:
        gts, ts, obj = text.split(",")
        if obj not in NONLIN_OBJECTIVES or gts not in "01" or ts not in "01":
            raise ValueError
    except ValueError:
        raise SystemExit(f"variant {text!r}: expected GTS,TS,OBJ with 0/1, 0/1 and one of {list(NONLIN_OBJECTIVES)}")
    return gts == "1", ts == "1", obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=5)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--pipeline", choices=["sqb-optm", "all"], default="sqb-optm")
    ap.add_argument("--variants", nargs="+", default=["0,0,tensor", "1,1,tensor"])
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    loaded = load_model(args.model)
    calib = load_calib32(Path(args.assets), loaded.entry.transform)
    probe = calib[: args.images]
    with torch.inference_mode():
        ref = loaded.model(probe)
    full = args.pipeline == "all"
    print(f"# {loaded.entry.timm_name}: full W{args.bits}A{args.bits}, {args.pipeline}; KL and agreement with FP "
          f"on the first {args.images} calibration images (in-sample)")
    print("| GELU token shifts | token scaling | GELU-input objective | KL | agreement | build s |")
    print("|---|---|---|---|---|---|")
    for gts, ts, obj in variants:
        cfg = QuantConfig(w_bits=args.bits, a_bits=args.bits, protocol="full", observer="mse", gelu_token_shift=gts)
        opts = MethodOptions(sq_b=True, opt_m=True, gptq=full, recon=full, token_scale=ts, optm_nonlin_objective=obj)
        t = time.perf_counter()
        q = run_pipeline(loaded.model, calib, cfg, opts).model
        seconds = time.perf_counter() - t
        with torch.inference_mode():
            out = q(probe)
        kl = kl_from_reference(ref, out).mean().item()
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item() * 100
        print(f"| {int(gts)} | {int(ts)} | {obj} | {kl:.4f} | {agree:.1f} % | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
