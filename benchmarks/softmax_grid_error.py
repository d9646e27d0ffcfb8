"""Per attention, OPT-m's attn·v output error on the post-softmax operand without and with the log2 grid.

Prints what :func:`vitq.methods.optm.apply_optm` decides with ``log2=True`` (``--opt-m-log2``) against its
default on the same calibrated model (first 8 calibration images, the config's widths; standard protocol):
the best uniform/two-region error, the error of the grid chosen with the log2 candidate, and which grid
that is (docs/methods.md, OPT-m).

    python benchmarks/softmax_grid_error.py deit_tiny --bits 4
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from vitq.methods.optm import apply_optm
from vitq.quant import QuantConfig, quantize
from vitq.zoo import load_model

from _models import load_calib32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4, help="weight and activation width")
    args = ap.parse_args()
    loaded = load_model(args.model)
    calib = load_calib32(Path(args.assets), loaded.entry.transform)[:8]
    cfg = QuantConfig(w_bits=args.bits, a_bits=args.bits)
    plain = {c.name: c for c in apply_optm(quantize(loaded.model, calib, cfg), calib, progress=False).choices}
    chosen = apply_optm(quantize(loaded.model, calib, cfg), calib, progress=False, log2=True).choices
    print(f"# {loaded.entry.timm_name}: W{args.bits}A{args.bits}, attn·v output MSE, 8 calibration images")
    print("| tensor | default grid | default MSE | with log2: grid | MSE | ratio |")
    print("|---|---|---|---|---|---|")
    rows = [c for c in chosen if c.name.endswith("matmul_av.attn")]
    for c in rows:
        p = plain[c.name]
        grid0 = f"two-region m={p.m}" if p.scheme == "two_region" else p.scheme
        grid = f"two-region m={c.m}" if c.scheme == "two_region" else c.scheme
        print(f"| {c.name} | {grid0} | {p.error:.4g} | {grid} | {c.error:.4g} | {c.error / p.error:.3f} |")
    total0, total = sum(plain[c.name].error for c in rows), sum(c.error for c in rows)
    print(f"# log2 kept in {sum(c.scheme == 'log2' for c in rows)} of {len(rows)}; summed MSE {total0:.4g} -> "
          f"{total:.4g} ({total / total0:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
