"""The cost model's floor for M2Q: EDP / INT8 with every layer's weights at 8 or 4 bits (A8), every eligible
layer uniform or split between the engines at the balanced share (docs/hardware.md, "What bounds the EDP
saving"). Cost only: no accuracy, no calibration (random-init weights are fine).

    python benchmarks/m2q_bounds.py --models deit_tiny tf_efficientnet_lite0 efficientvit_b1
"""
from __future__ import annotations

import argparse
import sys

from vitq.hardware import estimate, extract_workloads, int8_baseline, load_hardware
from vitq.methods.m2q import balanced_share
from vitq.quant import QuantConfig
from vitq.quant.engine import prepare

from _models import load_or_random_init


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "tf_efficientnet_lite0", "efficientvit_b1"])
    ap.add_argument("--hw", help="accelerator YAML merged over the defaults")
    args = ap.parse_args()
    hw = load_hardware(args.hw)
    print("| model | W8 split | W4 uniform | W4 split | INT8 energy in DRAM traffic | W4 split busy ms (MAC / shift / DRAM) |")
    print("|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_or_random_init(short)
        wl = extract_workloads(prepare(loaded.model, QuantConfig()), loaded.entry.transform.input_size)
        base = estimate(int8_baseline(wl), hw)

        def at(bits: int, split: bool):
            out = []
            for w in wl:
                if w.op in ("matmul", "div"):
                    out.append(w)
                elif split and w.pot_eligible:
                    out.append(w.with_bits(bits, 8, "mixed", balanced_share(bits, 8, hw)))
                else:
                    out.append(w.with_bits(bits, 8, "uniform", 0.0))
            return estimate(out, hw)

        dram = sum(c.dram_pj for c in base.layers) * 1e-12 / base.energy_j
        w4s = at(4, True)
        busy = " / ".join(f"{w4s.busy_s[k] * 1e3:.2f}" for k in ("mac", "shift", "dram"))
        print(f"| {short} | {at(8, True).edp / base.edp:.3f} | {at(4, False).edp / base.edp:.3f} | "
              f"{w4s.edp / base.edp:.3f} | {100 * dram:.0f} % | {busy} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
