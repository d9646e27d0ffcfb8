"""Does the vitq int8 ONNX model predict what vitq's simulation predicts? And how close can it get?

For each W8A8 configuration that exports fully to integer QDQ (uniform 8-bit everywhere): quantize the
model on calib32, export it with `export_onnx`, and run FP, simulation and ONNX Runtime (CPU provider,
all optimizations) on eval968. Reports top-1 of each, the pairwise top-1 agreements, the mean |Δlogit|
between ONNX and the simulation, and two **ceilings**: the agreement of the simulation with itself when
every input pixel is multiplied by ``1 + 1e-6·N(0,1)`` (a change of the size of float32 rounding; the FP
model's predictions do not move), and when every Linear, conv and matmul output is (``layer noise``: what
another runtime's summation order does inside the network; an 8-bit image grid absorbs input noise). Two implementations whose float arithmetic differs in the last bits
(ONNX Runtime's fused LayerNorm/GELU/Softmax and GEMM accumulation order) cannot agree more than the
simulation agrees with itself under such a perturbation: a single activation that lands on the other
side of a rounding boundary changes downstream values by a whole quantization step, which moves other
values across their boundaries, and so on through the network.

Configurations: ``minmax`` (plain engine W8A8), ``sqb-clip`` (W8A8, SQ-b folded + OPT-m's output-error
clip search, no two-region grids, MSE weight observer), ``sqb-clip-w7`` (the same with 7-bit weights, ONNX
Runtime's ``reduce_range`` advice for CPUs without VNNI, whose uint8 x int8 kernels add pairs of products in
saturating 16-bit arithmetic), and the ``mptq`` recipe's defaults at W8A8 and W4A4 (the README's demo:
rotation, OPT-m, GPTQ and block reconstruction; 4-bit activations as clipped uint8 pairs). Also the sizes:
the ONNX file (``--target ort``, and ``portable``: INT4 weights) against the packed artifact. The same
model as a PT2E program (`vitq export --format pt2e`, compiled with the x86 int8 passes) is run on eval968
too: its agreement with the simulation, its oneDNN int8 layers and its file size.

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
from vitq.export.packed import export_packed
from vitq.export.pt2e import compile_program, export_pt2e, load_pt2e
from vitq.io import atomic_write_json
import vitq
from vitq.methods.mptq import MethodOptions
from vitq.quant import QuantConfig
from vitq.quant.engine import quantize
from vitq.zoo import load_model

from _machine import cpu_flags
from _models import load_calib32

CONFIGS = ("minmax", "sqb-clip", "sqb-clip-w7", "mptq-w8a8", "mptq-w4a4")


def build(name: str, fp: torch.nn.Module, calib: torch.Tensor) -> torch.nn.Module:
    if name == "minmax":
        return quantize(fp, calib, QuantConfig(w_bits=8, a_bits=8, observer="minmax"))
    if name in ("sqb-clip", "sqb-clip-w7"):  # m_max=0: OPT-m's clip search only, every tensor stays uniform
        cfg = QuantConfig(w_bits=7 if name.endswith("w7") else 8, a_bits=8, observer="mse")
        return vitq.quantize(fp, calib, cfg, recipe="minmax", options=MethodOptions(sq_b=True, opt_m=True, m_max=0), progress=False).model
    if name.startswith("mptq-"):
        bits = int(name[-3])
        return vitq.quantize(fp, calib, QuantConfig(w_bits=bits, a_bits=int(name[-1])), progress=False).model
    raise ValueError(f"unknown configuration {name!r}; choose from {CONFIGS}")


def layer_noise_logits(q: torch.nn.Module, x: torch.Tensor, noise: float) -> torch.Tensor:
    """The simulation's logits with every Linear, conv and activation matmul output multiplied by
    ``1 + noise * N(0,1)``: the size of the differences another runtime's summation order makes inside the
    network (input noise alone is absorbed by the 8-bit image grid)."""
    from vitq.quant.layers import QuantConv2d, QuantLinear, QuantMatMul

    g = torch.Generator().manual_seed(1)

    def perturb(mod, args, out):
        return out * (1 + noise * torch.randn(out.shape, generator=g))

    hooks = [m.register_forward_hook(perturb) for m in q.modules()
             if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))]
    try:
        return logits(q, x)
    finally:
        for h in hooks:
            h.remove()


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
    print(f"# CPU vector extensions: {cpu_flags()}")
    print("| model | config | integer layers | FP top-1 | sim top-1 | ONNX top-1 | sim~FP % | ONNX~FP % "
          "| ONNX~sim % | mean abs dlogit ONNX-sim | ceiling: sim~sim(x+noise) % | ceiling: sim~sim(layer noise) % "
          "| ONNX MB (ort / portable) | packed MB | PT2E~sim % | PT2E int8 layers | PT2E MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
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
                portable = export_onnx(q, t.input_size, os.path.join(d, "p.onnx"), target="portable")
                packed = export_packed(q, {"model": loaded.entry.timm_name}, os.path.join(d, "m.safetensors"))
                so = ort.SessionOptions()
                so.log_severity_level = 3
                sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                onnx = logits(lambda b: torch.from_numpy(sess.run(None, {"images": b.numpy()})[0]), x)
                pt2e_rep = export_pt2e(q, t.input_size, os.path.join(d, "m.pt2"))
                run = compile_program(load_pt2e(os.path.join(d, "m.pt2"))[0])
                pt2e = logits(run, x)
            sim = logits(q, x)
            sim_noisy = logits(q, x_noisy)
            sim_layer_noise = layer_noise_logits(q, x, args.noise)

            def top1(z):
                return 100 * (z.argmax(1) == labels).float().mean().item()

            def agree(a, b):
                return 100 * (a.argmax(1) == b.argmax(1)).float().mean().item()

            row = dict(model=short, config=name, n_images=len(x), integer_layers=rep.n_integer,
                       layers=len(rep.layers), top1_fp=top1(fp), top1_sim=top1(sim), top1_onnx=top1(onnx),
                       sim_fp=agree(sim, fp), onnx_fp=agree(onnx, fp), onnx_sim=agree(onnx, sim),
                       dlogit_onnx_sim=(onnx - sim).abs().mean().item(), ceiling=agree(sim, sim_noisy),
                       ceiling_layers=agree(sim, sim_layer_noise), noise=args.noise, onnx_mb=rep.file_bytes / 1e6, portable_mb=portable.file_bytes / 1e6,
                       packed_mb=packed["file_bytes"] / 1e6, pt2e_sim=agree(pt2e, sim),
                       pt2e_int8_layers=pt2e_rep.int8_linear + pt2e_rep.int8_conv, pt2e_mb=pt2e_rep.file_bytes / 1e6,
                       cpu_flags=cpu_flags())
            rows.append(row)
            print(f"| {short} | {name} | {rep.n_integer}/{len(rep.layers)} | {row['top1_fp']:.2f} "
                  f"| {row['top1_sim']:.2f} | {row['top1_onnx']:.2f} | {row['sim_fp']:.2f} | {row['onnx_fp']:.2f} "
                  f"| {row['onnx_sim']:.2f} | {row['dlogit_onnx_sim']:.4f} | {row['ceiling']:.2f} | {row['ceiling_layers']:.2f} "
                  f"| {row['onnx_mb']:.2f} / {row['portable_mb']:.2f} | {row['packed_mb']:.2f} | {row['pt2e_sim']:.2f} "
                  f"| {row['pt2e_int8_layers']}/{pt2e_rep.layers} | {row['pt2e_mb']:.2f} |", flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
