"""What the softmax inputs alone cost at low bits, per clip objective and with or without per-head grids.

Quantizes only the softmax inputs (everything else float) in vitq's full protocol: calibration and OPT-m on the
first half of calib32, then the mean KL from FP on its other half (calibration images only, never eval968), for
each of: per-tensor or per-head grids (``--head-grids``) x clip objective ``tensor`` or ``output``
(``--opt-m-softmax-objective``). Rules R45 and R46 quote it (docs/methods.md):

    python benchmarks/softmax_input_grids.py deit_tiny --bits 4
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from vitq.adapters import adapter_for
from vitq.evaluation import kl_from_reference
from vitq.methods.optm import apply_optm
from vitq.quant import QuantConfig, calibrate, prepare
from vitq.quant.engine import all_quantizers
from vitq.zoo import load_model

from _models import load_calib32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4)
    args = ap.parse_args()
    loaded = load_model(args.model)
    fp = loaded.model.eval()
    images = load_calib32(Path(args.assets), loaded.entry.transform)
    half = len(images) // 2
    fit, held = images[:half], images[half:]
    with torch.inference_mode():
        ref = fp(held)
    print(f"# {args.model}: only the softmax inputs at {args.bits} bits; fitted on calib32[:{half}], "
          f"KL from FP on calib32[{half}:]")
    print("| grids | clip objective | mean KL |")
    print("|---|---|---|")
    for head_grids in (False, True):
        for objective in ("tensor", "output"):
            cfg = QuantConfig(protocol="full", w_bits=8, a_bits=args.bits, observer="mse", head_grids=head_grids)
            model = prepare(fp, cfg)
            calibrate(model, cfg, fit, progress=False)
            apply_optm(model, fit, progress=False, softmax_objective=objective)
            keep = {id(q) for q in adapter_for(model).softmax_inputs(model)}
            for q in all_quantizers(model):
                if id(q) not in keep:
                    q.mode = "off"
            with torch.inference_mode():
                kl = kl_from_reference(ref, model(held)).mean().item()
            print(f"| {'per head' if head_grids else 'per tensor'} | {objective} | {kl:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
