"""The commands behind ``vitq`` (models, eval, export, cost, quantize): each takes the parsed arguments,
calls the API and prints. Imported only when a command runs, so ``vitq --help`` stays fast."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from . import distributed
from .api import run
from .artifact import ArtifactError, is_artifact, load_artifact, save_artifact
from .data import DataError, calibration_subset, load_tensors, make_dataset, make_loader, read_list, scan_folder
from .device import resolve_device, to_device
from .evaluation import evaluate, evaluate_many
from .hardware import estimate, extract_workloads, int8_baseline, load_hardware
from .io import dumps, is_output_json, output_json
from .methods.greedy_mp import Budget
from .output import destination
from .quant.config import ConfigError, QuantConfig
from .quant.engine import tensor_table
from .report import build_report, format_table, sensitivity_csv, summary_line
from .report_html import write_html
from .settings import Settings, dump, plan_to_dict
from .zoo import ZOO, load_model

log = logging.getLogger("vitq")


def cmd_models(args) -> int:
    print(f"{'name':<24} {'timm tag (pinned)':<46} {'family':<13} {'interp':<8} {'crop':>5}  mean/std")
    for e in ZOO.values():
        t = e.transform
        ms = "imagenet" if t.mean[0] == 0.485 else "0.5"
        print(f"{e.short:<24} {e.timm_name:<46} {e.family:<13} {t.interpolation:<8} {t.crop_pct:>5}  {ms}")
    print("Any other timm model of a supported family works by its timm name (vitq models --coverage).")
    if args.coverage:
        from .coverage import coverage_table

        print()
        print(coverage_table())
    return 0


def _is_vitq_export(path: Path) -> bool:
    from .export.onnx import is_vitq_onnx
    from .export.packed import is_packed
    from .export.pt2e import is_vitq_pt2e

    return is_packed(path) or is_vitq_onnx(path) or is_vitq_pt2e(path)


def _export_file(args, common: dict, kind: str, write):
    """Load the artifact and its check images (before anything is written: a bad ``--data`` fails here), then
    ``write(model, input_size, tmp, provenance, check)`` the file and its ``.json`` log atomically; prints
    what the check found. Returns the exporter's report."""
    from .zoo import get_entry

    log = f"{args.out}.json"
    model, meta = load_artifact(args.model)
    entry = get_entry(meta["model"])
    check = _check_images(args, entry)
    with destination(args.out, kind="file", is_ours=_is_vitq_export, **common) as tmp, \
            destination(log, kind="file", is_ours=is_output_json, option="--out's log", **common) as tmp_log:
        _say_random_init(meta, args.model)
        rep = write(model, entry.transform.input_size, tmp, _provenance(meta), check)
        rep.path = str(args.out)
        tmp_log.write_text(dumps(output_json(rep.to_dict(), f"{kind}-export")))
    return rep


def _say_check(check: dict | None, what: str) -> None:
    if check:
        print(f"check: {what} agrees with the scored model on {check['agreement']:.2f} % of {check['images']} "
              f"images (top-1; largest logit difference {check['max_logit_diff']:.3g})")
    else:
        print("check: no images (the artifact's calibration folder is gone; give --data)")


def _export_pt2e(args, common: dict) -> int:
    from .export.pt2e import export_pt2e

    if getattr(args, "allow_approx", False) or getattr(args, "target", "ort") != "ort":
        raise ConfigError("--target and --allow-approx are for --format onnx; a pt2e program is always exact")

    def write(model, size, tmp, provenance, check):
        print("tracing, compiling (about a minute for DeiT-Tiny) and checking the program ...", flush=True)
        return export_pt2e(model, size, tmp, provenance=provenance, check_images=check)

    rep = _export_file(args, common, "pt2e", write)
    kernels = (f"{rep.int8_linear + rep.int8_conv}/{rep.layers} GEMMs and convolutions run as oneDNN int8 kernels "
               f"under torch.compile" if rep.compiled else
               "not compiled: the x86 int8 passes need torchao (pip install 'vitq[pt2e]')")
    print(f"wrote {args.out} ({rep.file_bytes / 1e6:.2f} MB): {kernels}; log: {args.out}.json")
    if rep.simulated:
        print(f"{len(rep.simulated)} quantizer(s) with no QDQ form run the simulation's float operations: "
              f"{', '.join(rep.simulated[:5])}{' ...' if len(rep.simulated) > 5 else ''}")
    _say_check(rep.check, "the program")
    return 0


