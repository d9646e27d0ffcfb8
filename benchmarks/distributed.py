"""Speed-up of torchrun's 2 processes (1 thread each) over 1 process (1 thread) on this machine, with the same
results, on the real DeiT-Tiny:

- evaluation: ``vitq eval deit_tiny`` on the first ``--eval-images`` of eval968 (the evaluation loop's wall
  time, from the JSON it writes);
- a Greedy MP search: ``vitq quantize deit_tiny --budget-w 5 --budget-a 6`` (knapsack with GPTQ-aware
  losses, the default), the search stage's time from report.json (``mixed.timing.search``); reconstruction is
  switched off, since it runs after the search and is the same in both.

    python benchmarks/distributed.py [--eval-images 968] [--work DIR]

Prints the CPU's vector extensions, the times, the speed-ups, and whether the two runs agree (top-1, bits,
model bytes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import cpu_flags

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("VITQ_ASSETS", REPO.parent / "shared" / "assets"))




def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vitq(nproc: int, argv: list[str]) -> float:
    """Run ``vitq ARGV`` in ``nproc`` processes of one thread each; the wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1", "VITQ_ASSETS": str(ASSETS)}
    launch = [sys.executable, "-m", "vitq"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_port()),
        "-m", "vitq"]
    t0 = time.perf_counter()
    done = subprocess.run(launch + argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-images", type=int, default=968)
    ap.add_argument("--work", type=Path, help="folder for the runs' outputs (default: a new temporary folder)")
    args = ap.parse_args()
    if not (ASSETS / "eval968.txt").is_file():
        sys.exit(f"needs the assets at {ASSETS} (set VITQ_ASSETS)")
    work = args.work or Path(tempfile.mkdtemp(prefix="vitq-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    data = ["--workers", "0"]
    rows = []
    evals = {}
    for n in (1, 2):
        out = work / f"eval{n}.json"
        wall = vitq(n, ["eval", "deit_tiny", "--data", str(ASSETS / "imagenet-sample"), "--list",
                        str(ASSETS / "eval968.txt"), "--limit", str(args.eval_images), "--out", str(out),
                        "--overwrite", *data])
        evals[n] = json.loads(out.read_text())
        rows.append(("evaluation", n, evals[n]["wall_s"], wall))
    quant = {}
    for n in (1, 2):
        out = work / f"greedy{n}"
        wall = vitq(n, ["quantize", "deit_tiny", "--calib", str(ASSETS / "imagenet-sample"), "--calib-list",
                        str(ASSETS / "calib32.txt"), "--eval", str(ASSETS / "imagenet-sample"), "--eval-list",
                        str(ASSETS / "eval968.txt"), "--limit", "64", "--budget-w", "5", "--budget-a", "6",
                        "--set", "recon.enabled=false", "--out", str(out), "--overwrite", *data])
        rep = json.loads((out / "report.json").read_text())
        quant[n] = (rep, digest(out / "model.safetensors"))
        rows.append(("Greedy MP search", n, rep["mixed"]["timing"]["search"], wall))
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores; 1 thread per process")
    print(f"{'stage':<18} {'processes':>9} {'stage s':>9} {'command s':>10} {'speed-up':>9}")
    base = {}
    for stage, n, s, wall in rows:
        base.setdefault(stage, s)
        print(f"{stage:<18} {n:>9} {s:>9.1f} {wall:>10.1f} {base[stage] / s:>8.2f}x")
    e1, e2 = evals[1], evals[2]
    print(f"evaluation: top-1 {e1['top1']:.2f} / {e2['top1']:.2f} on {e1['n_images']} / {e2['n_images']} images")
    (r1, d1), (r2, d2) = quant[1], quant[2]
    same_bits = r1["mixed"]["layers"] == r2["mixed"]["layers"]
    print(f"Greedy MP: same bits {same_bits}; model.safetensors sha256 {d1} / {d2} (same: {d1 == d2}); quantized "
          f"top-1 {r1['quantized']['top1']:.2f} / {r2['quantized']['top1']:.2f}; probes {r1['mixed']['probes']} / "
          f"{r2['mixed']['probes']}")


if __name__ == "__main__":
    main()
