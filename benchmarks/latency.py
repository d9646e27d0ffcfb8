"""Latency of real integer execution: PyTorch eager fp32, ONNX Runtime fp32, ORT dynamic int8, vitq int8.

vitq int8 is `vitq export --format onnx` of a W8A8 standard-protocol model (min-max observer, calib32):
QDQ pairs with vitq's own scales, which ONNX Runtime fuses into integer kernels. ORT dynamic int8 is
``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations quantized at run time) applied
to the fp32 export. vitq W4A8 is the same with every Linear's weights at 4 bits in groups of 32, exported as
ONNX Runtime's weight-only ``MatMulNBits`` (its input stays on vitq's 8-bit grid, then float). vitq int8
(PT2E) is `vitq export --format pt2e` of the same W8A8 model: a torch.export program compiled by Inductor with
freezing and the x86 int8 passes (oneDNN int8 GEMMs and convolutions; the compile is not timed). Median of
``--runs`` timed runs after ``--warmup`` runs, per batch size and thread
count. The agreement of the vitq int8 ONNX model with vitq's simulation is measured by
``benchmarks/onnx_agreement.py``.

    python benchmarks/latency.py --models deit_tiny deit_small efficientvit_b1
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

from vitq.export.onnx import export_onnx
from vitq.export.pt2e import compile_program, to_program
from vitq.io import atomic_write_json
from vitq.quant import QuantConfig
from vitq.quant.config import LayerRule
from vitq.quant.engine import quantize

from _machine import cpu_flags, median_ms, ort_session
from _models import load_calib32, load_or_random_init


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small", "efficientvit_b1"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    assets = Path(args.assets)
    rows = []
    print(f"# latency, {platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, {date.today()}; median of {args.runs} runs, ms")
    print(f"# CPU vector extensions: {cpu_flags()}")
    print("| model | path | batch | threads | median ms | x vs ORT fp32 |")
    print("|---|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="vitq-latency-"))
    for short in args.models:
        loaded = load_or_random_init(short)
        t = loaded.entry.transform
        calib = load_calib32(assets, t)
        fp = loaded.model.eval()
        q = quantize(fp, calib, QuantConfig(w_bits=8, a_bits=8))
        paths = {p: str(work / f"{short}.{p}.onnx") for p in ("fp32", "dyn", "vitq", "nbits")}
        with torch.inference_mode():
            torch.onnx.export(fp, (torch.zeros(1, *t.input_size),), paths["fp32"], dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        quantize_dynamic(paths["fp32"], paths["dyn"], weight_type=QuantType.QInt8)
        rep = export_onnx(q, t.input_size, paths["vitq"])
        print(f"{short}: vitq int8 export runs {rep.n_integer}/{len(rep.layers)} layers as integers "
              f"{rep.integer_ops}", file=sys.stderr, flush=True)
        # W4A8: the Linears' 4-bit weights in groups of 32 along the input, as ONNX Runtime's MatMulNBits
        try:
            q4 = quantize(fp, calib, QuantConfig(w_bits=8, a_bits=8, group_size=32,
                                                 rules=[LayerRule("*", w_bits=4, w_granularity="per_group")]))
            rep4 = export_onnx(q4, t.input_size, paths["nbits"])
            print(f"{short}: vitq W4A8 export: {len(rep4.nbits_layers)} MatMulNBits layers", file=sys.stderr,
                  flush=True)
        except ValueError as e:  # a layer whose input is not a multiple of 32 (EfficientViT's first convolution)
            print(f"{short}: no W4A8 path: {e}", file=sys.stderr, flush=True)
            del paths["nbits"]
        counts: dict = {}
        pt2e = compile_program(to_program(q, t.input_size)[0], counts)
        with torch.no_grad():
            pt2e(torch.zeros(1, *t.input_size))
        print(f"{short}: vitq PT2E program: {counts} layers as oneDNN int8 kernels", file=sys.stderr, flush=True)
        for batch in args.batches:
            x = torch.randn(batch, *t.input_size, generator=torch.Generator().manual_seed(0))
            xn = x.numpy()
            for threads in args.threads:
                results = {}
                for name, path in (("ORT fp32", paths["fp32"]), ("ORT dynamic int8", paths["dyn"]),
                                   ("vitq int8 (ORT, static QDQ)", paths["vitq"]),
                                   ("vitq W4A8 (MatMulNBits, 4-bit groups of 32)", paths.get("nbits"))):
                    if path is None:
                        continue
                    s = ort_session(path, threads)
                    results[name] = median_ms(lambda s=s: s.run(None, {"images": xn}), args.warmup, args.runs)
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    results["PyTorch eager fp32"] = median_ms(lambda: fp(x), args.warmup, args.runs)
                results["vitq int8 (PT2E, torch.compile + oneDNN)"] = median_ms(lambda: pt2e(x), args.warmup, args.runs)
                base = results["ORT fp32"]
                for name, ms in results.items():
                    rows.append(dict(model=loaded.entry.timm_name, random_init=loaded.random_init, path=name,
                                     batch=batch, threads=threads, median_ms=ms, speedup_vs_ort_fp32=base / ms))
                    print(f"| {short}{' (random init)' if loaded.random_init else ''} | {name} | {batch} | {threads} | "
                          f"{ms:.1f} | {base / ms:.2f} |", flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
