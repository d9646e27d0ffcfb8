"""The cost model's floor for M2Q: EDP / INT8 with every layer's weights at 8 or 4 bits (A8), every eligible
layer uniform or split between the engines, at each layer's balanced share or at the model's share (M2Q's,
`vitq.methods.m2q.model_share`) (docs/hardware.md, "What bounds the EDP saving"). Cost only: no accuracy, no calibration (random-init weights are fine).

    python benchmarks/m2q_bounds.py --models deit_tiny tf_efficientnet_lite0 efficientvit_b1
"""
from __future__ import annotations

import argparse
import sys

from vitq.hardware import estimate, extract_workloads, int8_baseline, load_hardware
from vitq.methods.m2q import at_width, balanced_share, model_share
from vitq.quant import QuantConfig
from vitq.quant.engine import prepare

from _models import load_or_random_init


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "tf_efficientnet_lite0", "efficientvit_b1"])
    ap.add_argument("--hw", help="accelerator YAML merged over the defaults")
    args = ap.parse_args()
    hw = load_hardware(args.hw)
    print("| model | W8 split, layer balance | W8 split, model share | W4 uniform | W4 split, layer balance | "
          "W4 split, model share | INT8 energy in DRAM traffic | W4 split busy ms, layer / model share "
          "(MAC / shift / DRAM) |")
    print("|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_or_random_init(short)
        wl = extract_workloads(prepare(loaded.model, QuantConfig()), loaded.entry.transform.input_size)
        base = estimate(int8_baseline(wl), hw)

        def at(bits: int, share: float):
            return estimate(at_width(wl, bits, 8, share), hw)

        dram = sum(c.dram_pj for c in base.layers) * 1e-12 / base.energy_j
        model = {b: model_share(wl, b, 8, hw) for b in (4, 8)}
        w8l, w8m = at(8, balanced_share(8, 8, hw)), at(8, model[8])
        w4l, w4m = at(4, balanced_share(4, 8, hw)), at(4, model[4])
        busy = " ; ".join(" / ".join(f"{r.busy_s[k] * 1e3:.2f}" for k in ("mac", "shift", "dram")) for r in (w4l, w4m))
        print(f"| {short} | {w8l.edp / base.edp:.3f} | {w8m.edp / base.edp:.3f} ({model[8]:.2f}) | "
              f"{at(4, 0.0).edp / base.edp:.3f} | {w4l.edp / base.edp:.3f} | {w4m.edp / base.edp:.3f} ({model[4]:.2f}) | "
              f"{100 * dram:.0f} % | {busy} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
