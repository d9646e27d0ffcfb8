"""Where an exported model's time goes in ONNX Runtime: the W8A8 export of a model (min-max, calib32) against
its fp32 export, batch 1, 1 thread, median of 15 runs, then ONNX Runtime's profile of the export by operator.

    python benchmarks/onnx_profile.py --model efficientvit_b1
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from _machine import cpu_flags, median_ms, ort_session
from _models import load_calib32, load_or_random_init
from vitq.export.onnx import export_onnx
from vitq.quant import QuantConfig
from vitq.quant.engine import quantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientvit_b1")
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    args = ap.parse_args()
    loaded = load_or_random_init(args.model)
    t = loaded.entry.transform
    q = quantize(loaded.model.eval(), load_calib32(Path(args.assets), t), QuantConfig(w_bits=8, a_bits=8))
    work = Path(tempfile.mkdtemp(prefix="vitq-profile-"))
    with torch.inference_mode():
        torch.onnx.export(loaded.model, (torch.zeros(1, *t.input_size),), str(work / "fp32.onnx"), dynamo=False,
                          opset_version=17, input_names=["images"], output_names=["logits"])
    rep = export_onnx(q, t.input_size, work / "vitq.onnx")
    x = torch.randn(1, *t.input_size, generator=torch.Generator().manual_seed(0)).numpy()
    sessions = {n: ort_session(str(work / f"{n}.onnx"), 1) for n in ("fp32", "vitq")}
    fp32, vitq = (median_ms(lambda s=s: s.run(None, {"images": x}), 3, 15) for s in sessions.values())
    print(f"# {args.model}{' (random init)' if loaded.random_init else ''}; CPU {cpu_flags()}; batch 1, 1 thread")
    print(f"ORT fp32 {fp32:.1f} ms; vitq int8 {vitq:.1f} ms ({fp32 / vitq:.2f}x); {rep.n_integer}/{len(rep.layers)} "
          f"layers integer, {len(rep.float_weight_layers)} with float weights")
    s = ort_session(str(work / "vitq.onnx"), 1, str(work / "prof"))
    for _ in range(10):
        s.run(None, {"images": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"] / 10 / 1e3
    total = sum(per_op.values())
    print(f"{'operator':<28} {'ms per run':>10} {'share':>6}")
    for op, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{op:<28} {ms:>10.2f} {100 * ms / total:>5.1f}%")


if __name__ == "__main__":
    main()