def cmd_export(args) -> int:
    from .export.packed import export_packed

    if not is_artifact(args.model):
        raise ArtifactError(f"'{args.model}' is not a folder written by `vitq quantize` (no config.json)")
    common = dict(overwrite=args.overwrite, inputs=(args.model, getattr(args, "data", None), getattr(args, "list", None)))
    if args.format == "pt2e":
        return _export_pt2e(args, common)
    if args.format == "onnx":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"--format onnx needs {' and '.join(missing)}: pip install 'vitq[onnx]' (or "
                              "onnxruntime-gpu beside onnx)")
        from .export.onnx import export_onnx

        rep = _export_file(args, common, "onnx", lambda model, size, tmp, provenance, check: export_onnx(
            model, size, tmp, provenance=provenance, target=args.target, allow_approx=args.allow_approx,
            check_images=check))
        for row in rep.layers:
            kind = "integer" if row["integer"] else ("nbits" if row.get("matmul_nbits") else "float")
            print(f"{row['layer']:<48} {row['kind']:<7} {kind:<8} {'' if row['exact'] else 'APPROXIMATE '}"
                  f"{row['reason']}")
        print(f"wrote {args.out} ({rep.file_bytes / 1e6:.2f} MB, target {rep.target}): {rep.n_integer}/{len(rep.layers)} "
              f"layers run as integers in ONNX Runtime, {len(rep.nbits_layers)} as weight-only MatMulNBits "
              f"({', '.join(f'{k} x{v}' for k, v in sorted(rep.integer_ops.items())) or 'none'}); log: {args.out}.json")
        if rep.approximate:
            print(f"APPROXIMATE: {len(rep.approximate)} quantizer(s) written in float (--allow-approx): "
                  f"{', '.join(rep.approximate[:5])}{' ...' if len(rep.approximate) > 5 else ''}")
        _say_check(rep.check, "the file")
        return 0
    with destination(args.out, kind="file", is_ours=_is_vitq_export, **common) as tmp:
        model, meta = load_artifact(args.model)
        _say_random_init(meta, args.model)
        keep = {k: meta[k] for k in ("model", "checkpoint", "random_init", "model_kwargs") if k in meta}
        sizes = export_packed(model, keep, tmp)
    print(f"wrote {args.out}: {sizes['file_bytes'] / 1e6:.3f} MB, {sizes['packed_tensors']} packed weight tensors; "
          f"fp32 parameters {sizes['fp32_bytes'] / 1e6:.3f} MB ({sizes['ratio']:.2f}x smaller)")
    return 0


def _exported_model(path):
    """An ONNX file (run by ONNX Runtime) or PT2E program (compiled) that vitq exported, and its float model
    (the reference for agreement and KL; None for random-init weights, which cannot be rebuilt)."""
    from .zoo import get_entry

    if str(path).endswith(".pt2"):
        from .export.pt2e import Pt2eModel

        runner = Pt2eModel(path)
        meta = runner.meta
    else:
        from .export.onnx import is_vitq_onnx, onnx_metadata
        from .export.onnx_runtime import OnnxModel

        if not is_vitq_onnx(path):
            raise ArtifactError(f"'{path}' is not an ONNX file written by `vitq export` (no vitq metadata)")
        runner, meta = OnnxModel(path), onnx_metadata(path)
    entry, random_init = get_entry(meta.get("vitq_model", "")), meta.get("vitq_random_init") == "true"
    checkpoint = meta.get("vitq_checkpoint")
    reference = None
    if not random_init:
        loaded = load_model(entry.timm_name, None if checkpoint in (None, "None") else checkpoint)
        reference = loaded.model
    return runner, entry, reference, str(path), random_init


