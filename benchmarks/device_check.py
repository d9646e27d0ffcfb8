"""The demo recipe (W4A4 ``mptq`` on the real DeiT-Tiny, calib32) on the CPU and on a CUDA GPU, side by side:
top-1 and agreement with the float model for each, the agreement between the two quantized models, and the
time of each pass.

    python benchmarks/device_check.py [--limit 968] [--w-bits 4 --a-bits 4]

Needs a CUDA GPU (run it on a lent device machine; CI has none). The two models are not expected to be
bit-identical: GPU kernels round float sums in another order, and the searches' choices can follow.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import load_calib32  # noqa: E402

import vitq  # noqa: E402
from vitq.data import make_dataset, make_loader  # noqa: E402
from vitq.evaluation import evaluate_many  # noqa: E402
from vitq.quant.config import QuantConfig  # noqa: E402
from vitq.zoo import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VITQ_ASSETS", REPO.parent / "shared" / "assets"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=968, help="evaluation images (first N of eval968)")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit(f"device_check: no CUDA GPU here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
                 "run it where a GPU is lent")
    loaded = load_model("deit_tiny")
    calib = load_calib32(ASSETS, loaded.entry.transform)
    ds = make_dataset(ASSETS / "imagenet-sample", loaded.entry.transform, ASSETS / "eval968.txt", args.limit)
    config = QuantConfig(w_bits=args.w_bits, a_bits=args.a_bits)
    runs = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        res = vitq.quantize(loaded.model, calib, config, device=dev, progress=False)
        if dev == "cuda":
            torch.cuda.synchronize()
        runs[dev] = (res, time.perf_counter() - t0)
    fp_gpu = loaded.model.to("cuda")
    models = {"fp": fp_gpu, "cpu": runs["cpu"][0].model.to("cuda"), "cuda": runs["cuda"][0].model}
    results = evaluate_many(models, make_loader(ds, 64, 4), reference="fp", per_image=True, progress=False)
    both = evaluate_many({"cpu": models["cpu"], "cuda": models["cuda"]}, make_loader(ds, 64, 4), reference="cpu",
                         progress=False)
    gpu = torch.cuda.get_device_name()
    print(f"DeiT-Tiny W{args.w_bits}A{args.a_bits} mptq, calib32, {results['fp'].n_images} eval images; GPU: {gpu}")
    print(f"{'':<26} {'cpu':>12} {'cuda':>12}")
    print(f"{'top-1 (FP ' + format(results['fp'].top1, '.2f') + ')':<26} {results['cpu'].top1:>12.2f} "
          f"{results['cuda'].top1:>12.2f}")
    print(f"{'agreement with FP':<26} {results['cpu'].agreement:>12.2f} {results['cuda'].agreement:>12.2f}")
    print(f"{'KL from FP':<26} {results['cpu'].kl:>12.4f} {results['cuda'].kl:>12.4f}")
    print(f"{'quantize s (total)':<26} {runs['cpu'][1]:>12.1f} {runs['cuda'][1]:>12.1f}")
    timing_c, timing_g = runs["cpu"][0].report.get("method_timing", {}), runs["cuda"][0].report.get("method_timing", {})
    for key in timing_c:
        print(f"{'  ' + key:<26} {timing_c[key]:>12.1f} {timing_g.get(key, float('nan')):>12.1f}")
    print(f"agreement cuda vs cpu quantized model: {both['cuda'].agreement:.2f} % (KL {both['cuda'].kl:.5f})")


if __name__ == "__main__":
    main()
