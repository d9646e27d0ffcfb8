"""The commands behind ``vitq`` (models, eval, export, cost, quantize): each takes the parsed arguments,
calls the API and prints. Imported only when a command runs, so ``vitq --help`` stays fast."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch

from .api import CostBudget, SearchOptions, base_widths, plan, run
from .artifact import ArtifactError, is_artifact, load_artifact, save_artifact
from .data import DataError, calibration_subset, load_tensors, make_dataset, make_loader, read_list
from .evaluation import evaluate, evaluate_many
from .hardware import estimate, extract_workloads, int8_baseline, load_hardware
from .io import dumps, is_output_json, output_json
from .methods.greedy_mp import Budget, plot_bits
from .methods.m2q import plot_m2q
from .methods.options import MethodOptions
from .methods.rotation import PARTS as ROTATION_PARTS
from .output import destination
from .quant.config import ConfigError, QuantConfig
from .quant.engine import tensor_table
from .report import build_report, format_table, sensitivity_csv, summary_line
from .zoo import ZOO, load_model


def cmd_models(args) -> int:
    print(f"{'name':<24} {'timm tag (pinned)':<46} {'family':<13} {'interp':<8} {'crop':>5}  mean/std")
    for e in ZOO.values():
        t = e.transform
        ms = "imagenet" if t.mean[0] == 0.485 else "0.5"
        print(f"{e.short:<24} {e.timm_name:<46} {e.family:<13} {t.interpolation:<8} {t.crop_pct:>5}  {ms}")
    return 0


def _is_vitq_export(path: Path) -> bool:
    from .export.onnx import is_vitq_onnx
    from .export.packed import is_packed

    return is_packed(path) or is_vitq_onnx(path)


def cmd_export(args) -> int:
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


def cmd_eval(args) -> int:
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


def cmd_quantize(args) -> int:
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
    planned = plan(config, recipe, budget, options, search, model=loaded.model)
    options, search, budget = planned.options, planned.search, planned.budget
    print(planned.describe(), flush=True)

    t0 = time.perf_counter()
    calib_images, _ = load_tensors(calib_ds, args.batch_size, args.workers)
    _print_skipped(calib_ds, "calibration")
    res = run(loaded.model, calib_images, planned, progress=True)
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


def cmd_cost(args) -> int:
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
