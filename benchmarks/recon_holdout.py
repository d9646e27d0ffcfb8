"""Choose block-reconstruction settings on held-out *calibration* images (never the evaluation images).

calib32 is split into folds of 8 images (a fixed seeded permutation). For each fold, the whole `--method
mptq` pipeline without reconstruction (SQ-b, OPT-m, GPTQ) runs on the other 24 images; then each
setting's block reconstruction runs on the same 24 images, and the quantized model is compared with the
float model on the 8 held-out images (mean KL of the logits, top-1 agreement) and on the 24 it was fitted
on (to show over-fitting). Figures are averaged over the folds.

    python benchmarks/recon_holdout.py --models deit_tiny vit_tiny --bits 4 \\
        --settings none iters=50,drop=0 iters=50,drop=0.5 iters=100,drop=0.5

A setting is ``none`` (no reconstruction) or comma-separated ``key=value`` pairs: the keys of ``KEYS`` below
set ``apply_block_recon``'s arguments, those of ``PIPELINE_KEYS`` the MethodOptions field (or, with ``cfg:``,
the QuantConfig field) named there, i.e. the pipeline before reconstruction; settings that share their
pipeline keys share one pipeline run per fold.

Paired per-image comparison (session 20): a fold's mean over 8 images can be decided by one image (docs/results.md,
R26). ``--per-image FILE`` saves every held-out image's KL per setting (JSON, keyed by the image's index in
calib32); with two or more settings, or with ``--paired-with FILE`` (a file saved by an earlier run with the same
``--bits``, ``--protocol``, ``--methods``, ``--seed`` and folds), every setting is also compared image by image
with a reference setting (the run's first, or the file's ``--paired-reference``): on how many held-out images
its KL is lower, and the median of the per-image KL ratios.

    python benchmarks/recon_holdout.py --models deit_tiny --bits 6 --settings iters=50 --per-image runs/base6.json
    python benchmarks/recon_holdout.py --models deit_tiny --bits 6 --settings iters=50,rot=1 \
        --paired-with runs/base6.json --paired-reference iters=50
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from vitq.data import load_tensors, make_dataset
from vitq.evaluation import evaluate, kl_from_reference
from vitq.io import atomic_write_json
import vitq
from vitq.methods.mptq import MethodOptions
from vitq.methods.recon import apply_block_recon
from vitq.quant import QuantConfig
from vitq.recipes import mptq_gelu_token_shifts, mptq_rotates, mptq_token_scales
from vitq.zoo import load_model

# setting key -> (apply_block_recon argument, type); keys left out keep apply_block_recon's defaults
KEYS = {"iters": ("iters", int), "lr": ("lr", float), "drop": ("drop_prob", float), "batch": ("batch", int)}
# setting key -> (MethodOptions field, type): these change the pipeline that runs before reconstruction
PIPELINE_KEYS = {"mmax": ("m_max", int),
                 "tokshift": ("cfg:residual_token_shift", lambda v: bool(int(v))),
                 "gptqmax": ("gptq_max_bits", int),
                 "rot": ("rotate", lambda v: bool(int(v))),
                 "rotparts": ("rotate_parts", lambda v: tuple(v.split("+"))),
                 "ts": ("token_scale", lambda v: bool(int(v))),
                 "gts": ("cfg:gelu_token_shift", lambda v: bool(int(v)))}
# "cfg:" marks a QuantConfig field rather than a MethodOptions one


def pipeline_run(model, fit, cfg: QuantConfig, opts: MethodOptions, pipe: tuple):
    """The pipeline before reconstruction with a setting's pipeline keys applied."""
    over_cfg = {k[4:]: v for k, v in pipe if k.startswith("cfg:")}
    over_opts = {k: v for k, v in pipe if not k.startswith("cfg:")}
    return vitq.quantize(model, fit, replace(cfg, **over_cfg), recipe="minmax", options=replace(opts, **over_opts), progress=False).model


