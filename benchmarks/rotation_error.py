"""Per layer, the quantized output error with and without the Hadamard rotation that ``--rotate`` searches.

Prints what :func:`vitq.methods.rotation.apply_rotation` decides on the float model (first 8 calibration
images, the config's widths): for each fc2 (online rotation) and each attention's v/proj (folded), the MSE
of ``Q(x) Q(W)^T`` against ``x W^T`` without and with the rotation, their ratio, and whether it is kept
(docs/methods.md, "Hadamard rotations"); with ``--parts fc2,v,qk`` also each attention's q/k (the MSE of
its quantized attention logits).

    python benchmarks/rotation_error.py deit_tiny --bits 4
    python benchmarks/rotation_error.py deit_tiny --bits 4 --parts qk
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from vitq.methods.rotation import apply_rotation
from vitq.quant import QuantConfig
from vitq.zoo import load_model

from _models import load_calib32


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4, help="weight and activation width of the scoring")
    ap.add_argument("--parts", default="fc2,v", help="rotations searched: fc2, v, qk (vitq quantize --set rotation.parts=...)")
    args = ap.parse_args()
    loaded = load_model(args.model)
    calib = load_calib32(Path(args.assets), loaded.entry.transform)
    res = apply_rotation(loaded.model, calib, QuantConfig(w_bits=args.bits, a_bits=args.bits), progress=False,
                         parts=tuple(args.parts.split(",")))
    print(f"# {loaded.entry.timm_name}: W{args.bits}A{args.bits} layer-output MSE (q/k: attention-logit MSE), "
          "8 calibration images")
    print("| layer | kind | MSE without | MSE rotated | ratio | kept |")
    print("|---|---|---|---|---|---|")
    for layer in res.layers:
        print(f"| {layer.name} | {layer.kind} | {layer.mse_before:.4g} | {layer.mse_rotated:.4g} | "
              f"{layer.mse_rotated / layer.mse_before:.3f} | {'yes' if layer.rotated else 'no'} |")
    for kind in dict.fromkeys(la.kind for la in res.layers):
        rows = [la for la in res.layers if la.kind == kind]
        print(f"# {kind}: rotation kept in {sum(la.rotated for la in rows)} of {len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
