"""Does the vitq int8 ONNX model predict what vitq's simulation predicts? And how close can it get?

For each W8A8 configuration that exports fully to integer QDQ (uniform 8-bit everywhere): quantize the
model on calib32, export it with `export_onnx`, and run FP, simulation and ONNX Runtime (CPU provider,
all optimizations) on eval968. Reports top-1 of each, the pairwise top-1 agreements, the mean |Δlogit|
between ONNX and the simulation, and a **ceiling**: the agreement of the simulation with itself when
every input pixel is multiplied by ``1 + 1e-6·N(0,1)`` (a change of the size of float32 rounding; the FP
model's predictions do not move). Two implementations whose float arithmetic differs in the last bits
(ONNX Runtime's fused LayerNorm/GELU/Softmax and GEMM accumulation order) cannot agree more than the
simulation agrees with itself under such a perturbation: a single activation that lands on the other
side of a rounding boundary changes downstream values by a whole quantization step, which moves other
values across their boundaries, and so on through the network.

Configurations: ``minmax`` (plain engine W8A8), ``sqb-clip`` (W8A8, SQ-b folded + OPT-m's output-error
clip search, no two-region grids, MSE weight observer; everything stays exportable as QDQ), and
``sqb-clip-w7`` (the same with 7-bit weights, ONNX Runtime's ``reduce_range`` advice for CPUs without
VNNI, whose uint8 x int8 kernels add pairs of products in saturating 16-bit arithmetic).

    python benchmarks/onnx_agreement.py --models deit_tiny
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import onnxruntime as ort
import torch

from vitq.data import load_tensors, make_dataset
from vitq.export.onnx import export_onnx
from vitq.io import atomic_write_json
import vitq
from vitq.methods.mptq import MethodOptions
from vitq.quant import QuantConfig
from vitq.quant.engine import quantize
from vitq.zoo import load_model

from _models import load_calib32

CONFIGS = ("minmax", "sqb-clip", "sqb-clip-w7")


def build(name: str, fp: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    if name == "minmax":
        return quantize(fp, calib, QuantConfig(w_bits=8, a_bits=8, observer="minmax"))
    if name in ("sqb-clip", "sqb-clip-w7"):  # m_max=0: OPT-m's clip search only, every tensor stays uniform
        cfg = QuantConfig(w_bits=7 if name.endswith("w7") else 8, a_bits=8, observer="mse")
        return vitq.quantize(fp, calib, cfg, recipe="minmax", options=MethodOptions(sq_b=True, opt_m=True, m_max=0), progress=False).model
    raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")


def logits(fn, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--noise", type=float, default=1e-6, help="relative input perturbation for the ceiling")
    ap.add_argument("--out")
    args = ap.parse_args()
    assets = Path(args.assets)
    rows = []
    print(f"# ONNX vs simulation, {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, {date.today()}; eval968, calib32")
    print("| model | config | integer layers | FP top-1 | sim top-1 | ONNX top-1 | sim~FP % | ONNX~FP % "
          "| ONNX~sim % | mean abs dlogit ONNX-sim | ceiling: sim~sim(x+noise) % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_model(short)  # real weights needed: agreement on random weights means nothing
        t = loaded.entry.transform
        calib = load_calib32(assets, t)
        x, labels = load_tensors(make_dataset(assets / "imagenet-sample", t, assets / "eval968.txt"))
        fp = logits(loaded.model, x)
        g = torch.Generator().manual_seed(0)
        x_noisy = x * (1 + args.noise * torch.randn(x.shape, generator=g))
        for name in args.configs:
            q = build(name, loaded.model, calib)
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "m.onnx")
                rep = export_onnx(q, t.input_size, path)
                so = ort.SessionOptions()
                so.log_severity_level = 3
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                onnx = logits(lambda b: torch.from_numpy(sess.run(None, {"images": b.numpy()})[0]), x)
            sim = logits(q, x)
            sim_noisy = logits(q, x_noisy)

            def top1(z):
                return 100 * (z.argmax(1) == labels).float().mean().item()

            def agree(a, b):
                return 100 * (a.argmax(1) == b.argmax(1)).float().mean().item()

            row = dict(model=short, config=name, n_images=len(x), integer_layers=rep.n_integer,
                       layers=len(rep.layers), top1_fp=top1(fp), top1_sim=top1(sim), top1_onnx=top1(onnx),
                       sim_fp=agree(sim, fp), onnx_fp=agree(onnx, fp), onnx_sim=agree(onnx, sim),
                       dlogit_onnx_sim=(onnx - sim).abs().mean().item(), ceiling=agree(sim, sim_noisy),
                       noise=args.noise)
            rows.append(row)
            print(f"| {short} | {name} | {rep.n_integer}/{len(rep.layers)} | {row['top1_fp']:.2f} "
                  f"| {row['top1_sim']:.2f} | {row['top1_onnx']:.2f} | {row['sim_fp']:.2f} | {row['onnx_fp']:.2f} "
                  f"| {row['onnx_sim']:.2f} | {row['dlogit_onnx_sim']:.4f} | {row['ceiling']:.2f} |", flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
