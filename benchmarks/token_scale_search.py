"""What token scaling (``--token-scale``) decides on the float model: flagged positions, exponent, errors.

For each fc2 input with token positions whose largest magnitude exceeds 8 times the median position's
(first 8 calibration images), prints the positions, the exponent chosen and the quantized output MSE of
fc2 without and with the scaling at the given widths (docs/methods.md, "Token scaling"). A model with no
flagged position prints no layer row (and is left unchanged by the option).

    python benchmarks/token_scale_search.py vit_tiny --bits 4
    python benchmarks/token_scale_search.py deit_tiny --bits 4 --alt-split 31
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from vitq.methods.token_scale import apply_token_scale
from vitq.quant import QuantConfig
from vitq.zoo import load_model

from _models import alt_split, load_calib32, load_calib_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4, help="weight and activation width of the scoring")
    ap.add_argument("--alt-split", type=int, metavar="SEED",
                    help="calibrate on the second split's images (benchmarks/mptq_ablation.py --alt-split)")
    args = ap.parse_args()
    assets = Path(args.assets)
    loaded = load_model(args.model)
    if args.alt_split is None:
        calib, source = load_calib32(assets, loaded.entry.transform), "calib32"
    else:
        calib = load_calib_files(assets, loaded.entry.transform, alt_split(assets, args.alt_split)[0])
        source = f"second split (seed {args.alt_split})"
    res = apply_token_scale(loaded.model, calib, QuantConfig(w_bits=args.bits, a_bits=args.bits), progress=False)
    print(f"# {loaded.entry.timm_name}: W{args.bits}A{args.bits} fc2 output MSE, first 8 images of {source}")
    print("| layer | flagged positions | largest value there / elsewhere | exponent | MSE without | MSE scaled | ratio |")
    print("|---|---|---|---|---|---|---|")
    for la in res.layers:
        print(f"| {la.name} | {', '.join(map(str, la.positions))} | {la.flagged_max:.1f} / {la.other_max:.1f} | {la.shift} | {la.mse_before:.4g} | "
              f"{la.mse_scaled:.4g} | {la.mse_scaled / la.mse_before:.3f} |")
    print(f"# layers with flagged positions: {len(res.layers)}; scaled: {sum(la.shift > 0 for la in res.layers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
