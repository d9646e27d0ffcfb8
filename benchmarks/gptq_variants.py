"""GPTQ variants on top of SQ-b + OPT-m: round-to-nearest vs GPTQ with no / LayerNorm-fed / all bias fitting.

One SQ-b + OPT-m model per bit-width pair is calibrated once; each variant re-rounds a copy. Every row:
KL from FP on the 32 calibration images (what GPTQ fitted) and top-1 / agreement / KL on eval968.

    python benchmarks/gptq_variants.py --models deit_tiny vit_tiny --bits 4/4 4/8 8/4
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from vitq.data import make_dataset, make_loader
from vitq.evaluation import evaluate_many, kl_from_reference
from vitq.io import atomic_write_json
from vitq.methods.gptq import FIT_BIAS, apply_gptq
import vitq
from vitq.methods.mptq import MethodOptions
from vitq.quant import QuantConfig
from vitq.zoo import load_model

from _models import load_calib32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "vit_tiny"])
    ap.add_argument("--bits", nargs="+", default=["4/4"], help="W/A pairs, e.g. 4/4 4/8 8/4")
    ap.add_argument("--variants", nargs="+", default=["rtn", *FIT_BIAS], help="rtn and/or GPTQ fit_bias modes")
    ap.add_argument("--out")
    args = ap.parse_args()
    assets = Path(args.assets)
    images = assets / "imagenet-sample"
    rows = []
    print(f"# GPTQ variants (SQ-b + OPT-m, standard protocol), {platform.node()} ({os.cpu_count()} cores), "
          f"torch {torch.__version__}, {date.today()}")
    print("| model | W/A | weights | calib KL | top-1 | FP top-1 | drop | agreement % | KL | GPTQ s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_model(short)
        calib = load_calib32(assets, loaded.entry.transform)
        with torch.inference_mode():
            calib_ref = loaded.model(calib)
        built, meta = {}, {}
        for pair in args.bits:
            wb, ab = (int(v) for v in pair.split("/"))
            cfg = QuantConfig(w_bits=wb, a_bits=ab, observer="mse")
            base = vitq.quantize(loaded.model, calib, cfg, recipe="minmax", options=MethodOptions(sq_b=True, opt_m=True), progress=False).model
            for var in args.variants:
                q = copy.deepcopy(base)
                t0 = time.perf_counter()
                if var != "rtn":
                    apply_gptq(q, calib, fit_bias=var, progress=False)
                key = f"W{wb}A{ab} {'round-to-nearest' if var == 'rtn' else f'GPTQ, bias fit: {var}'}"
                with torch.inference_mode():
                    ckl = kl_from_reference(calib_ref, q(calib)).mean().item()
                built[key] = q
                meta[key] = dict(bits=pair, weights=var, calib_kl=ckl, gptq_s=time.perf_counter() - t0)
                print(f"built {short} {key}", file=sys.stderr, flush=True)
        ds = make_dataset(images, loaded.entry.transform, assets / "eval968.txt")
        res = evaluate_many({"fp": loaded.model, **built}, make_loader(ds), reference="fp")
        fp = res["fp"]
        for key, m in meta.items():
            r = res[key]
            rows.append(dict(model=loaded.entry.timm_name, **m, top1=r.top1, fp_top1=fp.top1, agreement=r.agreement,
                             kl=r.kl, n_images=r.n_images))
            label = "round-to-nearest" if m["weights"] == "rtn" else f"GPTQ, bias fit {m['weights']}"
            print(f"| {short} | {m['bits']} | {label} | {m['calib_kl']:.4f} | {r.top1:.2f} | {fp.top1:.2f} | "
                  f"{r.top1 - fp.top1:+.2f} | {r.agreement:.1f} | {r.kl:.4f} | {m['gptq_s']:.0f} |", flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
