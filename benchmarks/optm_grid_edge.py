"""Does OPT-m's coarse-step grid for the post-GELU (fc2 input) tensors stop too early?

For each block's fc2 input (float model, 8 calibration images, up to 2048 sampled tokens), run OPT-m's
two-region search with its own grids and with a wider one (coarse step 0.05..1.00 of max/(n-1), four
boundaries), both scored on fc2's float output, and print the chosen step ratio ``r`` and the error.
A chosen ``r`` at the grid's lower edge (0.40) with a lower error on the wide grid means the search is
clipped by its grid.

    python benchmarks/optm_grid_edge.py vit_tiny --bits 4 [--wide-m-max 6]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import vitq.methods.optm as optm
from vitq.data import load_tensors, make_dataset
from vitq.methods.sqb import _collect_inputs
from vitq.zoo import load_model

# A probe grid finer and wider than any OPT-m preset: r = 0.05 .. 1.00 in 0.05 steps.
PROBE_GRID = optm.TwoRegionGrid(deltas=tuple(round(0.05 * k, 2) for k in range(1, 21)),
                                boundaries=(0.25, 0.5, 0.75, 1.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--wide-m-max", type=int, help="largest m of the wide search (default: OPT-m's own)")
    args = ap.parse_args()
    torch.manual_seed(0)
    assets = Path(args.assets)
    loaded = load_model(args.model)
    calib, _ = load_tensors(make_dataset(assets / "imagenet-sample", loaded.entry.transform, assets / "calib32.txt"))
    fc2s = [b.mlp.fc2 for b in loaded.model.blocks]
    n = 2 ** (args.bits - 1)
    print(f"# {args.model} fc2 inputs, two-region search at {args.bits} bits, error of fc2's float output")
    print("| block | max | r (OPT-m grid) | m | error | r (wide grid) | m | error | lower by |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (lin, x) in enumerate(zip(fc2s, _collect_inputs(loaded.model, fc2s, calib[:8], 2048))):
        w = lin.weight.detach().float()
        top = x.max().item()
        d0, m0, _, e0 = optm.search_two_region(x, args.bits, optm.default_m_max(args.bits), True,
                                               lambda v: v @ w.T, optm.STANDARD_GRID)
        d1, m1, _, e1 = optm.search_two_region(x, args.bits, args.wide_m_max or optm.default_m_max(args.bits), True,
                                               lambda v: v @ w.T, PROBE_GRID)
        print(f"| {i} | {top:.2f} | {d0 * (n - 1) / top:.2f} | {m0} | {e0:.5f} | {d1 * (n - 1) / top:.2f} | {m1} | "
              f"{e1:.5f} | {1 - e1 / e0:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
