"""MPTQ-ViT ablation on the fixed split (calib32 -> eval968): baseline, +SQ-b, +OPT-m, both, Greedy MP.

All variants of one model are evaluated in one pass next to the FP model (paired on the same images).
Prints a markdown table; every row: top-1, drop, agreement, KL, average W/A bits, size, BOPs and the
time of calibration plus searches.

    python benchmarks/mptq_ablation.py --models deit_tiny vit_tiny --out runs/mptq_ablation.json
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from vitq.adapters import adapter_for
from vitq.commands import parse_bits_list
from vitq.data import make_dataset, make_loader
from vitq.evaluation import evaluate_many
from vitq.io import atomic_write_json
from vitq.methods.greedy_mp import (DEFAULT_CANDIDATES, SEARCHES, Budget, default_gptq_losses, default_probe_images,
                                    greedy_mp)
from vitq.methods.mptq import MethodOptions, run_pipeline
from vitq.recipes import mptq_gelu_token_shifts, mptq_rotates, mptq_token_scales, mptq_uniform_fallback
from vitq.methods.optm import PTF_OBJECTIVES
from vitq.methods.token_scale import BUFFER as TOKEN_SCALE_BUFFER
from vitq.quant import QuantConfig, all_quantizers, model_stats
from vitq.quant.config import ConfigError
from vitq.zoo import load_model

from _models import alt_split, load_calib32, load_calib_files

METHODS = {"baseline": MethodOptions(), "+SQ-b": MethodOptions(sq_b=True), "+OPT-m": MethodOptions(opt_m=True),
           "+SQ-b +OPT-m": MethodOptions(sq_b=True, opt_m=True),
           # vitq's addition beyond the paper, here on every layer whatever its width (--method mptq re-rounds
           # only layers of <= 5 weight bits, so at W4 these rows are what it runs)
           "+GPTQ": MethodOptions(gptq=True, gptq_max_bits=8),
           "+SQ-b +OPT-m +GPTQ": MethodOptions(sq_b=True, opt_m=True, gptq=True, gptq_max_bits=8),
           # exactly what --method mptq runs (GPTQ on <= 5-bit weights; block reconstruction at activation widths
           # up to MethodOptions.recon_max_bits, 6 since session 8)
           "mptq": MethodOptions(sq_b=True, opt_m=True, gptq=True, recon=True),
           # --method mptq --sq-b-unnormed: SQ-b's shift and scale also on proj/fc2 inputs (explicit per-channel op)
           "mptq+unnormed": MethodOptions(sq_b=True, sq_b_unnormed=True, opt_m=True, gptq=True, recon=True)}


def variants(spec: str):
    """``single:PROTOCOL:BITS:METHOD`` or ``greedy:PROTOCOL:BUDGET[:gptq][:recon]`` -> a description."""
    parts = spec.split(":")
    if parts[0] == "single":
        return dict(kind="single", protocol=parts[1], bits=int(parts[2]), method=parts[3])
    extra = set(parts[3:])
    if extra - {"gptq", "recon"}:
        raise SystemExit(f"unknown greedy option(s) {sorted(extra - {'gptq', 'recon'})} in {spec!r}")
    return dict(kind="greedy", protocol=parts[1], budget=float(parts[2]), gptq="gptq" in extra, recon="recon" in extra)


DEFAULT = ([f"single:standard:{b}:{m}" for b in (4, 6) for m in METHODS]
           + [f"single:full:{b}:+SQ-b +OPT-m" for b in (4, 6)]
           + [f"greedy:full:{b}" for b in (6, 5)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "vit_tiny"])
    ap.add_argument("--variants", nargs="+", default=DEFAULT)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--probe-images", type=int,
                    help="Greedy MP: calibration images for sensitivities (default as vitq quantize: 16 for the "
                         "knapsack search, 8 for greedy)")
    ap.add_argument("--w-candidates", default=",".join(map(str, DEFAULT_CANDIDATES)),
                    help="Greedy MP: candidate weight bit-widths, comma-separated (vitq quantize --w-candidates)")
    ap.add_argument("--a-candidates", default=",".join(map(str, DEFAULT_CANDIDATES)),
                    help="Greedy MP: candidate activation bit-widths, comma-separated (vitq quantize --a-candidates)")
    ap.add_argument("--mp-search", choices=list(SEARCHES), default="knapsack",
                    help="Greedy MP's search (vitq quantize --mp-search)")
    ap.add_argument("--mp-gptq-losses", action=argparse.BooleanOptionalAction, default=None,
                    help="knapsack W losses with GPTQ's weights (default as vitq quantize: on where it applies)")
    ap.add_argument("--uniform-fallback", action=argparse.BooleanOptionalAction, default=None,
                    help="Greedy MP returns a uniform width instead where it scores better (default as vitq "
                         "quantize: off for the Greedy MP rows --method mptq runs at <= 6 bits in the standard "
                         "protocol, rule R37, and <= 5 in the full, rule R38; on otherwise)")
    ap.add_argument("--recon-iters", type=int, default=MethodOptions.recon_iters,
                    help="block-reconstruction steps per stage in the variants that run it")
    ap.add_argument("--recon-drop", type=float, default=MethodOptions.recon_drop,
                    help="QDrop probability during block reconstruction")
    ap.add_argument("--recon-max-bits", type=int, default=MethodOptions.recon_max_bits,
                    help="block reconstruction runs when the default activation width is at most this")
    ap.add_argument("--gptq-max-bits", type=int, default=None,
                    help="the widest weights GPTQ re-rounds (default: each variant's own, "
                         f"MethodOptions' {MethodOptions.gptq_max_bits} for mptq)")
    ap.add_argument("--recon-wscale-max-bits", type=int, default=MethodOptions.recon_wscale_max_bits,
                    help="reconstruction learns weight scales only on layers with at most this many weight bits")
    ap.add_argument("--no-recon-ptf", action="store_true",
                    help="block reconstruction keeps the PTF grids' steps (full protocol)")
    ap.add_argument("--seed", type=int, default=0,
                    help="QuantConfig seed: observers' sampling and reconstruction's batch order (not the images)")
    ap.add_argument("--opt-m-ptf", action=argparse.BooleanOptionalAction, default=MethodOptions.optm_ptf,
                    help="OPT-m also searches the PTF steps (vitq quantize --opt-m-ptf / --no-opt-m-ptf)")
    ap.add_argument("--opt-m-ptf-objective", choices=list(PTF_OBJECTIVES), default=MethodOptions.optm_ptf_objective,
                    help="what the PTF search minimizes (vitq quantize --opt-m-ptf-objective)")
    ap.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                    help="Hadamard rotations in the variants that run SQ-b (vitq quantize --rotate). Default: as vitq "
                         "quantize, on in the rows --method mptq runs (single mptq, Greedy MP with gptq and recon) in the "
                         "standard protocol at <= 6 bits (rules R30, R37) and in those Greedy MP rows in the full "
                         "protocol at <= 5 bits (rule R38), off elsewhere; --no-rotate turns it off everywhere")
    ap.add_argument("--token-scale", action=argparse.BooleanOptionalAction, default=None,
                    help="token scaling of fc2's input in the variants that run SQ-b (vitq quantize --token-scale). "
                         "Default: as vitq quantize (rules R31, R37: the rows --method mptq runs in the standard protocol "
                         "at <= 6 bits; R33: those in the full protocol with GELU token shifts), off elsewhere; "
                         "--no-token-scale turns it off everywhere")
    ap.add_argument("--rotate-parts", default=",".join(MethodOptions.rotate_parts),
                    help="with --rotate: which rotations are searched (vitq quantize --rotate-parts)")
    ap.add_argument("--token-shift", action=argparse.BooleanOptionalAction, default=QuantConfig.residual_token_shift,
                    help="full-protocol variants: token shifts on the PTF grids (vitq quantize --token-shift; on "
                         "by default since rule R20)")
    ap.add_argument("--gelu-token-shift", action=argparse.BooleanOptionalAction, default=None,
                    help="full-protocol variants: token shifts on the GELU inputs' grids (vitq quantize "
                         "--gelu-token-shift). Default: vitq quantize's, on in the rows --method mptq runs "
                         "(single mptq, Greedy MP with gptq and recon) since rules R33 and R47, off elsewhere")
    ap.add_argument("--out")
    ap.add_argument("--alt-split", type=int, metavar="SEED",
                    help="calibrate on 32 images drawn from eval968 by a permutation seeded SEED and evaluate on the "
                         "other 936 (a second split for rule R30, docs/methods.md) instead of calib32 -> eval968")
    ap.add_argument("--per-image", metavar="FILE",
                    help="also write each row's per-image top-1, agreement and KL (with the image names) to FILE, "
                         "for benchmarks/paired_compare.py")
    args = ap.parse_args()
    if args.probe_images is None:
        args.probe_images = default_probe_images(args.mp_search)
    try:
        w_cands, a_cands = parse_bits_list(args.w_candidates), parse_bits_list(args.a_candidates)
    except ConfigError as exc:
        ap.error(str(exc))
    assets = Path(args.assets)

    def runs_mptq(v: dict) -> bool:
        """Whether a row is what `vitq quantize --method mptq` runs (single mptq; Greedy MP with GPTQ and recon)."""
        return v["method"] == "mptq" if v["kind"] == "single" else v["gptq"] and v["recon"]

    def switched_on(flag: bool | None, rule, v: dict, cfg: QuantConfig) -> bool:
        """Whether a row gets an option: its --X/--no-X ``flag`` when given (only rows that run SQ-b), else vitq
        quantize's default, ``rule(cfg, single)`` for the rows --method mptq runs (R30, R37 and R38 for
        rotation, R31, R33 and R37 for token scaling)."""
        opts = METHODS[v["method"]] if v["kind"] == "single" else None
        if flag is not None:
            return flag and (opts is None or opts.sq_b)
        return runs_mptq(v) and rule(cfg, v["kind"] == "single")

    def rotates(v: dict, cfg: QuantConfig) -> bool:
        return switched_on(args.rotate, mptq_rotates, v, cfg)

    def token_scales(v: dict, cfg: QuantConfig) -> bool:
        return switched_on(args.token_scale, mptq_token_scales, v, cfg)

    def falls_back(v: dict, cfg: QuantConfig) -> bool:
        if args.uniform_fallback is not None:
            return args.uniform_fallback
        return not runs_mptq(v) or mptq_uniform_fallback(cfg)

    def with_recon(opts: MethodOptions, rotate: bool = False, token_scale: bool = False) -> MethodOptions:
        return replace(opts, recon_iters=args.recon_iters, recon_drop=args.recon_drop,
                       recon_max_bits=args.recon_max_bits, recon_ptf=not args.no_recon_ptf,
                       recon_wscale_max_bits=args.recon_wscale_max_bits,
                       optm_ptf=args.opt_m_ptf, optm_ptf_objective=args.opt_m_ptf_objective,
                       rotate=rotate, rotate_parts=tuple(args.rotate_parts.split(",")),
                       token_scale=token_scale,
                       gptq_max_bits=opts.gptq_max_bits if args.gptq_max_bits is None else args.gptq_max_bits)

    def token_shift(v: dict) -> bool:
        return args.token_shift and v["protocol"] == "full"

    def gelu_token_shift(v: dict, bits: int) -> bool:
        if args.gelu_token_shift is not None:
            return args.gelu_token_shift and v["protocol"] == "full"
        return runs_mptq(v) and mptq_gelu_token_shifts(QuantConfig(a_bits=bits, protocol=v["protocol"]))

    images = assets / "imagenet-sample"
    split = None if args.alt_split is None else alt_split(assets, args.alt_split)
    rows = []
    per_image: dict = {"images": {}, "rows": []}
    print(f"# MPTQ-ViT ablation, {platform.node()} ({os.cpu_count()} cores), torch {torch.__version__}, {date.today()}"
          + ("" if split is None else f"; second split (seed {args.alt_split}): {len(split[0])} calibration images "
             f"drawn from eval968, evaluation on the other {len(split[1])}"))
    print("| model | protocol | variant | top-1 | FP top-1 | drop | agreement % | KL | avg W | avg A | size MB | GBOPs | calib+search s | SE drop / agreement / KL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for short in args.models:
        loaded = load_model(short)
        t = loaded.entry.transform
        calib = load_calib32(assets, t) if split is None else load_calib_files(assets, t, split[0])
        built, meta = {}, {}
        for spec in args.variants:
            v = variants(spec)
            t0 = time.perf_counter()
            if v["kind"] == "single":
                cfg = QuantConfig(w_bits=v["bits"], a_bits=v["bits"], protocol=v["protocol"], observer="mse",
                                  seed=args.seed, residual_token_shift=token_shift(v),
                                  gelu_token_shift=gelu_token_shift(v, v["bits"]))
                rotated, scaled_tokens = rotates(v, cfg), token_scales(v, cfg)
                q = run_pipeline(loaded.model, calib, cfg, with_recon(METHODS[v["method"]], rotated, scaled_tokens)).model
                label = f"W{v['bits']}A{v['bits']} {v['method']}"
            else:
                b = v["budget"]
                # The base bits are where SQ-b searches alpha (once, for every bank): the budget's own width,
                # so that the greedy rows and the uniform rows at that width share the same smoothing.
                base = max(2, min(8, round(b)))
                cfg = QuantConfig(w_bits=base, a_bits=base, protocol=v["protocol"], observer="mse", seed=args.seed,
                                  residual_token_shift=token_shift(v), gelu_token_shift=gelu_token_shift(v, base))
                rotated, scaled_tokens = rotates(v, cfg), token_scales(v, cfg)
                opts = with_recon(MethodOptions(sq_b=True, opt_m=True, gptq=v["gptq"], recon=v["recon"]), rotated,
                                  scaled_tokens)
                fallback = falls_back(v, cfg)
                gptq_losses = (default_gptq_losses(args.mp_search, opts) if args.mp_gptq_losses is None
                               else args.mp_gptq_losses)
                try:
                    q, found = greedy_mp(loaded.model, calib, cfg, opts, Budget(b, b), n_probe=args.probe_images,
                                         w_candidates=w_cands, a_candidates=a_cands,
                                         progress=False, search=args.mp_search,
                                         uniform_fallback=fallback,
                                         gptq_losses=gptq_losses)
                except ConfigError as exc:  # report and go on: the other variants are still worth measuring
                    print(f"skipped {short} {spec}: {exc}", file=sys.stderr, flush=True)
                    continue
                print(f"stages of {short} {spec}: " + ", ".join(f"{k} {t:.0f}s" for k, t in found.timing.items()),
                      file=sys.stderr, flush=True)
                label = (f"Greedy MP {b:g}-bit (SQ-b, OPT-m{', GPTQ on <= 5-bit layers' if v['gptq'] else ''}"
                         f"{', recon' if opts.recon_applies(cfg) else ''}, "
                         f"{args.probe_images} probe images"
                         f", {args.mp_search} search"
                         f"{', GPTQ-aware W losses' if gptq_losses else ''}"
                         f"{'' if fallback else ', no uniform fallback'}"
                         + ("" if w_cands == a_cands == DEFAULT_CANDIDATES else
                            f", candidates W {args.w_candidates} A {args.a_candidates}") + ")")
                h = found.history[0] if found.history else {}
                if "kl_predicted" in h:  # the knapsack search
                    label += (f", probe KL: sum of isolated losses {h['kl_predicted']:.4f}, "
                              f"superposed logit errors {h['kl_superposed']:.4f}, found {found.kl_greedy:.4f}")
                fs = found.fallback_scores
                if found.uniform_fallback is not None:  # say so: the row is then a uniform model
                    label += (f", uniform {found.uniform_fallback}-bit won (probe KL {found.kl_final:.4f} "
                              f"vs {args.mp_search} {fs['searched']:.4f})")
            if rotated:
                label += ", Hadamard rotations" + ("" if args.rotate_parts == ",".join(MethodOptions.rotate_parts)
                                                   else f" ({args.rotate_parts})")
            if scaled_tokens:
                scaled = [m for m in q.modules() if getattr(m, TOKEN_SCALE_BUFFER, None) is not None]
                label += f", token scaling ({len(scaled)} layer{'' if len(scaled) == 1 else 's'} scaled)"
            if args.seed:
                label += f", seed {args.seed}"
            if split is not None:
                label += f", split {args.alt_split}"
            if args.opt_m_ptf != MethodOptions.optm_ptf:
                label += ", --no-opt-m-ptf" if not args.opt_m_ptf else ", --opt-m-ptf"
            if args.opt_m_ptf_objective != MethodOptions.optm_ptf_objective:
                label += f", PTF objective {args.opt_m_ptf_objective}"
            gelus = {id(g) for g, _ in adapter_for(q).gelu_inputs(q)}
            if token_shift(v):  # how many grids calibration shifted (0: the model without them exactly)
                n = sum(t.token_shift_or_none is not None and id(t) not in gelus for t in all_quantizers(q))
                label += f", token shifts ({n} grids shifted)"
            elif v["protocol"] == "full":
                label += ", --no-token-shift"
            if cfg.gelu_token_shift:
                n = sum(t.token_shift_or_none is not None for t in all_quantizers(q) if id(t) in gelus)
                label += f", GELU token shifts ({n} grids shifted)"
            key = f"{v['protocol']} {label}"
            built[key] = q
            meta[key] = dict(protocol=v["protocol"], variant=label, time_s=time.perf_counter() - t0)
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