def _check_images(args, entry) -> torch.Tensor | None:
    """The images an ONNX export is checked on: ``--data`` (and ``--list``), else the artifact's calibration
    images when the folder its report names still holds them."""
    if args.data:
        ds = make_dataset(args.data, entry.transform, args.list, limit=32, labels="none")
        return load_tensors(ds, workers=0)[0]
    report = Path(args.model) / "report.json"
    try:
        rep = json.loads(report.read_text())
        command, files = rep.get("command") or [], rep.get("calib_files") or []
        folder = Path(command[command.index("--calib") + 1])
    except (OSError, ValueError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and (folder / f).is_file()
                                                           for f in files[:32]):
        return None
    return load_tensors(make_dataset(folder, entry.transform, files=files[:32], labels="none"), workers=0)[0]


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

    device = resolve_device(args.device)
    distributed.init(device)
    reference = None
    exported = str(args.model).endswith((".onnx", ".pt2")) and Path(args.model).is_file()
    if exported:
        model, entry, reference, checkpoint, random_init = _exported_model(args.model)
        name = entry.timm_name
    elif is_packed(args.model):
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
        loaded = load_model(args.model, args.checkpoint, args.random_init, args.num_classes)
        model, entry, checkpoint, random_init = loaded.model, loaded.entry, loaded.checkpoint, loaded.random_init
        name = entry.timm_name
    if random_init:
        _say_random_init({"random_init": True}, args.model)
    if not exported:  # an exported file runs on the CPU (ONNX Runtime, or compiled), beside its float reference
        model = to_device(model, device)
    ds = make_dataset(args.data, entry.transform, args.list, args.limit, args.skip_bad_images, labels=args.labels)
    out = args.out if distributed.is_main() else None  # under torchrun, the first process writes
    with _maybe_file(out, args.overwrite, (args.data, args.list, args.model)) as tmp:
        result = evaluate(model, make_loader(distributed.shard_dataset(ds), args.batch_size, args.workers),
                          reference=reference, name=name)
        result.checkpoint, result.random_init = checkpoint, random_init
        _print_skipped(ds, "evaluation")
        if tmp is not None:
            tmp.write_text(dumps(output_json(result.to_dict(), "eval")))
    if distributed.is_main():
        print(result.summary() + (f" processes={distributed.world_size()}" if distributed.world_size() > 1 else ""))
    return 0


@contextlib.contextmanager
def _maybe_file(out, overwrite: bool, inputs):
    """A checked, locked temporary for an optional JSON ``--out`` file (None without one)."""
    if out is None:
        yield None
        return
    with destination(out, kind="file", overwrite=overwrite, inputs=inputs, is_ours=is_output_json) as tmp:
        yield tmp


def _settings_from_args(args) -> Settings:
    """The settings file (if any), then the explicit options, then each ``--set``, in that order."""
    settings = Settings.load(args.config) if getattr(args, "config", None) else Settings()
    given = [("recipe", getattr(args, "method", None))]
    given += [(f"quant.{k}", getattr(args, k, None)) for k in ("w_bits", "a_bits", "protocol", "seed", "w_scheme")]
    given += [(f"budget.{k}", getattr(args, f"budget_{o}", None))
              for k, o in (("w_bits", "w"), ("a_bits", "a"), ("size_mb", "mb"), ("gbops", "gbops"), ("edp", "edp"))]
    given.append(("budget.hardware", getattr(args, "hw", None)))
    source, settings.source = settings.source, "the command line"
    for key, value in given:
        if value is not None:
            settings.set(key, value)
    settings.source = source
    for assignment in getattr(args, "settings", []):
        settings.apply(assignment)
    return settings


def cmd_quantize(args) -> int:
    inputs = (args.calib, args.eval, args.calib_list, args.eval_list, args.config, args.checkpoint)
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun: compute beside rank 0, which writes
        _quantize(args, None)
        return 0
    with destination(args.out, kind="dir", overwrite=args.overwrite, inputs=inputs) as folder:
        report, calibrate_s, eval_s = _quantize(args, folder)
    print(summary_line(report))
    print(f"calibrate_s={calibrate_s:.1f} eval_s={eval_s:.1f} -> {Path(args.out) / 'report.json'}")
    return 0


