"""MPTQ-ViT ablation on the fixed split (calib32 -> eval968): baseline, +SQ-b, +OPT-m, both, GPTQ, the mptq
recipe, Greedy MP.

Every row is built by ``vitq.quantize``: the ``mptq`` rows and the Greedy MP rows with GPTQ and
reconstruction run the ``mptq`` recipe with its defaults (as ``vitq quantize`` does); the others run the
``minmax`` recipe with the listed passes switched on. ``--set SECTION.FIELD=VALUE`` changes a setting in every
row, as on the command line (docs/usage.md). All variants of one model are evaluated in one pass next to
the FP model (paired on the same images). Prints a markdown table; every row: top-1, drop, agreement, KL,
average W/A bits, size, BOPs and the time of calibration plus searches.

    python benchmarks/mptq_ablation.py --models deit_tiny vit_tiny --out runs/mptq_ablation.json
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

import vitq
from vitq.data import make_dataset, make_loader
from vitq.evaluation import evaluate_many
from vitq.io import atomic_write_json
from vitq.methods.mptq import MethodOptions
from vitq.quant import model_stats
from vitq.quant.config import ConfigError
from vitq.settings import Settings, settings_key
from vitq.zoo import load_model

from _models import alt_split, load_calib32, load_calib_files

# the passes of each single-precision row; "mptq" is the recipe itself
METHODS = {"baseline": MethodOptions(), "+SQ-b": MethodOptions(sq_b=True), "+OPT-m": MethodOptions(opt_m=True),
           "+SQ-b +OPT-m": MethodOptions(sq_b=True, opt_m=True),
           # vitq's addition beyond the paper, here on every layer whatever its width (the mptq recipe re-rounds
           # only layers of <= 5 weight bits, so at W4 these rows are what it runs)
           "+GPTQ": MethodOptions(gptq=True, gptq_max_bits=8),
           "+SQ-b +OPT-m +GPTQ": MethodOptions(sq_b=True, opt_m=True, gptq=True, gptq_max_bits=8),
           "mptq": None}


def variants(spec: str):
    """``single:PROTOCOL:BITS:METHOD`` or ``greedy:PROTOCOL:BUDGET[:gptq][:recon]`` -> a description."""
    parts = spec.split(":")
    if parts[0] == "single":
        if parts[3] not in METHODS:
            raise SystemExit(f"unknown method {parts[3]!r} in {spec!r}; choose one of {', '.join(METHODS)}")
        return dict(kind="single", protocol=parts[1], bits=int(parts[2]), method=parts[3])
    extra = set(parts[3:])
    if extra - {"gptq", "recon"}:
        raise SystemExit(f"unknown greedy option(s) {sorted(extra - {'gptq', 'recon'})} in {spec!r}")
    return dict(kind="greedy", protocol=parts[1], budget=float(parts[2]), gptq="gptq" in extra, recon="recon" in extra)


DEFAULT = ([f"single:standard:{b}:{m}" for b in (4, 6) for m in METHODS]
           + [f"single:full:{b}:+SQ-b +OPT-m" for b in (4, 6)]
           + [f"greedy:full:{b}" for b in (6, 5)])


def plan_for(v: dict, sets: list[str], seed: int):
    """The row's plan: the recipe and passes of the variant, then every ``--set``."""
    s = Settings(quant={"protocol": v["protocol"], "seed": seed, "observer": "mse"})
    if v["kind"] == "single":
        s.quant.update(w_bits=v["bits"], a_bits=v["bits"])
        opts = METHODS[v["method"]]
    else:
        s.budget.update(w_bits=v["budget"], a_bits=v["budget"])
        mptq = v["gptq"] and v["recon"]
        opts = None if mptq else MethodOptions(sq_b=True, opt_m=True, gptq=v["gptq"], recon=v["recon"])
    s.recipe = "mptq" if opts is None else "minmax"
    for field, value in vars(opts or MethodOptions()).items():  # the row's passes
        if value is not None and value != getattr(MethodOptions, field, None):
            s.set(settings_key(f"options.{field}"), value)
    for a in sets:
        s.apply(a)
    return s.plan()


