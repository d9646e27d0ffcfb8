"""Calibrated baselines of the quantization engine on the fixed split (calib32 -> eval968).

Prints a markdown table (one row per model x protocol x bit-width x observer) with top-1, agreement
with FP, KL from FP, average bits, size and calibration time. All variants of one model are evaluated in
one pass over the images next to the FP model, so every row is paired with FP on the same images.

    python benchmarks/baselines.py --models deit_tiny vit_tiny --out runs/baselines.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from vitq.data import make_dataset, make_loader
from vitq.evaluation import evaluate_many
from vitq.io import atomic_write_json
from vitq.quant import QuantConfig, calibrate, model_stats, prepare
from vitq.zoo import load_model

from _models import load_calib32

DEFAULT_GRID = {
    "deit_tiny": [(p, w, a, o) for p in ("standard", "full") for (w, a) in ((8, 8), (6, 6), (4, 4)) for o in ("minmax", "mse")],
    "vit_tiny": [(p, w, a, o) for p in ("standard", "full") for (w, a) in ((8, 8), (6, 6), (4, 4)) for o in ("minmax", "mse")],
    "tf_efficientnet_lite0": [("standard", w, a, o) for (w, a) in ((8, 8), (4, 8)) for o in ("minmax", "mse")],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_GRID))
    ap.add_argument("--protocols", nargs="+", default=["standard", "full"])
    ap.add_argument("--limit", type=int, help="evaluate only the first N images of eval968 (smoke runs)")
    ap.add_argument("--out", help="also write the rows as JSON")
    args = ap.parse_args()
    assets = Path(args.assets)
    images = assets / "imagenet-sample"
    rows = []
    print(f"# baselines, {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, {date.today()}")
    print("| model | protocol | W/A | observer | top-1 | FP top-1 | drop | agreement % | KL | avg W bits | avg A bits | size MB | calib s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_model(short)
        entry = loaded.entry
        calib = load_calib32(assets, entry.transform)
        variants, meta = {}, {}
        for protocol, w, a, obs in DEFAULT_GRID[short]:
            if protocol not in args.protocols:
                continue
            cfg = QuantConfig(w_bits=w, a_bits=a, protocol=protocol, observer=obs)
            t0 = time.perf_counter()
            q = prepare(loaded.model, cfg)
            calibrate(q, cfg, calib, progress=False)
            key = f"{protocol} W{w}A{a} {obs}"
            variants[key] = q
            meta[key] = dict(protocol=protocol, w_bits=w, a_bits=a, observer=obs, calib_s=time.perf_counter() - t0)
            print(f"calibrated {short} {key} in {meta[key]['calib_s']:.1f}s", file=sys.stderr, flush=True)
        eval_ds = make_dataset(images, entry.transform, assets / "eval968.txt", args.limit)
        res = evaluate_many({"fp": loaded.model, **variants}, make_loader(eval_ds), reference="fp")
        fp = res["fp"]
        for key, q in variants.items():
            r, m, st = res[key], meta[key], model_stats(q)
            row = dict(model=entry.timm_name, **m, top1=r.top1, fp_top1=fp.top1, agreement=r.agreement, kl=r.kl,
                       n_images=r.n_images, **st)
            rows.append(row)
            print(f"| {short} | {m['protocol']} | W{m['w_bits']}A{m['a_bits']} | {m['observer']} | {r.top1:.2f} | "
                  f"{fp.top1:.2f} | {r.top1 - fp.top1:+.2f} | {r.agreement:.1f} | {r.kl:.4f} | {st['avg_w_bits']:.2f} | "
                  f"{st['avg_a_bits']:.2f} | {st['size_bytes'] / 1e6:.2f} | {m['calib_s']:.1f} |", flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
