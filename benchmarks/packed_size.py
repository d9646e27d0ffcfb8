"""Size of the packed artifact (`vitq export --format vitq`) against fp32, with a byte breakdown.

For each model and weight bit-width: quantize (plain engine, min-max, calib32, standard protocol, A bits =
W bits), export packed to a temporary file, then report the file size, the fp32 parameter bytes, the
ratio, and what the bytes are: packed weight codes, per-channel weight scales, other float tensors
(position embedding, biases, norms, activation-quantizer parameters) and the safetensors header. It
also reloads the file and checks that its logits on the first calibration images equal the simulated
model's exactly. Models without a local checkpoint run with random weights (sizes do not depend on the
values; the report says so).

    python benchmarks/packed_size.py --models deit_tiny deit_small --bits 4 8
"""
from __future__ import annotations

import argparse
import os
import platform
import struct
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
from safetensors import safe_open

from vitq.export.packed import export_packed, load_packed
from vitq.io import atomic_write_json
from vitq.quant import QuantConfig
from vitq.quant.engine import quantize

from _models import load_calib32, load_or_random_init


def breakdown(path: Path) -> dict[str, int]:
    """Bytes of the file by kind of tensor (and the header)."""
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    parts = {"packed weights": 0, "weight scales": 0, "other float": 0, "header": 8 + header_len}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            size = t.numel() * t.element_size()
            if key.endswith(".__packed__"):
                parts["packed weights"] += size
            elif ".w_quant." in key:
                parts["weight scales"] += size
            else:
                parts["other float"] += size
    return parts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "deit_small"])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--check-images", type=int, default=4)
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args()
    assets = Path(args.assets)
    rows = []
    print(f"# packed size, {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, {date.today()}")
    print("| model | weights | W bits | file MB | fp32 MB | x smaller | packed codes MB | weight scales MB "
          "| other float MB | header MB | reload == sim |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_or_random_init(short)
        calib = load_calib32(assets, loaded.entry.transform)
        for bits in args.bits:
            cfg = QuantConfig(w_bits=bits, a_bits=bits, protocol="standard", observer="minmax")
            q = quantize(loaded.model, calib, cfg, progress=False)
            meta = {"model": short, "checkpoint": loaded.checkpoint, "random_init": loaded.random_init}
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "model.packed.safetensors"
                sizes = export_packed(q, meta, path)
                parts = breakdown(path)
                back, _ = load_packed(path)
                probe = calib[: args.check_images]
                with torch.inference_mode():
                    same = bool(torch.equal(q(probe), back(probe)))
            mb = 1e6
            row = dict(model=short, random_init=loaded.random_init, w_bits=bits, file_bytes=sizes["file_bytes"],
                       fp32_bytes=sizes["fp32_bytes"], ratio=sizes["ratio"], parts=parts, reload_equal=same)
            rows.append(row)
            print(f"| {short} | {'random init' if loaded.random_init else 'pretrained'} | {bits} "
                  f"| {sizes['file_bytes'] / mb:.3f} | {sizes['fp32_bytes'] / mb:.3f} | {sizes['ratio']:.2f} "
                  f"| {parts['packed weights'] / mb:.3f} | {parts['weight scales'] / mb:.3f} "
                  f"| {parts['other float'] / mb:.3f} | {parts['header'] / mb:.3f} | {'yes' if same else 'NO'} |",
                  flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    return 0 if all(r["reload_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
