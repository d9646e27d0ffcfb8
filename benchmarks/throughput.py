"""Speed of FP evaluation, calibration and fake-quant evaluation on this machine (prints a table).

Rows:
  * FP eval, end to end: decoding + model over the eval images, through vitq's loader (what `vitq eval` does).
  * FP / fake-quant model-only: forward passes over pre-decoded batches of 32 (median of --repeats).
  * calibrate + quantize: `prepare` + `calibrate` with the 32 calibration images, per observer.

    python benchmarks/throughput.py --model deit_tiny --limit 968
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from vitq.data import load_tensors, make_dataset, make_loader
from vitq.evaluation import evaluate
from vitq.quant import QuantConfig, calibrate, prepare
from vitq.zoo import load_model


def forward_rate(model, batches, repeats: int) -> float:
    """Median images/s of full passes over ``batches``."""
    rates = []
    with torch.inference_mode():
        model(batches[0])  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            for b in batches:
                model(b)
            rates.append(sum(len(b) for b in batches) / (time.perf_counter() - t))
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--model", default="deit_tiny")
    ap.add_argument("--limit", type=int, default=968, help="eval images for the end-to-end row")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    assets = Path(args.assets)
    root = assets / "imagenet-sample"
    loaded = load_model(args.model)
    t = loaded.entry.transform
    print(f"# throughput of {loaded.entry.timm_name}: {platform.node()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {date.today()}")
    print("| what | value |")
    print("|---|---|")

    ds = make_dataset(root, t, assets / "eval968.txt", args.limit)
    t0 = time.perf_counter()
    r = evaluate(loaded.model, make_loader(ds), progress=False)
    wall = time.perf_counter() - t0
    print(f"| FP eval end to end ({r.n_images} images, decode + model) | {r.n_images / wall:.1f} images/s |")
    print(f"| FP eval, model time only (same run) | {r.images_per_s:.1f} images/s |", flush=True)

    calib, _ = load_tensors(make_dataset(root, t, assets / "calib32.txt"))
    evalx, _ = load_tensors(make_dataset(root, t, assets / "eval968.txt", 128))
    batches = list(evalx.split(32))
    fp_rate = forward_rate(loaded.model, batches, args.repeats)
    print(f"| FP model-only, batch 32 | {fp_rate:.1f} images/s |", flush=True)

    for obs in ("minmax", "mse"):
        for protocol in ("standard", "full"):
            cfg = QuantConfig(w_bits=4, a_bits=4, observer=obs, protocol=protocol)
            t0 = time.perf_counter()
            q = prepare(loaded.model, cfg)
            calibrate(q, cfg, calib, progress=False)
            cal_s = time.perf_counter() - t0
            q_rate = forward_rate(q, batches, args.repeats)
            print(f"| W4A4 {protocol} {obs}: calibrate + quantize (32 images) | {cal_s:.1f} s |")
            print(f"| W4A4 {protocol} {obs}: fake-quant model-only, batch 32 | {q_rate:.1f} images/s "
                  f"({100 * q_rate / fp_rate:.0f} % of FP) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
