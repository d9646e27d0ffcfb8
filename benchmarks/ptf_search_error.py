"""How much OPT-m's PTF search lowers the error of the full protocol's residual-stream grids.

Quantizes the model in the full protocol (calib32, MSE observers, no other method), captures each PTF
grid's float input on 8 calibration images (OPT-m's data) and prints, per grid, the squared error of the
min-max PTF grid and of the searched one (``vitq.methods.optm.search_ptf``), plus the search time.

    python benchmarks/ptf_search_error.py vit_tiny --bits 6
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from vitq.data import load_tensors, make_dataset
from vitq.methods.optm import _capture, search_ptf
from vitq.quant import QuantConfig, quantize
from vitq.quant.engine import all_quantizers
from vitq.zoo import load_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=6)
    args = ap.parse_args()
    assets = Path(args.assets)
    loaded = load_model(args.model)
    calib, _ = load_tensors(make_dataset(assets / "imagenet-sample", loaded.entry.transform, assets / "calib32.txt"))
    q = quantize(loaded.model, calib, QuantConfig(w_bits=args.bits, a_bits=args.bits, protocol="full", observer="mse"))
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