def _overlap(a, b) -> list[str]:
    """Files (as given in ``a``) that ``a`` and ``b`` both read."""
    other = {(b.root / f).resolve() for f in b.files}
    return [f for f in a.files if (a.root / f).resolve() in other]


def _print_skipped(ds, what: str) -> None:
    if ds.skipped:
        print(f"skipped {len(ds.skipped)} unreadable {what} image(s): {', '.join(ds.skipped[:5])}"
              + (" ..." if len(ds.skipped) > 5 else ""), flush=True)


def _quantize(args, folder: Path | None) -> tuple[dict, float, float]:
    """Quantize, evaluate and (with a ``folder``) write the results into it."""
    settings = _settings_from_args(args)
    if args.calib_size < 1:
        raise ConfigError(f"--calib-size must be at least 1, got {args.calib_size}")
    planned = settings.plan()  # every option checked before the model and the images are read
    device = resolve_device(args.device)
    distributed.init(device)
    config = planned.config
    torch.manual_seed(config.seed)
    loaded = load_model(args.model, args.checkpoint, args.random_init, args.num_classes)
    entry = loaded.entry
    # the model's family (an architecture no adapter covers is refused here) and the budget's reachability
    planned = settings.plan(model=loaded.model)
    eval_files = read_list(args.eval_list, args.eval) if args.eval_list else None
    if args.calib_list:
        calib_ds = make_dataset(args.calib, entry.transform, args.calib_list, skip_bad_images=args.skip_bad_images,
                                labels="none")  # calibration needs no labels
    else:
        exclude = eval_files if (eval_files and Path(args.calib).resolve() == Path(args.eval).resolve()) else []
        files = calibration_subset(args.calib, args.calib_size, config.seed, exclude)
        calib_ds = make_dataset(args.calib, entry.transform, files=files, skip_bad_images=args.skip_bad_images,
                                labels="none")
    eval_files = eval_files or None
    if (eval_files is None and not args.calib_list and not args.allow_overlap
            and Path(args.calib).resolve() == Path(args.eval).resolve()):
        # one folder, no lists: calibrate on the seeded subset, evaluate on every other image
        taken = set(calib_ds.files)
        eval_files = [f for f in scan_folder(args.eval) if f not in taken]
    eval_ds = make_dataset(args.eval, entry.transform, None if eval_files is not None else args.eval_list, args.limit,
                           args.skip_bad_images, files=eval_files, labels=args.labels)
    overlap = _overlap(calib_ds, eval_ds)
    if overlap and not args.allow_overlap:
        raise DataError(f"{len(overlap)} image(s) are in both the calibration and the evaluation set, first: "
                        f"{', '.join(overlap[:3])}; the evaluation would flatter the model (--allow-overlap to "
                        "run anyway)")
    config, options, budget = planned.config, planned.options, planned.budget
    log.info("vitq quantize %s: recipe=%s protocol=%s W%dA%d observer=%s calib=%d eval=%d seed=%d device=%s%s",
             entry.timm_name, planned.recipe, config.protocol, config.w_bits, config.a_bits, config.observer,
             len(calib_ds), len(eval_ds), config.seed, device, " RANDOM-INIT" if loaded.random_init else "")
    if overlap:
        log.warning("warning: %d calibration image(s) are also evaluated (--allow-overlap); the report says so",
                    len(overlap))
    log.info(planned.describe())

    t0 = time.perf_counter()
    calib_images, _ = load_tensors(calib_ds, args.batch_size, args.workers)
    _print_skipped(calib_ds, "calibration")
    fp_model = to_device(loaded.model, device)
    res = run(fp_model, calib_images, planned, progress=True, device=device)
    qmodel, config, extra = res.model, res.config, dict(res.report)
    extra.pop("recipe", None)
    extra.pop("methods", None)
    calibrate_s = time.perf_counter() - t0
    log.debug(format_table(tensor_table(qmodel)))

    t1 = time.perf_counter()
    results = evaluate_many({"fp": fp_model, "quantized": qmodel},
                            make_loader(distributed.shard_dataset(eval_ds), args.batch_size, args.workers),
                            reference="fp")
    eval_s = time.perf_counter() - t1
    _print_skipped(eval_ds, "evaluation")
    report = build_report(
        qmodel, model_name=entry.timm_name, checkpoint=loaded.checkpoint, random_init=loaded.random_init,
        fp=results["fp"], quantized=results["quantized"],
        timing={"calibrate_s": calibrate_s, "eval_s": eval_s, "calib_images": len(calib_images),
                "processes": distributed.world_size(), "device": str(device)},
        extra={"calib_files": calib_ds.files[:1000], "recipe": planned.recipe, "methods": vars(options),
               "settings": plan_to_dict(planned), "command": ["vitq", *args.argv],
               "data": {"calib_images": len(calib_images), "calib_skipped": calib_ds.skipped,
                        "labels": eval_ds.label_mode,
                        "eval_skipped": eval_ds.skipped, "overlap_allowed": bool(args.allow_overlap),
                        "overlap_images": len(overlap), "overlap_files": overlap[:1000]},
               **extra},
    )

    def write(folder: Path) -> None:
        if "m2q" in extra or isinstance(budget, Budget):
            config.save(folder / "mixed_config.json")  # the searched assignment
        if isinstance(budget, Budget):
            if "sensitivity" in extra["mixed"]:
                (folder / "sensitivity.csv").write_text(sensitivity_csv(extra["mixed"]["sensitivity"]))
        save_artifact(qmodel, folder, {"model": entry.timm_name, "checkpoint": loaded.checkpoint,
                                       "random_init": loaded.random_init, "model_kwargs": loaded.model_kwargs})
        (folder / "config.yaml").write_text(dump(plan_to_dict(planned)))
        (folder / "report.json").write_text(dumps(report))
        write_html(report, folder)

    if folder is not None:
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
        loaded = load_model(args.model, args.checkpoint, args.random_init, args.num_classes)
        model = prepare(loaded.model, _settings_from_args(args).quant_config() or QuantConfig())
        entry, random_init = loaded.entry, loaded.random_init
    workloads = extract_workloads(model, entry.transform.input_size)
    report = estimate(workloads, hw)
    base = estimate(int8_baseline(workloads), hw)
    print(f"vitq cost {entry.timm_name} on {args.hw or 'the default accelerator'} (schedule={hw.schedule})"
          + ("  [random-init weights: structure and cost only]" if random_init else ""))
    print(f"{'layer':<44} {'op':<7} {'engine':<6} {'scheme':<8} {'W':>2} {'A':>2} {'MMACs':>9} {'shift %':>7} "
          f"{'energy uJ':>10} {'latency us':>10} {'EDP %':>6}")
    for c in report.layers:
        w = "-" if c.op in ("matmul", "div") else c.w_bits
        a = "-" if c.op == "div" else c.a_bits
        print(f"{c.name:<44} {c.op:<7} {c.engine:<6} {c.scheme:<8} {w:>2} {a:>2} {c.macs / 1e6:>9.2f} "
              f"{100 * c.shift_share:>7.1f} {c.energy_j * 1e6:>10.2f} {c.latency_s * 1e6:>10.2f} {100 * c.edp_share:>6.2f}")
    saving = 1 - report.edp / base.edp
    on_shift = report.shift_mac_share
    print(f"engines: {100 * (1 - on_shift):.1f} % of the MACs on the MAC engine, {100 * on_shift:.1f} % on the "
          f"shift-add engine; busy MAC {report.busy_s['mac'] * 1e6:.1f} us, shift-add "
          f"{report.busy_s['shift'] * 1e6:.1f} us, DRAM {report.busy_s['dram'] * 1e6:.1f} us")
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