def label_of(v: dict, res, p) -> str:
    o = p.options
    on = [name for name, flag in (("SQ-b", o.sq_b), ("rotation", o.rotate), ("token scaling", o.token_scale),
                                  ("OPT-m", o.opt_m), (f"GPTQ <= {o.gptq_max_bits} bits", o.gptq),
                                  ("recon", o.recon_applies(p.config))) if flag]
    if v["kind"] == "single":
        head = f"W{v['bits']}A{v['bits']} {v['method']}"
    else:
        mixed = res.report["mixed"]
        head = f"Greedy MP {v['budget']:g}-bit ({mixed['search']} search, {mixed['probe_images']} probe images"
        if mixed.get("uniform_fallback"):
            head += f", uniform {mixed['uniform_fallback']}-bit won"
        head += ")"
    return f"{head} [{p.recipe}: {', '.join(on) or 'engine only'}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "vit_tiny"])
    ap.add_argument("--variants", nargs="+", default=DEFAULT)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="change a setting in every row, as `vitq quantize --set` (e.g. recon.iters=100)")
    ap.add_argument("--seed", type=int, default=0,
                    help="QuantConfig seed: observers' sampling and reconstruction's batch order (not the images)")
    ap.add_argument("--out")
    ap.add_argument("--alt-split", type=int, metavar="SEED",
                    help="calibrate on 32 images drawn (seeded) from eval968 and evaluate on the other 936 instead "
                         "of calib32 -> eval968")
    ap.add_argument("--per-image", metavar="FILE",
                    help="also write each row's per-image top-1, agreement and KL (with the image names) to FILE, "
                         "for benchmarks/paired_compare.py")
    args = ap.parse_args()
    assets = Path(args.assets)
    plans = {}
    for spec in args.variants:  # every row's settings checked before any model is built
        try:
            plans[spec] = (variants(spec), plan_for(variants(spec), args.sets, args.seed))
        except ConfigError as exc:
            ap.error(f"{spec}: {exc}")
    images = assets / "imagenet-sample"
    split = None if args.alt_split is None else alt_split(assets, args.alt_split)
    rows = []
    per_image: dict = {"images": {}, "rows": []}
    print(f"# MPTQ-ViT ablation, {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, {date.today()}"
          + ("" if split is None else f"; second split (seed {args.alt_split}): {len(split[0])} calibration images "
             f"drawn from eval968, evaluation on the other {len(split[1])}") + (f"; --set {' '.join(args.sets)}"
                                                                                 if args.sets else ""))
    print("| model | protocol | variant | top-1 | FP top-1 | drop | agreement % | KL | avg W | avg A | size MB | GBOPs | calib+search s | SE drop / agreement / KL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_model(short)
        t = loaded.entry.transform
        calib = load_calib32(assets, t) if split is None else load_calib_files(assets, t, split[0])
        built, meta = {}, {}
        for spec, (v, p) in plans.items():
            t0 = time.perf_counter()
            try:
                res = vitq.api.run(loaded.model, calib, p, progress=False)
            except ConfigError as exc:  # report and go on: the other variants are still worth measuring
                print(f"skipped {short} {spec}: {exc}", file=sys.stderr, flush=True)
                continue
            key = f"{v['protocol']} {label_of(v, res, p)}"
            built[key] = res.model
            meta[key] = dict(protocol=v["protocol"], variant=label_of(v, res, p), time_s=time.perf_counter() - t0)
            print(f"built {short} {key} in {meta[key]['time_s']:.0f}s", file=sys.stderr, flush=True)
        ds = (make_dataset(images, t, assets / "eval968.txt", args.limit) if split is None
              else make_dataset(images, t, limit=args.limit, files=split[1]))
        res = evaluate_many({"fp": loaded.model, **built}, make_loader(ds), reference="fp",
                            per_image=bool(args.per_image))
        fp = res["fp"]
        per_image["images"][loaded.entry.timm_name] = [str(f) for f in ds.files]
        for key, q in built.items():
            r, m, st = res[key], meta[key], model_stats(q)
            rows.append(dict(model=loaded.entry.timm_name, **m, top1=r.top1, fp_top1=fp.top1, agreement=r.agreement,
                             kl=r.kl, n_images=r.n_images, top1_delta_se=r.top1_delta_se,
                             agreement_se=r.agreement_se, kl_se=r.kl_se, **st))
            if args.per_image:
                per_image["rows"].append(dict(model=loaded.entry.timm_name, protocol=m["protocol"],
                                              variant=m["variant"], **r.per_image))
            se = "" if r.top1_delta_se is None else f"{r.top1_delta_se:.2f} / {r.agreement_se:.1f} / {r.kl_se:.4f}"
            print(f"| {short} | {m['protocol']} | {m['variant']} | {r.top1:.2f} | {fp.top1:.2f} | {r.top1 - fp.top1:+.2f} | "
                  f"{r.agreement:.1f} | {r.kl:.4f} | {st['avg_w_bits']:.2f} | {st['avg_a_bits']:.2f} | "
                  f"{st['size_bytes'] / 1e6:.2f} | {st['bops'] / 1e9:.1f} | {m['time_s']:.0f} | {se} |", flush=True)
    if args.out:
        atomic_write_json(args.out, rows)
    if args.per_image:
        atomic_write_json(args.per_image, per_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