def parse_setting(text: str) -> tuple[tuple, dict | None]:
    """``(pipeline options as sorted (field, value) pairs, apply_block_recon kwargs or None)``."""
    if text == "none":
        return (), None
    out, pipe = {}, {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        table = PIPELINE_KEYS if key in PIPELINE_KEYS else KEYS
        if key not in table or not value:
            raise SystemExit(f"bad setting {text!r}: expected 'none' or key=value pairs with keys "
                             f"{sorted(KEYS) + sorted(PIPELINE_KEYS)}")
        arg, kind = table[key]
        try:
            (pipe if table is PIPELINE_KEYS else out)[arg] = kind(value)
        except ValueError:
            raise SystemExit(f"bad setting {text!r}: {key} must be {getattr(kind, '__name__', 'bool')}, "
                             f"got {value!r}") from None
    return tuple(sorted(pipe.items())), (out or None)


def _scores(model, fp_model, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean KL from FP and top-1 agreement (%), as vitq.evaluate defines them."""
    r = evaluate(model, (images, labels), reference=fp_model, progress=False)
    return r.kl, r.agreement


@torch.inference_mode()
def _image_kls(model, fp_model, images: torch.Tensor) -> list[float]:
    """Each image's KL from FP (the per-image terms of the mean that ``_scores`` reports)."""
    return kl_from_reference(fp_model(images), model(images)).tolist()


def _paired(kls: dict[int, float], ref: dict[int, float]) -> tuple[int, int, float]:
    """(images compared, images with a lower KL than the reference, median per-image KL ratio)."""
    common = sorted(set(kls) & set(ref))
    lower = sum(kls[i] < ref[i] for i in common)
    ratio = statistics.median(kls[i] / max(ref[i], 1e-12) for i in common) if common else float("nan")
    return len(common), lower, ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["deit_tiny", "vit_tiny"])
    ap.add_argument("--assets", default=os.environ.get("VITQ_ASSETS", "../shared/assets"))
    ap.add_argument("--bits", type=int, default=4, help="W and A bits")
    ap.add_argument("--protocol", choices=["standard", "full"], default="standard")
    ap.add_argument("--settings", nargs="+", default=["none", "iters=50,drop=0", "iters=50,drop=0.5"])
    ap.add_argument("--folds", type=int, default=4, help="how many of the 4 folds of 8 images to run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", choices=["mptq", "none"], default="mptq",
                    help="the pipeline before reconstruction: SQ-b, OPT-m and GPTQ (mptq), or calibration only "
                         "(none: the engine's plain grids, e.g. to see an option without OPT-m's searches)")
    ap.add_argument("--per-image", help="save each held-out image's KL per setting to this JSON file")
    ap.add_argument("--paired-with", help="a --per-image file of an earlier run to compare with image by image")
    ap.add_argument("--paired-reference", help="the setting of --paired-with to compare with (default: its first)")
    args = ap.parse_args()
    settings = [(s, parse_setting(s)) for s in args.settings]
    run_key = {"bits": args.bits, "protocol": args.protocol, "methods": args.methods, "seed": args.seed,
               "folds": args.folds}
    earlier = None
    if args.paired_with:
        try:
            earlier = json.loads(Path(args.paired_with).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"--paired-with {args.paired_with}: cannot read a --per-image file ({exc})") from None
        if earlier.get("run") != run_key:
            raise SystemExit(f"--paired-with {args.paired_with}: its run {earlier.get('run')} differs from this one "
                             f"{run_key}; per-image KLs are comparable only for the same bits, protocol, methods, "
                             "seed and folds")
        # checked before the run, so a wrong file or reference fails now, not silently after an hour
        for name in args.models:
            theirs = earlier.get("models", {}).get(name, {})
            ref_name = args.paired_reference or next(iter(theirs), None)
            if ref_name not in theirs:
                raise SystemExit(f"--paired-with {args.paired_with}: no per-image KLs of setting {ref_name!r} for "
                                 f"model {name} (it has {sorted(theirs)})")
    elif args.paired_reference:
        raise SystemExit("--paired-reference names a setting of --paired-with: give both")
    per_image: dict[str, dict[str, dict[int, float]]] = {}
    assets = Path(args.assets)
    cfg = QuantConfig(w_bits=args.bits, a_bits=args.bits, observer="mse", protocol=args.protocol)
    if args.methods == "mptq":  # rules R33, R47: the full protocol's GELU inputs get token shifts
        cfg = replace(cfg, gelu_token_shift=mptq_gelu_token_shifts(cfg))
    # --method mptq's pipeline, including its default rotation (rule R30: standard protocol, <= 6 bits) and token
    # scaling (rule R31, same scope; rule R33: with the GELU token shifts); the setting keys rot=0, ts=0 and
    # gts=0 give the pipeline as it was before them
    opts = (MethodOptions(sq_b=True, opt_m=True, gptq=True, recon=False, rotate=mptq_rotates(cfg),
                          token_scale=mptq_token_scales(cfg))
            if args.methods == "mptq" else MethodOptions(recon=False))
    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        loaded = load_model(name)
        calib, labels = load_tensors(make_dataset(assets / "imagenet-sample", loaded.entry.transform,
                                             assets / "calib32.txt"))
        perm = torch.randperm(len(calib), generator=torch.Generator().manual_seed(args.seed))
        folds = perm.reshape(-1, 8)[: args.folds]
        sums = {s: [0.0, 0.0, 0.0, 0.0, 0.0] for s, _ in settings}  # held KL, held agr, fit KL, fit agr, s
        for k, held_idx in enumerate(folds):
            fit_idx = perm[~torch.isin(perm, held_idx)]
            fit, held = calib[fit_idx], calib[held_idx]
            bases = {pipe: pipeline_run(loaded.model, fit, cfg, opts, pipe)
                     for pipe in dict.fromkeys(p for _, (p, _) in settings)}
            for text, (pipe, setting) in settings:
                q = copy.deepcopy(bases[pipe])
                t = time.perf_counter()
                if setting is not None:
                    apply_block_recon(q, loaded.model, fit, seed=args.seed, progress=False, **setting)
                secs = time.perf_counter() - t
                hk, ha = _scores(q, loaded.model, held, labels[held_idx])
                per_image.setdefault(name, {}).setdefault(text, {}).update(
                    zip(held_idx.tolist(), _image_kls(q, loaded.model, held)))
                fk, fa = _scores(q, loaded.model, fit, labels[fit_idx])
                print(f"{name} fold {k} {text}: held KL {hk:.4f} agr {ha:.1f} | fit KL {fk:.4f} agr {fa:.1f} "
                      f"| {secs:.0f} s", flush=True)
                for i, v in enumerate((hk, ha, fk, fa, secs)):
                    sums[text][i] += v / len(folds)
        for text, _ in settings:
            rows.append((name, text, *sums[text]))
    print(f"\n# W{args.bits}A{args.bits} {args.protocol}, {args.methods} pipeline, reconstruction settings; mean over "
          f"{args.folds} fold(s): fitted on 24 calibration images, scored on the other 8")
    print("| model | setting | held-out KL | held-out agreement | fitted KL | fitted agreement | recon s |")
    print("|---|---|---|---|---|---|---|")
    for name, text, hk, ha, fk, fa, secs in rows:
        print(f"| {name} | {text} | {hk:.4f} | {ha:.1f} % | {fk:.4f} | {fa:.1f} % | {secs:.0f} |")
    pairs = []  # (model, setting, reference label, its per-image KLs, the reference's per-image KLs)
    for name, by_setting in per_image.items():
        first = next(iter(by_setting))  # this run's reference: its first setting
        for text, kls in by_setting.items():
            if earlier is not None:
                theirs = earlier["models"].get(name, {})
                ref_name = args.paired_reference or next(iter(theirs))  # present: checked before the run
                pairs.append((name, text, f"{ref_name} ({args.paired_with})", kls,
                              {int(i): v for i, v in theirs[ref_name].items()}))
            if text != first:
                pairs.append((name, text, first, kls, by_setting[first]))
    if pairs:
        print("\n# paired, image by image, on the held-out images")
        print("| model | setting | reference | images | lower KL than the reference | median KL ratio |")
        print("|---|---|---|---|---|---|")
        for name, text, ref_label, kls, ref in pairs:
            n, lower, ratio = _paired(kls, ref)
            print(f"| {name} | {text} | {ref_label} | {n} | {lower} | {ratio:.3f} |")
    if args.per_image:
        atomic_write_json(args.per_image, {"run": run_key, "models": per_image})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
