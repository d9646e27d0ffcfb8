"""Issue 41's guard: the refactor changes no number. Runs the same ``vitq quantize`` commands on the code of
``--src`` (a checkout's ``src`` folder; default: this one) and prints top-1, agreement and KL of each.

    python benchmarks/refactor_guard.py --src /tmp/old/src --legacy --out before.json
    python benchmarks/refactor_guard.py --out after.json --compare before.json

The cases: the demo (W4A4 mptq, DeiT-Tiny), W6A6 and W8A8 mptq on DeiT-Tiny and ViT-Tiny, Greedy MP at a
5-bit budget in both protocols on DeiT-Tiny, and m2q at half the INT8 EDP on DeiT-Tiny; calib32 / eval968,
the recipes' defaults (the ``mse`` observer). ``--legacy`` gives the options of the code before issue 41's
small CLI (``--observer mse --quiet``), for ``--src`` checkouts of that time. Needs ../shared/assets (or
VITQ_ASSETS).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_flags
from vitq.io import dumps, is_output_json, output_json
from vitq.output import destination

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "demo W4A4 deit": ["deit_tiny", "--w-bits", "4", "--a-bits", "4"],
    "W6A6 deit": ["deit_tiny", "--w-bits", "6", "--a-bits", "6"],
    "W8A8 deit": ["deit_tiny", "--w-bits", "8", "--a-bits", "8"],
    "W6A6 vit": ["vit_tiny", "--w-bits", "6", "--a-bits", "6"],
    "W8A8 vit": ["vit_tiny", "--w-bits", "8", "--a-bits", "8"],
    "Greedy 5-bit standard deit": ["deit_tiny", "--budget-w", "5", "--budget-a", "5"],
    "Greedy 5-bit full deit": ["deit_tiny", "--budget-w", "5", "--budget-a", "5", "--protocol", "full"],
}
M2Q = {"m2q EDP 0.5 deit": ["deit_tiny", "--budget-edp", "0.5"]}




def run(src: Path, assets: Path, name: str, argv: list[str], method: str, work: Path, legacy: bool) -> dict:
    out = work / name.replace(" ", "_")
    cmd = [sys.executable, "-m", "vitq.cli", "quantize", *argv, "--method", method,
           "--calib", str(assets / "imagenet-sample"), "--calib-list", str(assets / "calib32.txt"),
           "--eval", str(assets / "imagenet-sample"), "--eval-list", str(assets / "eval968.txt"),
           *(["--observer", "mse", "--quiet"] if legacy else ["-q"]), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(src), "VITQ_ASSETS": str(assets), "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    report = json.loads((out / "report.json").read_text())
    q = report["quantized"]
    return {"top1": q["top1"], "agreement": q["agreement"], "kl": q["kl"], "seconds": time.perf_counter() - t,
            "fp_top1": report["fp"]["top1"], "top1_delta_se": q.get("top1_delta_se"),
            "agreement_se": q.get("agreement_se"), "kl_se": q.get("kl_se"),
            "avg_w_bits": report["avg_w_bits"], "avg_a_bits": report["avg_a_bits"], "size_mb": report["size_bytes"] / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO / "src"), help="the src folder of the code to run")
    ap.add_argument("--out", help="write the results as JSON")
    ap.add_argument("--compare", help="a JSON written by an earlier run: print both and whether they are equal")
    ap.add_argument("--only", nargs="*", help="run only these cases")
    ap.add_argument("--legacy", action="store_true", help="the command-line options of code before the small CLI")
    args = ap.parse_args()
    assets = Path(os.environ.get("VITQ_ASSETS", REPO.parent / "shared" / "assets"))
    commit = subprocess.run(["git", "-C", str(Path(args.src).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="vitq-guard-") as d:
        for name, argv in [*CASES.items(), *M2Q.items()]:
            if args.only and name not in args.only:
                continue
            rows[name] = run(Path(args.src), assets, name, argv, "m2q" if name in M2Q else "mptq", Path(d), args.legacy)
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
    result = {"commit": commit, "cpu_flags": cpu_flags(), "rows": rows}
    if args.out:  # a new file, or an earlier result of this script: nothing else is replaced
        with destination(args.out, kind="file", overwrite=True, is_ours=is_output_json) as tmp:
            tmp.write_text(dumps(output_json(result, "refactor-guard")))
    other = json.loads(Path(args.compare).read_text()) if args.compare else None
    print(f"# refactor guard, cpu flags: {result['cpu_flags']}")
    head = f"| case | top-1 / agreement / KL at {commit} |"
    print(head + (f" at {other['commit']} | equal |" if other else ""))
    print("|---|---|" + ("---|---|" if other else ""))
    for name, r in rows.items():
        cell = f"{r['top1']:.2f} / {r['agreement']:.2f} / {r['kl']:.4f}"
        line = f"| {name} | {cell} |"
        if other and name in other["rows"]:
            o = other["rows"][name]
            same = all(o[k] == r[k] for k in ("top1", "agreement", "kl"))
            line += f" {o['top1']:.2f} / {o['agreement']:.2f} / {o['kl']:.4f} | {'yes' if same else 'NO'} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
