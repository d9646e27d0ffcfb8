"""M2-ViT table and accuracy-vs-EDP curves: INT8, M2-ViT's own recipe, APoT only, uniform mixed precision and
M2Q (layer-level and channel split).

For each model: the INT8 baseline (uniform W8A8 on the MAC engine); the paper's recipe (``paper_config``:
depthwise W4 uniform, linears and 1x1 convs W8 with each output channel uniform or APoT by weight error, A8);
"APoT only" (every eligible layer at 4-bit APoT weights, the rest W8, A8); and three searches under an EDP
budget with W {4, 8}, A {8}, on the MPTQ passes (SQ-b, OPT-m, GPTQ; ``--base plain`` for none): uniform
mixed precision (M2Q level ``none``), M2Q with a layer-level scheme choice (``layer``) and M2Q with the
channel split (``channel``). One search per method runs to the smallest budget and records the configs of
the larger ones on the way (``greedy_mp(snapshots=...)``); each config is then rebuilt and measured. Accuracy
on eval968 next to FP, with the paired standard errors of the drop and agreement; the share of the MACs on
the shift-add engine; random-init models (no weights here) get cost rows only.

    python benchmarks/m2q.py --models deit_tiny tf_efficientnet_lite0 efficientvit_b1 --out runs/m2q.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from vitq.data import make_dataset, make_loader
from vitq.evaluation import evaluate_many
from vitq.hardware import estimate, extract_workloads, int8_baseline, load_hardware
from vitq.io import atomic_write_json
from vitq.methods.m2q import fixed_scheme_config, m2q, paper_config
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.quant import QuantConfig, model_stats

from _models import load_calib32, load_or_random_init

BUDGETS = (0.7, 0.5, 0.4, 0.3)
BASES = {"mptq": MethodOptions(sq_b=True, opt_m=True, gptq=True), "plain": MethodOptions()}
SEARCHES = (("uniform MP", "none"), ("M2Q layer", "layer"), ("M2Q channel", "channel"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "tf_efficientnet_lite0", "efficientvit_b1"])
    ap.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS), help="EDP fractions of INT8")
    ap.add_argument("--hw", help="accelerator YAML merged over the defaults")
    ap.add_argument("--base", choices=list(BASES), default="mptq", help="the passes the searches run on")
    ap.add_argument("--searches", nargs="+", default=[s[1] for s in SEARCHES], choices=[s[1] for s in SEARCHES])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--out")
    ap.add_argument("--plot-dir", default="docs/figures")
    args = ap.parse_args()
    assets = Path(args.assets)
    images = assets / "imagenet-sample"
    hw = load_hardware(args.hw)
    budgets = sorted(set(args.budgets), reverse=True)
    rows = []
    print(f"# M2Q benchmark, {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, {date.today()}, "
          f"accelerator {args.hw or 'default'} (schedule={hw.schedule})")
    print(f"# searches on the {args.base} base; EDP etc. per image in the cost model")
    print("| model | row | EDP budget | EDP / INT8 | energy mJ | latency ms | size MB | MACs on shift engine | top-1 "
          "| drop (se) | agreement % (se) | KL (se) | search s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    options = BASES[args.base]
    for short in args.models:
        loaded = load_or_random_init(short)
        entry, size = loaded.entry, loaded.entry.transform.input_size
        calib = load_calib32(assets, entry.transform)
        base = QuantConfig(w_bits=8, a_bits=8, observer="mse")
        built: dict[str, tuple[torch.nn.Module, dict]] = {}
        t = time.perf_counter()
        built["INT8 (MAC engine)"] = (run_pipeline(loaded.model, calib, base, MethodOptions()).model,
                                      dict(budget=None, search_s=time.perf_counter() - t))
        t = time.perf_counter()
        built["M2-ViT recipe (paper)"] = (run_pipeline(loaded.model, calib, paper_config(loaded.model, base, size),
                                                       MethodOptions()).model,
                                          dict(budget=None, search_s=time.perf_counter() - t))
        t = time.perf_counter()
        built["APoT only (W4 APoT where eligible)"] = (
            run_pipeline(loaded.model, calib, fixed_scheme_config(loaded.model, base, size), MethodOptions()).model,
            dict(budget=None, search_s=time.perf_counter() - t))
        for label, level in SEARCHES:
            if level not in args.searches:
                continue
            t = time.perf_counter()
            q, res = m2q(loaded.model, calib, base, hw, budgets[-1], size, level=level, options=options,
                         curve=tuple(budgets[:-1]), best_effort=True, progress=False)
            search_s = time.perf_counter() - t
            print(f"searched {short} {label} in {search_s:.0f}s", file=sys.stderr, flush=True)
            configs = {**res.curve, budgets[-1]: res.config}
            for f in budgets:
                if f not in configs:
                    continue
                m = q if f == budgets[-1] else run_pipeline(loaded.model, calib, configs[f], options).model
                built[f"{label} @ {f:g}"] = (m, dict(budget=f, search_s=search_s))
        results = {}
        if not loaded.random_init:
            ds = make_dataset(images, entry.transform, assets / "eval968.txt", args.limit)
            results = evaluate_many({"fp": loaded.model, **{k: v[0] for k, v in built.items()}}, make_loader(ds),
                                    reference="fp")
        fp = results.get("fp")
        base_cost = None
        for key, (m, meta) in built.items():
            wl = extract_workloads(m, size)
            c = estimate(wl, hw)
            base_cost = base_cost or estimate(int8_baseline(wl), hw)
            st = model_stats(m)
            r = results.get(key)
            shift = c.shift_mac_share
            row = dict(model=entry.timm_name, random_init=loaded.random_init, row=key, base=args.base, **meta,
                       edp=c.edp, edp_ratio=c.edp / base_cost.edp, energy_j=c.energy_j, latency_s=c.latency_s,
                       size_bytes=st["size_bytes"], shift_mac_share=shift, busy_s=c.busy_s,
                       top1=r.top1 if r else None, fp_top1=fp.top1 if fp else None,
                       drop_se=r.top1_delta_se if r else None, agreement=r.agreement if r else None,
                       agreement_se=r.agreement_se if r else None, kl=r.kl if r else None, kl_se=r.kl_se if r else None)
            rows.append(row)
            acc = (f"{r.top1:.2f} | {r.top1 - fp.top1:+.2f} ({r.top1_delta_se:.2f}) | {r.agreement:.1f} "
                   f"({r.agreement_se:.1f}) | {r.kl:.4f} ({r.kl_se:.4f})" if r else "random init | - | - | -")
            print(f"| {short} | {key} | {meta['budget'] if meta['budget'] else '-'} | {row['edp_ratio']:.3f} | "
                  f"{c.energy_j * 1e3:.3f} | {c.latency_s * 1e3:.3f} | {st['size_bytes'] / 1e6:.2f} | "
                  f"{100 * shift:.1f} % | {acc} | {meta['search_s']:.0f} |", flush=True)
        if fp:
            print(f"| {short} | FP32 | - | - | - | - | - | - | {fp.top1:.2f} | 0 | 100 | 0 | - |", flush=True)
        _plot([r for r in rows if r["model"] == entry.timm_name], Path(args.plot_dir) / f"m2q_curve_{short}.png",
              f"{short}{' (random init: cost only)' if loaded.random_init else ''}")
    if args.out:
        atomic_write_json(args.out, rows)
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitq.io import atomic_path

    have_acc = rows and rows[0]["top1"] is not None
    fig, ax = plt.subplots(figsize=(6, 4))
    # one colour per series on every model's plot, whichever searches ran
    for (label, _), marker, colour in zip(SEARCHES, ("o-", "s-", "D-"), ("C0", "C1", "C2")):
        pts = sorted((r["edp_ratio"], r["top1"] if have_acc else r["energy_j"] * 1e3) for r in rows
                     if r["row"].startswith(label))
        if pts:
            ax.plot(*zip(*pts), marker, color=colour, label=label)
    fixed = [r for r in rows if r["budget"] is None]
    for r, colour in zip(fixed, ("C3", "C4", "C5")):
        ax.plot(r["edp_ratio"], r["top1"] if have_acc else r["energy_j"] * 1e3, "^", color=colour, label=r["row"])
    if have_acc:
        ax.axhline(rows[0]["fp_top1"], color="grey", ls="--", lw=0.8, label="FP32")
    ax.set_xlabel("EDP / INT8 baseline EDP")
    ax.set_ylabel("top-1 % (eval968)" if have_acc else "energy mJ")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
