"""The ``vitq`` command line: ``models``, ``eval``, ``quantize``, ``cost``, ``export``.

Every problem with the input ends in one line ``vitq: error: ...`` naming the file, layer or option,
and a non-zero exit; results are written under temporary names and renamed when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from pathlib import Path

import torch

from .api import CostBudget, SearchOptions, base_widths, describe, plan, quantize
from .artifact import ArtifactError, is_artifact, load_artifact, save_artifact
from .data import DataError, calibration_subset, load_tensors, make_dataset, make_loader, read_list
from .evaluation import evaluate, evaluate_many
from .hardware import HardwareError, estimate, extract_workloads, int8_baseline, load_hardware
from .io import dumps, is_output_json, output_json
from .methods.greedy_mp import SEARCHES, Budget, plot_bits
from .methods.m2q import plot_m2q
from .methods.mp_budget import check_budget_reachable, check_budget_values
from .methods.mptq import MethodOptions
from .methods.optm import PTF_OBJECTIVES
from .methods.rotation import PARTS as ROTATION_PARTS
from .output import OutputError, Terminated, destination, raise_on_signals
from .quant.config import ConfigError, QuantConfig
from .quant.engine import tensor_table
from .report import build_report, format_table, sensitivity_csv, summary_line
from .zoo import ZOO, ZooError, load_model

USER_ERRORS = (ZooError, DataError, ConfigError, ArtifactError, HardwareError, OutputError, FileNotFoundError,
               ValueError)


def _cmd_models(args) -> int:
    print(f"{'name':<24} {'timm tag (pinned)':<46} {'family':<13} {'interp':<8} {'crop':>5}  mean/std")
    for e in ZOO.values():
        t = e.transform
        ms = "imagenet" if t.mean[0] == 0.485 else "0.5"
        print(f"{e.short:<24} {e.timm_name:<46} {e.family:<13} {t.interpolation:<8} {t.crop_pct:>5}  {ms}")
    return 0


def _add_data_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted in the report)")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier vitq result (anything else is never replaced)")


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="weights file (.safetensors, .pth, .pt); default: $VITQ_ASSETS/models")
    p.add_argument("--random-init", action="store_true", help="random weights (structure/cost work only)")


def _is_vitq_export(path: Path) -> bool:
    from .export.onnx import is_vitq_onnx
    from .export.packed import is_packed

    return is_packed(path) or is_vitq_onnx(path)


def _cmd_export(args) -> int:
    from .export.packed import export_packed

    if not is_artifact(args.model):
        raise ArtifactError(f"'{args.model}' is not a folder written by `vitq quantize` (no config.json)")
    common = dict(overwrite=args.overwrite, inputs=(args.model,))
    if args.format == "onnx":
        from .export.onnx import export_onnx
        from .zoo import get_entry

        log = f"{args.out}.json"
        with destination(args.out, kind="file", is_ours=_is_vitq_export, **common) as tmp, \
                destination(log, kind="file", is_ours=is_output_json, option="--out's log", **common) as tmp_log:
            model, meta = load_artifact(args.model)
            _say_random_init(meta, args.model)
            rep = export_onnx(model, get_entry(meta["model"]).transform.input_size, tmp, provenance=_provenance(meta))
            rep.path = str(args.out)
            tmp_log.write_text(dumps(output_json(rep.to_dict(), "onnx-export")))
        for row in rep.layers:
            kind = "integer" if row["integer"] else ("nbits" if row.get("matmul_nbits") else "float")
            print(f"{row['layer']:<48} {row['kind']:<7} {kind:<8} {row['reason']}")
        print(f"wrote {args.out}: {rep.n_integer}/{len(rep.layers)} layers run as integers in ONNX Runtime, "
              f"{len(rep.nbits_layers)} as weight-only MatMulNBits "
              f"({', '.join(f'{k} x{v}' for k, v in sorted(rep.integer_ops.items())) or 'none'}); "
              f"log: {log}")
        return 0
    with destination(args.out, kind="file", is_ours=_is_vitq_export, **common) as tmp:
        model, meta = load_artifact(args.model)
        _say_random_init(meta, args.model)
        keep = {k: meta[k] for k in ("model", "checkpoint", "random_init", "model_kwargs") if k in meta}
        sizes = export_packed(model, keep, tmp)
    print(f"wrote {args.out}: {sizes['file_bytes'] / 1e6:.3f} MB, {sizes['packed_tensors']} packed weight tensors; "
          f"fp32 parameters {sizes['fp32_bytes'] / 1e6:.3f} MB ({sizes['ratio']:.2f}x smaller)")
    return 0


def _provenance(meta: dict) -> dict[str, str]:
    """What an exported file says about where its weights came from."""
    return {"vitq_model": str(meta.get("model")), "vitq_checkpoint": str(meta.get("checkpoint")),
            "vitq_random_init": "true" if meta.get("random_init") else "false"}


def _say_random_init(meta: dict, source) -> None:
    if meta.get("random_init"):
        print(f"note: {source} holds RANDOM-INIT weights (structure, size and cost only; accuracy is meaningless)",
              flush=True)


def _cmd_eval(args) -> int:
    from .export.packed import is_packed, load_packed

    if is_packed(args.model):
        model, meta = load_packed(args.model)
        name, checkpoint, random_init = meta["model"], str(args.model), meta.get("random_init", False)
        from .zoo import get_entry

        entry = get_entry(meta["model"])
    elif is_artifact(args.model):
        model, meta = load_artifact(args.model)
        name, checkpoint, random_init = meta["model"], str(Path(args.model) / "model.safetensors"), meta.get("random_init", False)
        from .zoo import get_entry

        entry = get_entry(meta["model"])
    elif Path(args.model).is_dir():
        raise ArtifactError(f"'{args.model}' is a folder but not a vitq artifact (no config.json): give a folder "
                            "written by `vitq quantize`, a packed file or a model name")
    else:
        loaded = load_model(args.model, args.checkpoint, args.random_init)
        model, entry, checkpoint, random_init = loaded.model, loaded.entry, loaded.checkpoint, loaded.random_init
        name = entry.timm_name
    if random_init:
        _say_random_init({"random_init": True}, args.model)
    ds = make_dataset(args.data, entry.transform, args.list, args.limit, args.skip_bad_images)
    with _maybe_file(args.out, args.overwrite, (args.data, args.list, args.model)) as tmp:
        result = evaluate(model, make_loader(ds, args.batch_size, args.workers), name=name)
        result.checkpoint, result.random_init = checkpoint, random_init
        _print_skipped(ds, "evaluation")
        if tmp is not None:
            tmp.write_text(dumps(output_json(result.to_dict(), "eval")))
    print(result.summary())
    return 0


@contextlib.contextmanager
def _maybe_file(out, overwrite: bool, inputs):
    """A checked, locked temporary for an optional JSON ``--out`` file (None without one)."""
    if out is None:
        yield None
        return
    with destination(out, kind="file", overwrite=overwrite, inputs=inputs, is_ours=is_output_json) as tmp:
        yield tmp


def _config_from_args(args) -> QuantConfig:
    base = QuantConfig.load(args.config).to_dict() if args.config else {}
    # Command-line options given explicitly override the config file.
    for key in ("w_bits", "a_bits", "protocol", "observer", "mse_objective", "seed", "w_granularity", "w_scheme",
                "residual_token_shift", "gelu_token_shift"):
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    return QuantConfig.from_dict(base)  # __post_init__ turns rule dicts into LayerRule


def _cmd_quantize(args) -> int:
    inputs = (args.calib, args.eval, args.calib_list, args.eval_list, args.config, args.checkpoint, args.hw)
    with destination(args.out, kind="dir", overwrite=args.overwrite, inputs=inputs) as folder:
        report, calibrate_s, eval_s = _quantize(args, folder)
    print(summary_line(report))
    print(f"calibrate_s={calibrate_s:.1f} eval_s={eval_s:.1f} -> {Path(args.out) / 'report.json'}")
    return 0


def _on(flag: bool) -> bool | None:
    """A method switch given on the command line (True), or None: the recipe decides."""
    return True if flag else None


def _check_opt_m_flags(args, config: QuantConfig) -> None:
    """OPT-m's and the full protocol's flags need what they tune (checked before any work)."""
    opt_m = args.opt_m or (args.method or "mptq") == "mptq"
    if args.opt_m_ptf is not None and not opt_m:
        raise ConfigError("--opt-m-ptf is part of OPT-m's search: give it with --opt-m or --method mptq")
    if args.opt_m_ptf_objective is not None and not (opt_m and args.opt_m_ptf is not False):
        raise ConfigError(f"--opt-m-ptf-objective {args.opt_m_ptf_objective} sets OPT-m's PTF search: give it with "
                          "--opt-m or --method mptq, and without --no-opt-m-ptf")
    if args.residual_token_shift is not None and not (config.protocol == "full" and config.residual_ptf):
        flag = "--token-shift" if args.residual_token_shift else "--no-token-shift"
        raise ConfigError(f"{flag} sets the full protocol's residual-stream (PTF) grids: give it with --protocol full")
    if args.gelu_token_shift is not None and config.protocol != "full":
        flag = "--gelu-token-shift" if args.gelu_token_shift else "--no-gelu-token-shift"
        raise ConfigError(f"{flag} sets the full protocol's GELU-input grids: give it with --protocol full")


def _overlap(a, b) -> list[str]:
    """Files (as given in ``a``) that ``a`` and ``b`` both read."""
    other = {(b.root / f).resolve() for f in b.files}
    return [f for f in a.files if (a.root / f).resolve() in other]


def _print_skipped(ds, what: str) -> None:
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable {what} image(s): {', '.join(ds.skipped[:5])}"
              + (" ..." if len(ds.skipped) > 5 else ""), flush=True)


def _quantize(args, folder: Path) -> tuple[dict, float, float]:
    config = _config_from_args(args)
    torch.manual_seed(config.seed)
    if args.calib_size < 1:
        raise ConfigError(f"--calib-size must be at least 1, got {args.calib_size}")
    loaded = load_model(args.model, args.checkpoint, args.random_init)
    entry = loaded.entry
    eval_files = read_list(args.eval_list, args.eval) if args.eval_list else None
    if args.calib_list:
        calib_ds = make_dataset(args.calib, entry.transform, args.calib_list, skip_bad_images=args.skip_bad_images)
    else:
        exclude = eval_files if (eval_files and Path(args.calib).resolve() == Path(args.eval).resolve()) else []
        files = calibration_subset(args.calib, args.calib_size, config.seed, exclude)
        calib_ds = make_dataset(args.calib, entry.transform, files=files, skip_bad_images=args.skip_bad_images)
    eval_ds = make_dataset(args.eval, entry.transform, args.eval_list, args.limit, args.skip_bad_images)
    overlap = _overlap(calib_ds, eval_ds)
    if overlap and not args.allow_overlap:
        raise DataError(f"{len(overlap)} image(s) are in both the calibration and the evaluation set, first: "
                        f"{', '.join(overlap[:3])}; the evaluation would flatter the model (--allow-overlap to "
                        "run anyway)")
    print(f"vitq quantize {entry.timm_name}: protocol={config.protocol} W{config.w_bits}A{config.a_bits} "
          f"observer={config.observer} calib={len(calib_ds)} eval={len(eval_ds)} seed={config.seed}"
          + (" RANDOM-INIT" if loaded.random_init else ""), flush=True)
    if overlap:
        print(f"warning: {len(overlap)} calibration image(s) are also evaluated (--allow-overlap); the report "
              "says so", flush=True)

    if args.recon and args.no_recon:
        raise ConfigError("give only one of --recon and --no-recon")
    if args.gptq and args.no_gptq:
        raise ConfigError("give only one of --gptq and --no-gptq")
    if args.rotate is False and args.rotate_parts is not None:
        raise ConfigError("--rotate-parts chooses what --rotate searches: give it without --no-rotate")
    if args.method == "m2q" and (args.gptq or args.sq_b or args.opt_m or args.recon
                                 or args.rotate or args.rotate_parts or args.token_scale):
        raise ConfigError("--method m2q does not take --gptq, --sq-b, --opt-m, --recon, --rotate, "
                          "--rotate-parts or --token-scale")
    _check_opt_m_flags(args, config)
    options = MethodOptions(sq_b=_on(args.sq_b), opt_m=_on(args.opt_m), m_max=args.m_max,
                            optm_ptf=args.opt_m_ptf is not False,
                            optm_ptf_objective=args.opt_m_ptf_objective or MethodOptions.optm_ptf_objective,
                            sq_b_unnormed=args.sq_b_unnormed,
                            rotate=True if args.rotate is None and args.rotate_parts is not None else args.rotate,
                            rotate_parts=_rotate_parts(args.rotate_parts), token_scale=args.token_scale,
                            gptq=False if args.no_gptq else _on(args.gptq), gptq_max_bits=args.gptq_max_bits,
                            recon=False if args.no_recon else _on(args.recon), recon_iters=args.recon_iters,
                            recon_drop=args.recon_drop, recon_max_bits=args.recon_max_bits,
                            recon_ptf=not args.no_recon_ptf)
    cost = [(k, v) for k, v in (("edp", args.budget_edp), ("energy", args.budget_energy),
                                ("latency", args.budget_latency)) if v is not None]
    if len(cost) > 1:
        raise ConfigError("give only one of --budget-edp, --budget-energy, --budget-latency")
    if cost and args.method != "m2q":
        raise ConfigError(f"--budget-{cost[0][0]} needs --method m2q")
    bits_given = any(v is not None for v in (args.budget_w, args.budget_a, args.budget_mb, args.budget_gbops))
    recipe = args.method or "mptq"
    budget = None
    if cost or recipe == "m2q":
        metric, fraction = cost[0] if cost else ("edp", 1.0)
        budget = CostBudget(metric, fraction, load_hardware(args.hw))
    elif args.mixed or (recipe == "mptq" and bits_given):
        check_budget_values(w=args.budget_w, a=args.budget_a, mb=args.budget_mb, gbops=args.budget_gbops)
        budget = Budget(args.budget_w, args.budget_a, args.budget_mb, args.budget_gbops)
        if not args.config:
            base = {k: v for k, v in base_widths(budget).items() if getattr(args, k) is None}
            if base:
                config = dataclasses.replace(config, **base)
                print(f"base widths from the budget: W{config.w_bits}A{config.a_bits}", flush=True)
    elif bits_given:
        raise ConfigError("a bit or size budget (--budget-w/-a/-mb/-gbops) needs --mixed or --method mptq")
    search = SearchOptions(w_candidates=parse_bits_list(args.w_candidates) if args.w_candidates else None,
                           a_candidates=parse_bits_list(args.a_candidates) if args.a_candidates else None,
                           search=args.mp_search, probe_images=args.probe_images, lower_per_step=args.lower_per_step,
                           uniform_fallback=args.uniform_fallback, gptq_losses=args.mp_gptq_losses)
    config, options, search, budget = plan(config, recipe, budget, options, search)
    if isinstance(budget, Budget):
        check_budget_reachable(loaded.model, config, search.w_candidates, search.a_candidates,
                               w_bits=budget.w_bits, a_bits=budget.a_bits, size_mb=budget.size_mb)
    print(describe(config, options, budget), flush=True)

    t0 = time.perf_counter()
    calib_images, _ = load_tensors(calib_ds, args.batch_size, args.workers)
    _print_skipped(calib_ds, "calibration")
    res = quantize(loaded.model, calib_images, config, recipe, budget, options, search, progress=True)
    qmodel, config, extra = res.model, res.config, dict(res.report)
    extra.pop("recipe", None)
    extra.pop("methods", None)
    calibrate_s = time.perf_counter() - t0
    if not args.quiet:
        print(format_table(tensor_table(qmodel)))

    t1 = time.perf_counter()
    results = evaluate_many({"fp": loaded.model, "quantized": qmodel},
                            make_loader(eval_ds, args.batch_size, args.workers), reference="fp")
    eval_s = time.perf_counter() - t1
    _print_skipped(eval_ds, "evaluation")
    report = build_report(
        qmodel, model_name=entry.timm_name, checkpoint=loaded.checkpoint, random_init=loaded.random_init,
        fp=results["fp"], quantized=results["quantized"],
        timing={"calibrate_s": calibrate_s, "eval_s": eval_s, "calib_images": len(calib_images)},
        extra={"calib_files": calib_ds.files[:1000], "recipe": recipe, "methods": vars(options),
               "data": {"calib_images": len(calib_images), "calib_skipped": calib_ds.skipped,
                        "eval_skipped": eval_ds.skipped, "overlap_allowed": bool(args.allow_overlap),
                        "overlap_images": len(overlap), "overlap_files": overlap[:1000]},
               **extra},
    )

    def write(folder: Path) -> None:
        if "m2q" in extra:
            config.save(folder / "mixed_config.json")
            plot_m2q(extra["m2q"]["layers"], folder / "m2q.png", f"{entry.short}: M2Q")
        if isinstance(budget, Budget):
            config.save(folder / "mixed_config.json")
            plot_bits(extra["mixed"]["layers"], folder / "bits.png", f"{entry.short}: Greedy MP ({search.search} search) {vars(budget)}")
            if "sensitivity" in extra["mixed"]:
                (folder / "sensitivity.csv").write_text(sensitivity_csv(extra["mixed"]["sensitivity"]))
        save_artifact(qmodel, folder, {"model": entry.timm_name, "checkpoint": loaded.checkpoint,
                                       "random_init": loaded.random_init})
        (folder / "report.json").write_text(dumps(report))

    write(folder)
    return report, calibrate_s, eval_s


def _cmd_cost(args) -> int:
    with _maybe_file(args.out, args.overwrite, (args.model, args.hw, args.config, args.checkpoint)) as tmp:
        return _cost(args, tmp)


def _cost(args, tmp: Path | None) -> int:
    from .quant.engine import prepare

    hw = load_hardware(args.hw)
    if is_artifact(args.model):
        model, meta = load_artifact(args.model)
        from .zoo import get_entry

        entry, random_init = get_entry(meta["model"]), meta.get("random_init", False)
    else:
        loaded = load_model(args.model, args.checkpoint, args.random_init)
        model = prepare(loaded.model, _config_from_args(args))
        entry, random_init = loaded.entry, loaded.random_init
    workloads = extract_workloads(model, entry.transform.input_size)
    report = estimate(workloads, hw)
    base = estimate(int8_baseline(workloads), hw)
    print(f"vitq cost {entry.timm_name} on {args.hw or 'the default accelerator'} (schedule={hw.schedule})"
          + ("  [random-init weights: structure and cost only]" if random_init else ""))
    print(f"{'layer':<44} {'op':<7} {'engine':<6} {'scheme':<8} {'W':>2} {'A':>2} {'MMACs':>9} "
          f"{'energy uJ':>10} {'latency us':>10} {'EDP %':>6}")
    for c in report.layers:
        w = "-" if c.op in ("matmul", "div") else c.w_bits
        a = "-" if c.op == "div" else c.a_bits
        print(f"{c.name:<44} {c.op:<7} {c.engine:<6} {c.scheme:<8} {w:>2} {a:>2} {c.macs / 1e6:>9.2f} "
              f"{c.energy_j * 1e6:>10.2f} {c.latency_s * 1e6:>10.2f} {100 * c.edp_share:>6.2f}")
    saving = 1 - report.edp / base.edp
    print(f"total: {report.to_dict()['macs'] / 1e9:.3f} GMACs, energy {report.energy_j * 1e3:.4f} mJ, "
          f"latency {report.latency_s * 1e3:.4f} ms, EDP {report.edp:.4e} J*s; INT8 baseline EDP {base.edp:.4e}; "
          f"edp_saving {saving:.4f}")
    if tmp is not None:
        out = {"model": entry.timm_name, "random_init": random_init, "hardware": hw.to_dict(), **report.to_dict(),
               "baseline": {k: v for k, v in base.to_dict().items() if k != "layers"}, "edp_saving": saving}
        if random_init:
            out["warning"] = "random-init weights: structure and cost are real, accuracy is not measured"
        tmp.write_text(dumps(output_json(out, "cost")))
    return 0


def parse_bits_list(text: str) -> tuple[int, ...]:
    """Candidate bit-widths from ``--w-candidates`` / ``--a-candidates`` text such as ``"4,5,6,8"``.

    Raises:
        ConfigError: the text is not a comma-separated list of integers.
    """
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"candidate bits must be a comma-separated list of integers, got '{text}'") from None


def _rotate_parts(text: str | None) -> tuple[str, ...]:
    if text is None:
        return MethodOptions.rotate_parts
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in ROTATION_PARTS]
    if bad or not parts:
        raise ConfigError(f"--rotate-parts takes a comma-separated list of {', '.join(ROTATION_PARTS)}; got '{text}'")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the supported models").set_defaults(func=_cmd_models)

    p = sub.add_parser("eval", help="evaluate a model or a quantized artifact folder")
    p.add_argument("model", help="zoo name, timm name, a folder written by `vitq quantize`, or a packed file")
    _add_model_opts(p)
    p.add_argument("--data", required=True, help="image folder (synset sub-folders, or flat synset-prefixed files)")
    p.add_argument("--list", help="file list, one path relative to --data per line")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--out", help="write the result as JSON (a new file, or an earlier result with --overwrite)")
    _add_overwrite(p)
    _add_data_opts(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("export", help="write a quantized folder as a packed integer artifact")
    p.add_argument("model", help="a folder written by `vitq quantize`")
    p.add_argument("--format", choices=["vitq", "onnx"], default="vitq",
                   help="vitq: one safetensors file, weights as bit-packed integer codes; "
                        "onnx: QDQ model with vitq's scales for ONNX Runtime's integer kernels")
    p.add_argument("--out", required=True, help="output file (.safetensors or .onnx; a new file, or an earlier "
                                                "export with --overwrite)")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("cost", help="energy, latency and EDP on the modelled accelerator, per layer")
    p.add_argument("model", help="zoo name, timm name, or a folder written by `vitq quantize`")
    _add_model_opts(p)
    p.add_argument("--hw", help="accelerator YAML merged over the defaults (vitq/hardware/accelerator.yaml)")
    p.add_argument("--baseline", choices=["int8"], default="int8", help="reference for edp_saving")
    p.add_argument("--w-bits", type=int, default=None)
    p.add_argument("--a-bits", type=int, default=None)
    p.add_argument("--w-scheme", choices=["uniform", "pot"])
    p.add_argument("--config", help="QuantConfig JSON (per-layer bits and schemes), e.g. a mixed_config.json")
    p.add_argument("--out", help="write the cost report as JSON (a new file, or an earlier one with --overwrite)")
    _add_overwrite(p)
    p.set_defaults(func=_cmd_cost, protocol=None, observer=None, mse_objective=None, seed=None, w_granularity=None)

    p = sub.add_parser("quantize", help="calibrate, quantize and evaluate against the FP model")
    p.add_argument("model")
    _add_model_opts(p)
    p.add_argument("--calib", required=True, help="calibration image folder")
    p.add_argument("--calib-list", help="calibration file list (default: a seeded random subset not in --eval-list)")
    p.add_argument("--calib-size", type=int, default=32, help="images in the random calibration subset")
    p.add_argument("--eval", required=True, help="evaluation image folder")
    p.add_argument("--eval-list", help="evaluation file list")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--protocol", choices=["standard", "full"])
    p.add_argument("--observer", choices=["minmax", "percentile", "mse"])
    p.add_argument("--mse-objective", choices=["tensor", "output"])
    p.add_argument("--w-granularity", choices=["per_tensor", "per_channel", "per_group"])
    p.add_argument("--w-scheme", choices=["uniform", "pot"])
    p.add_argument("--token-shift", dest="residual_token_shift", action=argparse.BooleanOptionalAction,
                   help="full protocol: the residual stream's PTF grids also get a static power-of-two factor per "
                        "token position (QuantConfig.residual_token_shift; on by default since rule R20, "
                        "docs/methods.md; --no-token-shift turns it off)")
    p.add_argument("--gelu-token-shift", dest="gelu_token_shift", action=argparse.BooleanOptionalAction,
                   help="full protocol: each GELU input's grid also gets a static power-of-two factor per token "
                        "position (QuantConfig.gelu_token_shift; on by default with --method mptq in the full "
                        "protocol since rules R33 and R47, together with --token-scale, docs/methods.md)")
    p.add_argument("--config", help="QuantConfig JSON (per-layer rules); explicit options override it")
    p.add_argument("--seed", type=int)
    p.add_argument("--method", choices=["minmax", "mptq", "m2q"],
                   help="the recipe (default mptq): mptq = SQ-b, rotation, token scaling, OPT-m, GPTQ and block "
                        "reconstruction, plus Greedy MP when a budget is given; minmax = the engine alone (a "
                        "baseline; --sq-b, --opt-m, --gptq, --recon add single methods); m2q = M2-ViT's scheme "
                        "(uniform/PoT) and precision search under a cost budget")
    p.add_argument("--sq-b", action="store_true", help="SmoothQuant with bias shift, folded into LayerNorm")
    p.add_argument("--sq-b-unnormed", action="store_true",
                   help="SQ-b also on proj/fc2 as an explicit per-channel shift and scale (costs a per-channel "
                        "subtract and multiply at inference)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="Hadamard rotations of fc2's input (online, n log n adds per token), of v/proj and of q/k "
                        "(folded into qkv and proj), kept per layer where they lower its quantized output error "
                        "(vitq's addition, docs/methods.md). Default: on with --method mptq in the standard protocol at "
                        "<= 6 activation bits, single precision (rule R30) or with a budget or --config at base "
                        "widths <= 6 (rule R37), and with a budget or --config in the full protocol at base widths "
                        "<= 5 (rule R38); off otherwise; --no-rotate turns it off")
    p.add_argument("--rotate-parts", default=None,
                   help="with --rotate (implied): which rotations are searched, comma-separated of fc2, v (v/proj) "
                        "and qk (q and k per head, folded into qkv); default fc2,v,qk")
    p.add_argument("--token-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="static power-of-two factors on the token positions of fc2's input whose values are massive "
                        "(ViT-Tiny's corner patches in block 7; one accumulator shift per such row), kept where they "
                        "lower its quantized output error (vitq's addition, docs/methods.md). Default: on with "
                        "--method mptq in the standard protocol at <= 6 activation bits, single precision (rule R31) "
                        "or with a budget or --config (rule R37), and in the full protocol wherever the GELU inputs "
                        "have token shifts (rule R33); off otherwise; --no-token-scale turns it off")
    p.add_argument("--opt-m", action="store_true", help="two-region quantizer search for post-GELU/softmax")
    p.add_argument("--m-max", type=int, default=None,
                   help="largest OPT-m ratio exponent (default: max(4, bits-1) per tensor)")
    p.add_argument("--opt-m-ptf", action=argparse.BooleanOptionalAction, default=None,
                   help="full protocol: OPT-m also searches the residual stream's PTF steps, objective set by "
                        "--opt-m-ptf-objective (default: on with OPT-m; --no-opt-m-ptf keeps per-channel min-max); "
                        "docs/methods.md")
    p.add_argument("--opt-m-ptf-objective", choices=list(PTF_OBJECTIVES), default=None,
                   help="what the PTF search minimizes: normalized (default: each token's error over the residual "
                        "stream's variance there, as the next LayerNorm sees it) or tensor (the grid's own squared "
                        "error, the default before session 12); docs/methods.md")
    p.add_argument("--gptq", action="store_true",
                   help="GPTQ weight rounding after calibration (vitq's addition to MPTQ-ViT; on with --method mptq)")
    p.add_argument("--no-gptq", action="store_true", help="--method mptq without GPTQ (the paper's methods only)")
    p.add_argument("--gptq-max-bits", type=int, default=5,
                   help="GPTQ re-rounds layers with at most this many weight bits; wider ones keep "
                        "round-to-nearest (default 5, see docs/methods.md)")
    p.add_argument("--recon", action="store_true",
                   help="block reconstruction of step sizes after GPTQ, at <= --recon-max-bits activation "
                        "bits (vitq's addition; on with --method mptq)")
    p.add_argument("--no-recon", action="store_true", help="--method mptq without block reconstruction")
    p.add_argument("--recon-iters", type=int, default=MethodOptions.recon_iters,
                   help=f"Adam steps per reconstruction stage (default {MethodOptions.recon_iters})")
    p.add_argument("--recon-drop", type=float, default=MethodOptions.recon_drop,
                   help="QDrop probability during reconstruction: each activation element stays float with "
                        f"this probability (default {MethodOptions.recon_drop}; docs/methods.md)")
    p.add_argument("--recon-max-bits", type=int, default=MethodOptions.recon_max_bits,
                   help="reconstruction runs when the default activation width is at most this "
                        f"(default {MethodOptions.recon_max_bits})")
    p.add_argument("--no-recon-ptf", action="store_true",
                   help="reconstruction keeps the PTF grids' steps (full protocol's residual stream)")
    p.add_argument("--mixed", action="store_true", help="Greedy MP mixed precision (needs a budget)")
    p.add_argument("--budget-w", type=float, help="target average weight bits")
    p.add_argument("--budget-a", type=float, help="target average activation bits")
    p.add_argument("--budget-mb", type=float, help="target model size in MB")
    p.add_argument("--budget-gbops", type=float, help="target GBOPs per image (MACs x W bits x A bits)")
    p.add_argument("--probe-images", type=int,
                   help="calibration images used to measure sensitivities (default 16 for the knapsack search, "
                        "8 for the greedy loop and m2q)")
    p.add_argument("--lower-per-step", type=int, default=4, help="items Greedy MP lowers before each re-run")
    p.add_argument("--mp-search", choices=list(SEARCHES),
                   help="how the mixed-precision assignment is searched: a knapsack on each tensor's measured loss "
                        "alone (default for bit and MB budgets), the paper's greedy loop (default for "
                        "--budget-gbops); docs/methods.md")
    p.add_argument("--budget-edp", type=float, help="m2q: at most this fraction of the INT8 baseline's EDP")
    p.add_argument("--budget-energy", type=float, help="m2q: at most this fraction of the INT8 baseline's energy")
    p.add_argument("--budget-latency", type=float, help="m2q: at most this fraction of the INT8 baseline's latency")
    p.add_argument("--hw", help="m2q: accelerator YAML merged over the defaults")
    p.add_argument("--w-candidates", help="candidate weight bits (default 4,5,6,8; m2q 4,8)")
    p.add_argument("--a-candidates", help="candidate activation bits (default 4,5,6,8; m2q 8)")
    p.add_argument("--mp-gptq-losses", action=argparse.BooleanOptionalAction, default=None,
                   help="knapsack search with GPTQ: measure each weight's loss at <= --gptq-max-bits "
                        "with the weights GPTQ would give it, not round-to-nearest (default: on where it applies, "
                        "rules R16/R17 in docs/methods.md; --no-mp-gptq-losses for round-to-nearest losses)")
    p.add_argument("--uniform-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="after the search, return a single width meeting the budget instead when it scores a lower "
                        "probe KL. Default: off with --method mptq at base widths <= 6 in the standard protocol "
                        "(rule R37) and <= 5 in the full (rule R38), on otherwise; --no-uniform-fallback keeps the searched assignment")
    p.add_argument("--out", required=True, help="output folder: report.json, model.safetensors, config.json; a new "
                                                "path, or an earlier vitq result with --overwrite")
    _add_overwrite(p)
    p.add_argument("--allow-overlap", action="store_true",
                   help="run even when calibration and evaluation images overlap (the report says so)")
    p.add_argument("--quiet", action="store_true", help="do not print the per-tensor table")
    _add_data_opts(p)
    p.set_defaults(func=_cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the API reports through the "vitq" logger; on the command line its messages are ordinary output
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("vitq")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        with raise_on_signals():
            return args.func(args)
    except USER_ERRORS as exc:
        _close_bars()
        print(f"vitq: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        print("vitq: interrupted; no partial output was written", file=sys.stderr)
        return 130
    except Terminated as exc:
        _close_bars()
        print(f"vitq: stopped by {exc}; no partial output was written", file=sys.stderr)
        return 143
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _close_bars() -> None:
    """Clear progress bars an error left open, so the error starts its own line on a terminal."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
